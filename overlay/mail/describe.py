"""Describe media files for the location message, make thumbnails, and make the demo clip.

The location message's descriptive part carries the
media type, date/time stamps and an optional small thumbnail. Everything here reads files
through PyAV (FFmpeg) with bounded work: a file that isn't media, or is damaged, is
described as plain data and never raises, because the sender must be able to send any file.
numpy and Pillow are deliberately not used: frames are filled from bytes and JPEGs come
from FFmpeg's own `mjpeg` encoder.
"""

from __future__ import annotations

import math
import mimetypes
import random
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

DEFAULT_TYPE = "application/octet-stream"
THUMBNAIL_MAX_BYTES = 32 * 1024  # the location message refuses larger thumbnails

# FFmpeg will "recognise" random bytes as obscure formats now and then (seen here: ea_cdata,
# lrc). Only these demuxers count as media; each maps to the MIME type we announce.
_CONTAINER_TYPES: dict[str, str] = {
    "mpegts": "video/mp2t",
    "mov": "video/mp4",
    "matroska": "video/x-matroska",
    "avi": "video/x-msvideo",
    "mpeg": "video/mpeg",
    "mpegvideo": "video/mpeg",
    "flv": "video/x-flv",
    "ogg": "application/ogg",
    "mp3": "audio/mpeg",
    "aac": "audio/aac",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "image2": "image/jpeg",
    "jpeg_pipe": "image/jpeg",
    "png_pipe": "image/png",
    "gif": "image/gif",
    "webp_pipe": "image/webp",
}
_MEDIA_EXTENSIONS: dict[str, str] = {
    ".ts": "video/mp2t",
    ".m2ts": "video/mp2t",
    ".mts": "video/mp2t",
    ".m4v": "video/mp4",
    ".m4a": "audio/mp4",
    ".3gp": "video/3gpp",
    ".mkv": "video/x-matroska",
    ".mka": "audio/x-matroska",
    ".ogv": "video/ogg",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".flac": "audio/flac",
    ".wav": "audio/wav",
    ".heic": "image/heic",
    ".webp": "image/webp",
}
# The same demuxer serves several MIME types; the file's extension tells them apart.
_REFINE_BY_EXTENSION = {"mov", "matroska", "ogg", "image2"}

_OPEN_TIMEOUT_S = 5.0  # FFmpeg's interrupt callback: no probe or read may stall longer
# formatprobesize caps how much FFmpeg reads to guess the container (its default is 1 MiB,
# whatever probesize says). A file that is no media is read that far: 45 ms of CPU for
# random bytes here, against 12 ms at 256 KiB, while the send beside it hashes the file on
# both cores. Real containers are recognised in their first kilobytes; an MP3 behind a
# 1.5 MiB ID3 tag still is, because FFmpeg skips the tag by its stated length.
_PROBE_OPTIONS = {"formatprobesize": str(256 * 1024), "probesize": str(2 * 1024 * 1024),
                  "analyzeduration": str(3_000_000)}
