"""Media description, thumbnails and the demo clip, against real files written by PyAV."""

from __future__ import annotations

import os
from pathlib import Path

import av
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.mail.describe import (
    DEFAULT_TYPE,
    MediaInfo,
    _tone_frames,
    describe_media,
    make_demo_clip,
    make_thumbnail,
)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("media") / "clip.ts"
    make_demo_clip(path, seconds=2.0)
    return path


def _plain(info: MediaInfo) -> bool:
    return (
        info.duration_ms is None
        and info.width is None
        and info.height is None
        and info.video_codec is None
        and info.audio_codec is None
        and info.created is None
    )


def test_demo_clip_describes_as_mpeg2_video_with_mp3(clip: Path) -> None:
    info = describe_media(clip)
    assert info.media_type == "video/mp2t"
    assert (info.width, info.height) == (640, 360)
    assert info.video_codec == "mpeg2video"
    assert info.audio_codec == "mp3"
    assert info.duration_ms is not None and 1800 <= info.duration_ms <= 2300
    assert info.file_mtime == int(clip.stat().st_mtime)
    assert info.created is None  # MPEG-TS has no creation time


def test_mp4_carries_creation_time(tmp_path: Path) -> None:
    path = tmp_path / "holiday.mp4"
    make_demo_clip(path, seconds=1.0, width=160, height=96, created=1_600_000_000)
    info = describe_media(path)
    assert info.media_type == "video/mp4"
    assert info.created == 1_600_000_000
    assert (info.width, info.height) == (160, 96)


def test_demo_clip_does_not_compress_away(clip: Path) -> None:
    # 2 s at 640x360 with grain: well above what flat colour would cost.
    assert clip.stat().st_size > 200_000


def _id3v2_tag(payload: int) -> bytes:
    """An ID3v2.3 tag holding one PRIV frame of `payload` zero bytes (as cover art would)."""
    frame = b"PRIV" + (payload + 2).to_bytes(4, "big") + b"\0\0" + b"x\0" + bytes(payload)
    n = len(frame)
    syncsafe = bytes((n >> shift) & 0x7F for shift in (21, 14, 7, 0))
    return b"ID3\x03\x00\x00" + syncsafe + frame


@pytest.mark.parametrize("name", ["song.mp3", "song"])
def test_mp3_behind_a_tag_bigger_than_the_format_probe_is_still_audio(
    tmp_path: Path, name: str
) -> None:
    raw = tmp_path / "raw.mp3"
    with av.open(str(raw), "w", format="mp3", options={"id3v2_version": "0"}) as out:
        stream = out.add_stream("mp3", rate=44100)
        stream.layout = "stereo"
        for frame in _tone_frames(2.0, 440.0, 44100):
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    path = tmp_path / name
    path.write_bytes(_id3v2_tag(1536 * 1024) + raw.read_bytes())
    info = describe_media(path)
    assert (info.media_type, info.audio_codec, info.video_codec) == ("audio/mpeg", "mp3", None)
    assert info.duration_ms is not None and 1800 <= info.duration_ms <= 2300


def test_bitrate_makes_a_bigger_file(tmp_path: Path) -> None:
    path = tmp_path / "big.ts"
    make_demo_clip(path, seconds=1.0, bitrate=16_000_000)
    # 16 Mbit/s for 1 s is 2 MB; rate control lands near it.
    assert path.stat().st_size > 1_000_000


def test_thumbnail_is_a_small_jpeg(clip: Path) -> None:
    thumb = make_thumbnail(clip)
    assert thumb is not None
    assert thumb[:2] == b"\xff\xd8" and thumb[-2:] == b"\xff\xd9"
    assert len(thumb) <= 32 * 1024


def test_thumbnail_respects_a_tight_byte_limit(clip: Path) -> None:
    thumb = make_thumbnail(clip, max_side=640, max_bytes=4000)
    assert thumb is not None and len(thumb) <= 4000 and thumb[:2] == b"\xff\xd8"


def test_thumbnail_is_none_for_non_video(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 100)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert make_thumbnail(text) is None
    assert make_thumbnail(empty) is None


def test_text_and_empty_files_describe_as_data(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    info = describe_media(text)
    assert info.media_type == "text/plain" and _plain(info)
    info = describe_media(empty)
    assert info.media_type == DEFAULT_TYPE and _plain(info)


def test_fifo_and_folder_describe_as_data_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.ts"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer for ever
    assert _plain(describe_media(fifo))
    assert make_thumbnail(fifo) is None
    assert _plain(describe_media(tmp_path))
    assert make_thumbnail(tmp_path) is None


@pytest.mark.parametrize("keep", [0, 100, 188 * 3, 4096, 60_000])
def test_truncated_clip_never_raises(clip: Path, tmp_path: Path, keep: int) -> None:
    cut = tmp_path / "cut.ts"
    cut.write_bytes(clip.read_bytes()[:keep])
    info = describe_media(cut)
    assert info.media_type in ("video/mp2t", "video/mpeg")
    thumb = make_thumbnail(cut)
    assert thumb is None or (thumb[:2] == b"\xff\xd8" and len(thumb) <= 32 * 1024)
    if keep < 188 * 2:  # not even two transport packets: nothing to describe
        assert _plain(info)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=20_000))
def test_random_bytes_describe_as_data(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    info = describe_media(path)
    assert info.media_type == DEFAULT_TYPE and _plain(info)
    assert make_thumbnail(path) is None


def test_many_random_files_stay_data(tmp_path: Path) -> None:
    # FFmpeg does "recognise" some random inputs as obscure formats; those must not leak.
    path = tmp_path / "blob.dat"
    for size in (1, 10, 100, 1000, 5000) * 20:
        path.write_bytes(os.urandom(size))
        info = describe_media(path)
        assert _plain(info), info
