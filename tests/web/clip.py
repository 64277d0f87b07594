"""A WebM (VP8) test clip made with PyAV from bytes: no numpy, no fixture file."""

from __future__ import annotations

import random
from pathlib import Path

import av


def make_webm(path: Path, *, seconds: int = 15, fps: int = 25, width: int = 320,
              height: int = 240, bitrate: int = 16_000_000, seed: int = 7) -> Path:
    """Grain over a moving bar, keyframe every second, so it is large (about
    bitrate/8 bytes a second: most of it incompressible) and seekable to any second."""
    rng = random.Random(seed)
    grain = [rng.randbytes(width * height * 3) for _ in range(8)]
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = bitrate
        stream.gop_size = fps
        stream.options = {"deadline": "realtime", "cpu-used": "8", "minrate": str(bitrate),
                          "maxrate": str(bitrate), "b:v": str(bitrate)}
        row = width * 3
        for n in range(seconds * fps):
            data = bytearray(grain[n % len(grain)])
            x = (n * 4) % (width - 32)
            bar = b"\xff\xff\xff" * 32
            for y in range(0, height, 1):
                data[y * row + x * 3: y * row + x * 3 + len(bar)] = bar
            frame = av.VideoFrame(width, height, "rgb24")
            frame.planes[0].update(bytes(data))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def make_jpeg(path: Path, *, width: int = 640, height: int = 480, seed: int = 1) -> Path:
    """A photo-like JPEG (one frame of noise) with PyAV's mjpeg encoder."""
    frame = av.VideoFrame(width, height, "rgb24")
    frame.planes[0].update(random.Random(seed).randbytes(width * height * 3))
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        for packet in stream.encode(frame.reformat(format="yuvj420p")):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path
