"""Thumbnails: upright per EXIF, at most ``size`` pixels on the long side, JPEG or WebP.

Pure functions over bytes (the worker runs them in a thread). JPEGs are decoded with
``draft()``: libjpeg scales by 1/2, 1/4 or 1/8 while decoding, so a 24-megapixel photo
is decoded at about the thumbnail's size, in a fraction of the time and memory.

Decoding is most of a thumbnail's cost (docs/benchmarks.md: 20-60 ms for a 1-4 MB image,
entropy decoding that no scale factor skips); what follows is kept small: the image is
shrunk first (a box reduction to just above the size, then bicubic) and turned upright
after, on the small image; the encoders run at low effort. libvips (pyvips) was measured
too and took more CPU for these JPEGs, not less: it decodes with the same libjpeg-turbo.
"""

from __future__ import annotations

import hashlib
import io
import posixpath

from PIL import Image, ImageOps

from bucketsync.core.keys import HIDDEN

FOLDER = f"{HIDDEN}thumbnails/"
SUFFIX = {"jpeg": ".jpg", "webp": ".webp"}
MIME = {"jpeg": "image/jpeg", "webp": "image/webp"}
#: a file name longer than this (in bytes) is replaced by its hash: local filesystems stop at 255
MAX_NAME = 200


class ThumbnailError(Exception):
    """The image cannot be decoded (truncated, corrupt): the reason, for the item's error."""


class ThumbnailSkipped(Exception):
    """The image is fine, but decoding it would pass the memory limit: no thumbnail, no failure."""


def thumbnail_key(key: str, etag: str | None, size: int, modified: float, fmt: str) -> str:
    """Where an item's thumbnail lives in the hidden folder: its key, plus a token of its version.

    The token keeps the thumbnails of two versions of a key apart, so removing the old
    one after a replacement can never remove the new one.
    """
    version = etag if etag is not None else f"{size}:{modified!r}"
    token = hashlib.sha256(version.encode()).hexdigest()[:12]
    folder, name = posixpath.split(key)
    leaf = f"{name}.{token}{SUFFIX[fmt]}"
    if len(leaf.encode()) > MAX_NAME:
        leaf = f"{hashlib.sha256(name.encode()).hexdigest()}.{token}{SUFFIX[fmt]}"
    return FOLDER + (f"{folder}/{leaf}" if folder else leaf)


def make_thumbnail(data: bytes, size: int, fmt: str, max_pixels: int, max_memory: int = 1 << 62) -> bytes:
    """The thumbnail of the image in ``data``; ``ThumbnailError`` naming why it cannot be made,
    ``ThumbnailSkipped`` when decoding it would need more than ``max_memory`` bytes."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:  # the sniff checked already; the whole file may differ
                raise ThumbnailError(f"decompression bomb: {im.width}x{im.height} pixels, more than {max_pixels}")
            if im.format == "JPEG":
                # Decode at the smallest scale still >= the thumbnail: asked for the thumbnail's own
                # size, not the square box, a 3:2 photo decodes at 1/8 rather than 1/4 (about 12% less CPU).
                im.draft("RGB", fit(im.width, im.height, size))
            need = decoded_bytes(im)
            if need > max_memory:
                raise ThumbnailSkipped(
                    f"decoding {im.width}x{im.height} {im.mode} needs {need >> 20} MiB, "
                    f"more than enrich.max_memory={max_memory >> 20} MiB"
                )
            im.load()
            # The box is square, so shrinking before turning upright gives the same size.
            # reducing_gap=1: reduce() (a box filter, cheap) by the whole factor that keeps the
            # image >= size, then bicubic for the rest: a 1400x1000 PNG in a third of LANCZOS's time.
            im.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=1.0)
            upright = ImageOps.exif_transpose(im)
            assert upright is not None  # a copy, never None unless in_place
            out = _flatten(upright)
    except (ThumbnailError, ThumbnailSkipped):
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text:
            raise ThumbnailError(f"truncated image: {text}") from None
        raise ThumbnailError(f"corrupt image: {text}") from None
    return encode(out, fmt)


def encode(im: Image.Image, fmt: str) -> bytes:
    """An upright RGB image (already at thumbnail size) as a thumbnail file."""
    buf = io.BytesIO()
    if fmt == "webp":
        im.save(buf, "WEBP", quality=80, method=0)  # method 4 takes 4x longer for a few % smaller
    else:
        im.save(buf, "JPEG", quality=80, optimize=True)
    return buf.getvalue()


def fit(width: int, height: int, size: int) -> tuple[int, int]:
    """``width`` x ``height`` scaled to at most ``size`` on the long side (never up), at least 1x1."""
    scale = min(1.0, size / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


#: what turns an image upright, per EXIF orientation (as ``ImageOps.exif_transpose`` does)
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(im: Image.Image, orientation: int) -> Image.Image:
    """``im`` turned as EXIF ``orientation`` says it is displayed (a video's rotation maps to 1, 3, 6, 8)."""
    method = TRANSPOSE.get(orientation)
    return im if method is None else im.transpose(method)


#: bytes per pixel in Pillow's memory: one for single-byte modes, two for 16-bit, else four
#: (Pillow keeps RGB, RGBA, CMYK, YCbCr, I and F in 32 bits a pixel)
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decoded_bytes(im: Image.Image) -> int:
    """What the decoded pixels take in memory (at the draft scale, for a JPEG)."""
    return im.width * im.height * _PIXEL_BYTES.get(im.mode, 4)


def _flatten(im: Image.Image) -> Image.Image:
    """RGB for JPEG/WebP: transparency over white, palettes and greys expanded."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return im.convert("RGB")
