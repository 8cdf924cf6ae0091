"""Real videos, encoded with PyAV (the [video] extra): what the video enrichment tests read.

Frames are noise, so they compress as little as real footage does and an object is mostly its
frames: a test can tell a read of the index and one frame from a read of the whole."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image


def encode(
    path: Path,
    *,
    fmt: str = "mp4",
    codec: str = "mpeg4",
    frames: int = 25,
    width: int = 320,
    height: int = 240,
    rate: int = 25,
    faststart: bool = False,
    rotation: int | None = None,
    bit_rate: int = 4_000_000,
) -> bytes:
    """Encode a video into ``path`` and return its bytes. An MP4 keeps its ``moov`` index at the
    end, as most muxers write it, unless ``faststart``; ``rotation`` is the display matrix's
    counter-clockwise angle (as PyAV's ``set_display_rotation`` takes it)."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=fmt, options=options) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = bit_rate
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            picture = Image.effect_noise((width, height), 30 + i % 40).convert("RGB")
            frame = av.VideoFrame.from_image(picture)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


def audio_only(path: Path, *, frames: int = 10, rate: int = 8000) -> bytes:
    """An MP4 holding one AAC stream of silence and no video (``frames`` x 1024 samples)."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for i in range(frames):
            frame = av.AudioFrame(format="fltp", layout="mono", samples=1024)
            for plane in frame.planes:
                plane.update(bytes(plane.buffer_size))
            frame.sample_rate, frame.pts, frame.time_base = rate, i * 1024, Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


def first_frame_size(data: bytes) -> tuple[int, int]:
    """The first frame's size as decoded (not as displayed)."""
    with av.open(io.BytesIO(data)) as container:
        frame = next(container.decode(video=0))
        return frame.width, frame.height
