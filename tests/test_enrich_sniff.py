"""Sniffing and thumbnails over real files generated with Pillow: pure functions, no I/O."""

from __future__ import annotations

import io

import pytest
from PIL import Image

import images
from bucketsync.enrich.sniff import HEAD_STEPS, NeedMore, sniff
from bucketsync.enrich.thumbs import FOLDER, ThumbnailError, ThumbnailSkipped, make_thumbnail, thumbnail_key

CAP = 10_000_000


def _sniff_headfirst(data: bytes) -> tuple[dict[str, object], str | None, int]:
    """What the worker does: 2, 16, 64 KiB, then the whole; returns (meta, error, bytes read)."""
    for step in (*HEAD_STEPS, len(data)):
        head = data[:step]
        try:
            found = sniff(head, len(data), CAP)
        except NeedMore:
            continue
        return found.meta, found.error, len(head)
    raise AssertionError("the whole object must always be enough")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_each_exif_orientation(orientation: int) -> None:
    data = images.jpeg(60, 40, orientation)
    meta, error, read = _sniff_headfirst(data)
    assert error is None and read == min(2048, len(data))  # the header is in the first ranged read
    assert meta["mimetype"] == "image/jpeg" and meta["format"] == "JPEG"
    assert (meta["width"], meta["height"], meta["orientation"]) == (60, 40, orientation)
    turned = orientation >= 5
    assert (meta["display_width"], meta["display_height"]) == ((40, 60) if turned else (60, 40))


@pytest.mark.parametrize(
    ("data", "mime", "fmt"),
    [
        (images.png(), "image/png", "PNG"),
        (images.gif(), "image/gif", "GIF"),
        (images.webp(), "image/webp", "WEBP"),
    ],
)
def test_png_gif_webp(data: bytes, mime: str, fmt: str) -> None:
    meta, error, _ = _sniff_headfirst(data)
    assert error is None
    assert meta["mimetype"] == mime and meta["format"] == fmt
    assert (meta["width"], meta["height"], meta["orientation"]) == (50, 30, 1)


def test_jpeg_without_exif_is_upright() -> None:
    meta, _, _ = _sniff_headfirst(images.jpeg())
    assert meta["orientation"] == 1 and (meta["display_width"], meta["display_height"]) == (60, 40)


def test_header_past_the_first_read_asks_for_more() -> None:
    """A JPEG whose EXIF block is large puts its size marker past 2 KiB: 16 KiB is read next."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "x" * 5000  # ImageDescription
    buf = io.BytesIO()
    images.picture(30, 20).save(buf, "JPEG", exif=exif.tobytes())
    with pytest.raises(NeedMore):
        sniff(buf.getvalue()[:2048], len(buf.getvalue()), CAP)
    meta, error, read = _sniff_headfirst(buf.getvalue())
    assert error is None and read <= 16384 and meta["orientation"] == 6 and meta["display_width"] == 20


def test_a_png_named_jpg_is_a_png() -> None:
    """The bytes decide, never the name: sniff is not even given one."""
    meta, _, _ = _sniff_headfirst(images.png())
    assert meta["mimetype"] == "image/png"


def test_text_has_an_encoding() -> None:
    meta, error, _ = _sniff_headfirst("héllo wörld\n".encode() * 10)
    assert error is None and meta == {"mimetype": "text/plain", "encoding": "utf-8"}
    meta, _, _ = _sniff_headfirst(b"plain ascii\n")
    assert meta == {"mimetype": "text/plain", "encoding": "us-ascii"}
    meta, _, _ = _sniff_headfirst(bytes(range(256)) * 4)
    assert meta == {"mimetype": "application/octet-stream"}
    meta, _, _ = _sniff_headfirst(b"")
    assert meta == {"mimetype": "application/x-empty"}


def test_truncated_jpeg_reads_its_header_but_not_its_pixels() -> None:
    data = images.truncated_jpeg()
    meta, error, _ = _sniff_headfirst(data)
    assert error is None and (meta["width"], meta["height"]) == (400, 300)
    with pytest.raises(ThumbnailError, match="truncated"):
        make_thumbnail(data, 64, "jpeg", CAP)


def test_a_header_cut_short_is_corrupt() -> None:
    whole = images.jpeg()
    found = sniff(whole[:100], 100, CAP)  # the object *is* 100 bytes: no more to read
    assert found.error is not None and "corrupt" in found.error and found.meta["mimetype"] == "image/jpeg"


def test_decompression_bomb_is_never_decoded() -> None:
    data = images.bomb()
    meta, error, read = _sniff_headfirst(data)
    assert read == 2048 and (meta["width"], meta["height"]) == (6000, 6000)
    assert error is not None and "decompression bomb" in error and "36000000 pixels" in error
    with pytest.raises(ThumbnailError, match="decompression bomb"):
        make_thumbnail(data, 64, "jpeg", CAP)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_thumbnail_is_upright_and_bounded(orientation: int, fmt: str) -> None:
    thumb = make_thumbnail(images.jpeg(400, 200, orientation), 64, fmt, CAP)
    with Image.open(io.BytesIO(thumb)) as im:
        assert im.format == fmt.upper()
        assert max(im.size) == 64
        assert im.size == ((32, 64) if orientation in (6, 8) else (64, 32))


def test_thumbnail_of_transparent_and_palette_images() -> None:
    for data in (images.png(), images.gif()):
        with Image.open(io.BytesIO(make_thumbnail(data, 16, "jpeg", CAP))) as im:
            assert im.mode == "RGB" and max(im.size) == 16


def test_thumbnail_keys_are_per_version_and_hidden() -> None:
    a = thumbnail_key("photos/cat.jpg", "etag1", 10, 1.0, "jpeg")
    b = thumbnail_key("photos/cat.jpg", "etag2", 10, 1.0, "jpeg")
    assert a.startswith(FOLDER + "photos/cat.jpg.") and a.endswith(".jpg") and a != b
    long = thumbnail_key("d/" + "n" * 250, None, 10, 1.0, "webp")
    assert len(long.rsplit("/", 1)[1]) < 100 and long.endswith(".webp")


def test_memory_limit_skips_the_thumbnail_after_draft_scaling() -> None:
    """A 1500x1000 PNG needs 1500*1000*4 bytes decoded: past a 4 MiB limit it is skipped. A JPEG of
    the same size is decoded at 1/8 scale by draft(), so it stays under the same limit."""
    png = images.encoded("PNG", 1500, 1000)
    with pytest.raises(ThumbnailSkipped, match=r"needs 5 MiB, more than enrich\.max_memory=4 MiB"):
        make_thumbnail(png, 64, "jpeg", CAP, 4 << 20)
    thumb = make_thumbnail(images.jpeg(1500, 1000), 64, "jpeg", CAP, 4 << 20)
    with Image.open(io.BytesIO(thumb)) as im:
        assert im.size == (64, 43)


def test_a_jpeg_is_decoded_at_the_scale_of_its_thumbnail_not_of_the_box() -> None:
    """A 900x600 JPEG for a 100 px thumbnail (100x67): draft() may decode at 1/8 (112x75, 34 KB of
    pixels), since the thumbnail is 66-67 high, not 100; the square box would allow only 1/4 (135 KB)."""
    thumb = make_thumbnail(images.jpeg(900, 600), 100, "jpeg", CAP, 100_000)
    with Image.open(io.BytesIO(thumb)) as im:
        assert im.size[0] == 100 and im.size[1] in (66, 67)
