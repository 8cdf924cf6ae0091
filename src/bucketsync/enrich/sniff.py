"""What an object is, from the head of its bytes: mimetype, encoding, dimensions, EXIF orientation.

Pure functions over bytes (no I/O): the worker reads 2 KiB, then 16 KiB, then 64 KiB of
the object (CVAT's header-first downloader) and asks ``sniff`` each time until it answers;
when it will make a thumbnail of a key named like an image, it reads the whole object at once.
The mimetype comes from the bytes (``filetype``'s magic numbers), never from the key's
extension; dimensions and EXIF come from Pillow's lazy ``Image.open``, which parses the
header only and decodes no pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import filetype
from PIL import Image, UnidentifiedImageError

#: the ranged reads of the head of an object, in bytes, until its type and dimensions are known
HEAD_STEPS = (2048, 16384, 65536)
#: EXIF tag 0x0112
ORIENTATION = 0x0112
#: orientations 5-8 turn the image a quarter: it is displayed with width and height swapped
SWAPS = frozenset({5, 6, 7, 8})

# Our own cap (``enrich.max_pixels``, checked from the header before any decode) decides what
# is a decompression bomb; Pillow's process-wide one would refuse to even read such a header,
# so the item could not be recorded with its size.
Image.MAX_IMAGE_PIXELS = None

# A header that ends early raises one of these while Pillow parses it.
_SHORT = (OSError, SyntaxError, EOFError, ValueError, IndexError, KeyError, TypeError)


#: names of the image formats Pillow decodes for a thumbnail (lower case): only a hint of what
#: to read, never of what the object is
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


def named_like_image(key: str) -> bool:
    """Whether ``key``'s extension is an image's (the worker then reads it whole at once)."""
    return key.lower().endswith(IMAGE_SUFFIXES)


class NeedMore(Exception):
    """The head is too short to tell; read more."""


@dataclass(frozen=True, slots=True)
class Sniffed:
    """The system metadata found, and why the item failed (corrupt header, bomb), or None."""

    meta: dict[str, Any]
    error: str | None = None

    @property
    def image(self) -> bool:
        return "width" in self.meta

    @property
    def video(self) -> bool:
        """A video container by its magic (mp4, mov, webm, mkv, avi, ...): PyAV reads the rest."""
        return str(self.meta.get("mimetype", "")).startswith("video/")


def sniff(head: bytes, size: int, max_pixels: int) -> Sniffed:
    """System metadata from ``head``, the first bytes of an object of ``size`` bytes.

    Raises ``NeedMore`` while ``head`` is shorter than the object and too short to tell.
    """
    whole = len(head) >= size
    kind = filetype.guess(head) if head else None
    mime = kind.mime if kind is not None else None
    if mime is not None and not mime.startswith("image/"):
        return Sniffed({"mimetype": mime})
    try:
        found = _image(head)
    except _Short as exc:
        if not whole:
            raise NeedMore from None
        return Sniffed({"mimetype": mime or "application/octet-stream"}, f"corrupt image header: {exc}")
    if found is not None:
        return _checked(found, mime, max_pixels)
    if mime is not None:  # magic says image, Pillow cannot place it (yet)
        if not whole and len(head) < HEAD_STEPS[-1]:
            raise NeedMore
        return Sniffed({"mimetype": mime})
    return Sniffed(_text(head, whole))


class _Short(Exception):
    """The header parse ran out of bytes (or met a broken header)."""


def _image(head: bytes) -> dict[str, Any] | None:
    """The image header's facts; None when Pillow knows no such image; ``_Short`` when cut short."""
    try:
        with Image.open(io.BytesIO(head)) as im:
            meta: dict[str, Any] = {"format": im.format, "width": im.width, "height": im.height, "mode": im.mode}
            orientation = _orientation(im)
    except UnidentifiedImageError:
        return None
    except _SHORT as exc:
        raise _Short(str(exc) or type(exc).__name__) from None
    meta["orientation"] = orientation or 1
    w, h = meta["width"], meta["height"]
    meta["display_width"], meta["display_height"] = (h, w) if orientation in SWAPS else (w, h)
    return meta


def _orientation(im: Image.Image) -> int | None:
    """EXIF orientation from what the header parse found: never ``getexif()`` on a PNG, which
    loads the whole image to look for a late eXIf chunk."""
    raw = im.info.get("exif")
    if raw is None:
        return None
    exif = Image.Exif()
    if isinstance(raw, bytes):
        exif.load(raw)
    value = exif.get(ORIENTATION)
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else None


def _checked(found: dict[str, Any], mime: str | None, max_pixels: int) -> Sniffed:
    fmt = found["format"]
    meta = {"mimetype": mime or Image.MIME.get(fmt, "application/octet-stream"), **found}
    pixels = found["width"] * found["height"]
    if pixels > max_pixels:
        return Sniffed(
            meta,
            f"decompression bomb: {found['width']}x{found['height']} = {pixels} pixels, more than "
            f"enrich.max_pixels={max_pixels}; not decoded",
        )
    return Sniffed(meta)


def _text(head: bytes, whole: bool) -> dict[str, Any]:
    """Plain text (with its encoding) when the head decodes as UTF-8, else octet-stream."""
    if not head:
        return {"mimetype": "application/x-empty"}
    sample = head if whole else head[: HEAD_STEPS[0]]
    if b"\x00" in sample:
        return {"mimetype": "application/octet-stream"}
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A read cut off mid-character is still UTF-8: only an error in the last 3 bytes is forgiven.
        if whole or exc.start < len(sample) - 3:
            return {"mimetype": "application/octet-stream"}
    encoding = "us-ascii" if sample.isascii() else "utf-8"
    return {"mimetype": "text/plain", "encoding": encoding}