_MAX_PACKETS = 1500  # demuxing budget for finding a frame; a few seconds of any real clip
_THUMB_AT_S = 1.0  # skip the first second: often black or a fade-in


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What the sender announces about a file; all but media_type and file_mtime optional."""

    media_type: str
    duration_ms: int | None
    width: int | None
    height: int | None
    video_codec: str | None
    audio_codec: str | None
    created: int | None
    file_mtime: int


def describe_media(path: Path) -> MediaInfo:
    """Describe `path` as media if FFmpeg recognises it as a common format, else as data.

    Never raises for unreadable content (text, random bytes, empty or truncated files);
    OSError from `stat` (a missing file) does propagate, since that is the caller's error.
    """
    st = path.stat()
    mtime = max(0, int(st.st_mtime))  # a pre-1970 mtime would fail the stamp check
    plain = MediaInfo(_type_from_name(path), None, None, None, None, None, None, mtime)
    if not stat.S_ISREG(st.st_mode):  # opening a FIFO or device could block for ever
        return plain
    try:
        return _probe(path, mtime) or plain
    except Exception:  # FFmpeg reports damaged input through many error types
        return plain


def make_thumbnail(
    path: Path, *, max_side: int = 160, max_bytes: int = THUMBNAIL_MAX_BYTES
) -> bytes | None:
    """A JPEG of an early video frame (about 1 s in), fitting `max_side` and `max_bytes`.

    Returns None when no video frame decodes, or when even the smallest rendering is larger
    than `max_bytes`.
    """
    if max_side < 2 or max_bytes < 1:
        raise ValueError("max_side must be at least 2 and max_bytes positive")
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None
        frame = _early_frame(path)
        if frame is None:
            return None
        return _fit_jpeg(frame, max_side, max_bytes)
    except Exception:  # see describe_media: damaged input must not escape as an error
        return None


def make_demo_clip(
    path: Path,
    *,
    seconds: float = 4.0,
    width: int = 640,
    height: int = 360,
    fps: int = 25,
    tone_hz: float = 440.0,
    bitrate: int | None = None,
    created: int | None = None,
) -> None:
    """Write an MPEG-TS clip: MPEG-2 video of moving bars over grain, plus an MP3 tone.
    A `.webm` suffix writes what browsers play instead: VP8 video with an Opus tone
    (Vorbis if this FFmpeg has no Opus encoder, no audio if it has neither).

    Every frame differs and carries seeded grain, so the file does not compress away and
    is the same for the same arguments. `bitrate` (bits/s) makes large files quickly for
    transfer benchmarks: 20 Mbit/s over 21 s is 50 MiB, made in about 2.5 s here. At
    640x360 the grain saturates near 20 Mbit/s: for bigger files use more seconds or
    pixels. A `.mp4` or `.mkv` suffix selects that container instead; `created` (unix
    seconds) is written as `creation_time` where the container keeps it (MP4, Matroska;
    MPEG-TS has no such field).
    """
    if seconds <= 0 or fps <= 0 or width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError("need seconds > 0, fps > 0 and even width/height of at least 16")
    suffix = path.suffix.lower()
    container_format = {".mp4": "mp4", ".mkv": "matroska", ".webm": "webm"}.get(suffix,
                                                                                "mpegts")
    rng = random.Random(f"{seconds}/{width}/{height}/{fps}/{tone_hz}/{bitrate}")
    with av.open(str(path), "w", format=container_format) as out:
        if created is not None:
            out.metadata["creation_time"] = _iso_utc(created)
        if container_format == "webm":
            video: Any = out.add_stream("libvpx", rate=fps)
            video.gop_size = fps  # a keyframe a second: a browser seeks to any second
            opts = {"deadline": "realtime", "cpu-used": "8"}
            if bitrate is not None:
                video.bit_rate = bitrate
                opts.update({"minrate": str(bitrate), "maxrate": str(bitrate),
                             "b:v": str(bitrate)})
            video.options = opts
            codec = webm_audio_codec()
            rate = 48000 if codec == "libopus" else _SAMPLE_RATE
            audio: Any = out.add_stream(codec, rate=rate) if codec else None
        else:
            video = out.add_stream("mpeg2video", rate=fps)
            if bitrate is not None:
                video.bit_rate = bitrate
                # Without a VBV buffer FFmpeg treats bit_rate only as a loose average.
                video.codec_context.options = {"maxrate": str(bitrate),
                                               "bufsize": str(bitrate)}
            rate = _SAMPLE_RATE
            audio = out.add_stream("libmp3lame", rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if audio is not None:
            audio.layout = "stereo"
        # Interleaved a video frame at a time, so a player reading from the start (as a
        # browser does while the file still arrives) finds sound beside each picture.
        tones = _tone_frames(seconds, tone_hz, rate) if audio is not None else iter(())
        pending = next(tones, None)
        for i, frame in enumerate(_demo_frames(round(seconds * fps), width, height, rng)):
            out.mux(video.encode(frame))
            while pending is not None and pending.pts < (i + 1) * rate / fps:
                out.mux(audio.encode(pending))
                pending = next(tones, None)
        out.mux(video.encode(None))
        if audio is not None:
            while pending is not None:
                out.mux(audio.encode(pending))
                pending = next(tones, None)
            out.mux(audio.encode(None))


def webm_audio_codec() -> str | None:
    """The audio encoder a browser-playable demo clip uses: Opus, else Vorbis, else none."""
    for name in ("libopus", "libvorbis"):
        if name in av.codecs_available:
            return name
    return None


def named_as_media(path: Path) -> bool:
    """Whether `path`'s name (its extension) says audio or video, known before the file is
    read: what the content's chunk size follows (`chunk_size_for`)."""
    return _type_from_name(path).startswith(("audio/", "video/"))


