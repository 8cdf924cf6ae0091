"""Real files of each kind, generated with Pillow: what enrichment tests (and bench/enrich.py) read."""

from __future__ import annotations

import io

from PIL import Image


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """An RGB image with structure (a gradient and a few blocks), so JPEG sizes look real."""
    base = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    for i in range(4):
        x, y = (seed * 37 + i * 53) % max(1, w - 8), (seed * 11 + i * 29) % max(1, h - 8)
        base.paste((255 * (i % 2), 40 * i, 200), (x, y, x + w // 5 + 1, y + h // 5 + 1))
    return base


def jpeg(w: int = 60, h: int = 40, orientation: int | None = None, *, quality: int = 85, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    picture(w, h, seed).save(buf, "JPEG", quality=quality, exif=exif.tobytes() if orientation is not None else b"")
    return buf.getvalue()


def encoded(fmt: str, w: int = 50, h: int = 30, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    picture(w, h).convert(mode).save(buf, fmt)
    return buf.getvalue()


def png(w: int = 50, h: int = 30) -> bytes:
    return encoded("PNG", w, h, "RGBA")


def gif(w: int = 50, h: int = 30) -> bytes:
    return encoded("GIF", w, h, "P")


def webp(w: int = 50, h: int = 30) -> bytes:
    return encoded("WEBP", w, h)


def bomb(side: int = 6000) -> bytes:
    """A tiny PNG that decodes to ``side`` x ``side`` pixels (36 million at the default)."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    """A JPEG cut off in its image data: the header (and so its size) reads, the pixels do not."""
    whole = jpeg(400, 300, quality=95)
    return whole[: len(whole) // 2]
