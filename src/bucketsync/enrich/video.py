"""What a video is: duration, frame rate, codec, dimensions, rotation, and a thumbnail of its first frame.

PyAV (FFmpeg's libraries, as one wheel: the optional extra ``bucketsync[video]``) reads the
container through a file object, a ``RangeFile`` over the store's ranged reads, so only the
parts FFmpeg asks for are fetched: the head, the index (an MP4's ``moov`` atom, often at the
very end: one seek there and back), and the packets of the first frame. Never the whole object.

One frame is always decoded, thumbnail or not: a video's rotation (a phone held upright) is in
its display matrix, which PyAV hands over with decoded frames only, and the upright size is part
of the metadata. Decoding is single-threaded (``enrich_concurrency`` is the parallelism) and
happens only under the pixel and memory caps.

Blocking functions over a file object (the worker runs them in a thread); nothing here touches
the event loop.
"""

from __future__ import annotations

import importlib
import io
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from bucketsync.enrich import thumbs
from bucketsync.enrich.ranged import BLOCK, ReadBudget, ReadStopped

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

#: what a video without PyAV gets in ``video_skipped`` (metadata, not a failure)
NO_PYAV = "PyAV is not installed (pip install 'bucketsync[video]'): mimetype only"
#: packets demuxed for the first frame before giving up (a decoder's delay is a few)
MAX_PACKETS = 64
#: a video's clockwise rotation (degrees) -> the EXIF orientation that displays an image so
ORIENTATION = {0: 1, 90: 6, 180: 3, 270: 8}
#: bytes per pixel a decoder holds for one frame and its reference (YUV 4:2:0 at 1.5, twice, rounded up)
DECODE_BYTES_PER_PIXEL = 4


@dataclass
class Found:
    """What ``analyse`` found: system metadata, the thumbnail (or why none), and why the item
    failed (corrupt, truncated, a bomb, an index beyond ``max_bytes``), or None."""

    meta: dict[str, Any] = field(default_factory=dict)
    thumbnail: bytes | None = None
    thumbnail_skipped: str | None = None
    error: str | None = None


def missing() -> str | None:
    """Why videos cannot be analysed here (PyAV absent), or None when they can."""
    try:
        importlib.import_module("av")
    except ImportError:
        return NO_PYAV
    return None


def analyse(
    file: io.RawIOBase,
    *,
    thumbnail_size: int | None,
    fmt: str,
    max_pixels: int,
    max_memory: int,
) -> Found:
    """The video in ``file``: its metadata, and a thumbnail when ``thumbnail_size`` is given.

    A video that cannot be read comes back with ``error`` (and what its header said, if it was
    read); ``ReadStopped`` (the item ran out of time) and the store's own errors pass through."""
    import av

    found = Found()
    try:
        with av.open(file, mode="r", buffer_size=BLOCK) as container:
            frame = _probe(container, found.meta, max_pixels, max_memory)
            if frame is None:
                return found
            _upright_size(frame, found.meta)
            if thumbnail_size is not None:
                found.thumbnail = _thumbnail(frame, found.meta, thumbnail_size, fmt)
    except ReadStopped:
        raise
    except ReadBudget as exc:
        if "codec" in found.meta:  # the header was read: the first frame is what was too far
            found.thumbnail_skipped = str(exc)
        else:
            found.error = str(exc)
    except _Skip as exc:
        found.thumbnail_skipped = str(exc)
    except _Bomb as exc:
        found.error = str(exc)
    except av.FFmpegError as exc:
        found.error = f"corrupt or truncated video: {_reason(exc)}"
    return found


class _Skip(Exception):
    """No frame is decoded (memory cap, no frame found): metadata without a thumbnail."""


class _Bomb(Exception):
    """More pixels than ``enrich.max_pixels``: never decoded; the item fails, its size recorded."""


def _probe(container: InputContainer, meta: dict[str, Any], max_pixels: int, max_memory: int) -> VideoFrame | None:
    """Fill ``meta`` from the container's header; the first decoded frame (None: audio only)."""
    if container.duration is not None and container.duration > 0:
        meta["duration"] = round(container.duration / 1_000_000, 3)
    if not container.streams.video:
        audio = container.streams.audio
        if audio:
            meta["codec"] = audio[0].codec_context.name
        return None
    stream: VideoStream = container.streams.video[0]
    ctx = stream.codec_context
    meta["codec"] = ctx.name
    width, height = ctx.width, ctx.height
    if width and height:
        meta["width"], meta["height"] = width, height
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        meta["frame_rate"] = round(float(rate), 3)
    if "duration" not in meta and stream.duration and stream.time_base:
        meta["duration"] = round(float(stream.duration * Fraction(stream.time_base)), 3)
    if not (width and height):
        raise _Skip("the stream does not say its dimensions")
    if width * height > max_pixels:
        raise _Bomb(
            f"decompression bomb: {width}x{height} = {width * height} pixels, more than "
            f"enrich.max_pixels={max_pixels}; not decoded"
        )
    need = width * height * DECODE_BYTES_PER_PIXEL
    if need > max_memory:
        raise _Skip(
            f"decoding {width}x{height} needs {need >> 20} MiB, more than enrich.max_memory={max_memory >> 20} MiB"
        )
    ctx.thread_count = 1  # enrich_concurrency is the parallelism; FFmpeg's default starts a thread per core
    return _first_frame(container, stream)


def _first_frame(container: InputContainer, stream: VideoStream) -> VideoFrame:
    for n, packet in enumerate(container.demux(stream)):
        if n >= MAX_PACKETS:
            break
        for frame in packet.decode():
            return frame
    raise _Skip(f"no frame decoded in the first {MAX_PACKETS} packets")


def _upright_size(frame: VideoFrame, meta: dict[str, Any]) -> None:
    """Rotation and displayed size from the frame's display matrix. PyAV gives the matrix's
    counter-clockwise angle; players turn the picture back by it: clockwise, as EXIF counts."""
    clockwise = round(-float(frame.rotation) / 90) * 90 % 360
    meta["rotation"] = clockwise
    meta["orientation"] = ORIENTATION[clockwise]
    w, h = meta.get("width", frame.width), meta.get("height", frame.height)
    meta["display_width"], meta["display_height"] = (h, w) if clockwise in (90, 270) else (w, h)


def _thumbnail(frame: VideoFrame, meta: dict[str, Any], size: int, fmt: str) -> bytes:
    """The frame scaled by swscale straight to the thumbnail's size (no full-size RGB copy),
    turned upright, encoded as an image's thumbnail is."""
    width, height = thumbs.fit(frame.width, frame.height, size)
    image = frame.to_image(width=width, height=height, interpolation="AREA")  # type: ignore[no-untyped-call]
    return thumbs.encode(thumbs.upright(image, meta["orientation"]), fmt)


def _reason(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)