def _type_from_name(path: Path) -> str:
    guessed, _ = _NAME_TYPES.guess_type(path.name, strict=False)
    return guessed or DEFAULT_TYPE


def _name_types() -> mimetypes.MimeTypes:
    # A private table: the global one also reads /etc/mime.types, which differs between
    # machines (Debian maps .ts to Qt Linguist). Python's own table lacks common media kinds.
    table = mimetypes.MimeTypes()
    for ext, kind in _MEDIA_EXTENSIONS.items():
        table.add_type(kind, ext)
    return table


_NAME_TYPES = _name_types()


def _probe(path: Path, mtime: int) -> MediaInfo | None:
    with av.open(str(path), "r", options=_PROBE_OPTIONS, timeout=_OPEN_TIMEOUT_S) as box:
        demuxer = box.format.name.split(",")[0]
        if demuxer not in _CONTAINER_TYPES:
            return None
        videos = [s for s in box.streams.video if s.codec_context.width > 0]
        audios = [s for s in box.streams.audio if s.codec_context.sample_rate > 0]
        if not videos and not audios:
            return None
        media_type = _CONTAINER_TYPES[demuxer]
        if demuxer in _REFINE_BY_EXTENSION:
            by_name = _type_from_name(path)
            if by_name.split("/")[0] in ("video", "audio", "image"):
                media_type = by_name
        video = videos[0] if videos else None
        return MediaInfo(
            media_type=media_type,
            duration_ms=_duration_ms(box),
            width=video.codec_context.width if video else None,
            height=video.codec_context.height if video else None,
            video_codec=video.codec_context.codec.canonical_name if video else None,
            audio_codec=audios[0].codec_context.codec.canonical_name if audios else None,
            created=_creation_time(box),
            file_mtime=mtime,
        )


def _duration_ms(box: Any) -> int | None:
    if box.duration is not None and box.duration > 0:
        return int(box.duration * 1000 // av.time_base)
    best: int | None = None
    for s in box.streams:
        if s.duration and s.time_base:
            ms = int(s.duration * s.time_base * 1000)
            best = ms if best is None else max(best, ms)
    return best


def _creation_time(box: Any) -> int | None:
    for meta in [box.metadata, *(s.metadata for s in box.streams)]:
        text = meta.get("creation_time")
        if not text:
            continue
        try:
            stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            continue
        if stamp.tzinfo is None:  # QuickTime stores UTC; FFmpeg may drop the suffix
            stamp = stamp.replace(tzinfo=UTC)
        seconds = int(stamp.timestamp())
        if seconds > 0:  # MP4 writers without a clock write 1904-01-01 or 1970-01-01
            return seconds
    return None


def _iso_utc(unix_seconds: int) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def _early_frame(path: Path) -> Any:
    """The first decodable video frame at or after about 1 s, else the first one seen.

    Decodes from the start instead of seeking: seeking in damaged or index-less files
    (MPEG-TS) is unreliable, and one second of decoding is cheap.
    """
    with av.open(str(path), "r", options=_PROBE_OPTIONS, timeout=_OPEN_TIMEOUT_S) as box:
        if box.format.name.split(",")[0] not in _CONTAINER_TYPES or not box.streams.video:
            return None
        stream = box.streams.video[0]
        first: Any = None
        for n, packet in enumerate(box.demux(stream)):
            if n >= _MAX_PACKETS:
                break
            try:
                frames = packet.decode()
            except av.FFmpegError:
                continue  # a damaged packet; later ones may decode
            for frame in frames:
                if first is None:
                    first = frame
                if frame.time is None or first.time is None:
                    return first
                if frame.time - first.time >= _THUMB_AT_S:
                    return frame
        return first


def _fit_jpeg(frame: Any, max_side: int, max_bytes: int) -> bytes | None:
    scale = min(1.0, max_side / max(frame.width, frame.height))
    width = max(2, int(frame.width * scale) // 2 * 2)
    height = max(2, int(frame.height * scale) // 2 * 2)
    while True:
        # Quality first, then size: a smaller clear picture beats a big blocky one.
        for q in (3, 6, 10, 16, 24, 31):
            data = _encode_jpeg(frame, width, height, q)
            if len(data) <= max_bytes:
                return data
        if width <= 16 or height <= 16:
            return None
        width, height = max(2, width // 2 // 2 * 2), max(2, height // 2 // 2 * 2)


def _encode_jpeg(frame: Any, width: int, height: int, q: int) -> bytes:
    ctx: Any = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuvj420p"
    ctx.time_base = Fraction(1, 25)
    ctx.qscale = True
    ctx.global_quality = q * _FF_QP2LAMBDA
    ctx.qmin = ctx.qmax = q
    scaled = frame.reformat(width=width, height=height, format="yuvj420p")
    scaled.pts = None
    packets = [*ctx.encode(scaled), *ctx.encode(None)]
    return b"".join(bytes(p) for p in packets)


_FF_QP2LAMBDA = 118  # FFmpeg's scale between quantiser and lambda (libavutil/avutil.h)
_SAMPLE_RATE = 44100


def _demo_frames(count: int, width: int, height: int, rng: random.Random) -> Iterator[Any]:
    # A luma row twice as wide, sliced at a moving offset, gives bars that scroll left; the
    # grain is XORed in as one big integer, which is fast in pure Python.
    row = bytes((x * 255 // width) & 0xF0 for x in range(2 * width))
    grain_mask = bytes(b & 0x1F for b in range(256))
    cw, ch = width // 2, height // 2
    luma_size = width * height
    for i in range(count):
        off = (i * 8) % width
        bars = row[off : off + width] * height
        grain = rng.randbytes(luma_size).translate(grain_mask)
        luma = (int.from_bytes(bars, "little") ^ int.from_bytes(grain, "little")).to_bytes(
            luma_size, "little"
        )
        frame = av.VideoFrame(width, height, "yuv420p")
        _fill_plane(frame.planes[0], luma, width, height)
        _fill_plane(frame.planes[1], bytes((x * 4 + i * 3) & 0xFF for x in range(cw)) * ch, cw, ch)
        _fill_plane(frame.planes[2], bytes([(i * 5) & 0xFF]) * (cw * ch), cw, ch)
        frame.pts = i
        yield frame


def _fill_plane(plane: Any, data: bytes, width: int, height: int) -> None:
    # FFmpeg may pad each line for alignment; copy line by line when it does.
    if plane.line_size == width:
        plane.update(data)
        return
    padded = bytearray(plane.line_size * height)
    for y in range(height):
        padded[y * plane.line_size : y * plane.line_size + width] = data[
            y * width : (y + 1) * width
        ]
    plane.update(bytes(padded))


def _tone_frames(seconds: float, tone_hz: float, rate: int = _SAMPLE_RATE) -> Iterator[Any]:
    total = int(seconds * rate)
    per_frame = 1152  # one MPEG audio frame
    for start in range(0, total, per_frame):
        n = min(per_frame, total - start)
        samples = [
            int(12000 * math.sin(2 * math.pi * tone_hz * (start + j) / rate))
            for j in range(n)
        ]
        stereo = [s for s in samples for _ in range(2)]
        frame = av.AudioFrame(format="s16", layout="stereo", samples=n)
        frame.planes[0].update(struct.pack(f"<{2 * n}h", *stereo))
        frame.sample_rate = rate
        frame.pts = start
        yield frame
