"""The demo's clip is one a browser plays in the web inbox, and its summary line names
only what the clip has."""

from __future__ import annotations

from pathlib import Path

import av

from overlay.app.demo import clip_summary
from overlay.app.web.server import media_kind
from overlay.mail.describe import MediaInfo, describe_media, make_demo_clip, webm_audio_codec


def test_the_demo_clip_is_webm_vp8_with_sound_a_browser_plays(tmp_path: Path) -> None:
    path = tmp_path / "grandma-90th.webm"
    make_demo_clip(path, seconds=2.0, width=160, height=96)
    info = describe_media(path)
    assert info.media_type == "video/webm"
    assert info.video_codec == "vp8"
    want_audio = {"libopus": "opus", "libvorbis": "vorbis", None: None}[webm_audio_codec()]
    assert info.audio_codec == want_audio
    assert info.duration_ms is not None and 1800 <= info.duration_ms <= 2300
    assert media_kind(info.media_type, path.name) == ("video", "video/webm")
    # Sound and picture are interleaved from the start (a browser reads it in order while
    # it arrives), not all the sound after all the video.
    with av.open(str(path)) as box:
        kinds = [p.stream.type for p in box.demux() if p.size][:20]
    if want_audio:
        assert "audio" in kinds[:4] and "video" in kinds[:4]


def test_the_summary_leaves_out_what_the_clip_lacks() -> None:
    silent = MediaInfo("video/webm", 12_000, 640, 360, "vp8", None, None, 0)
    assert clip_summary(silent) == "vp8, 640x360, 12.0 s"
    both = MediaInfo("video/webm", 2_000, 640, 360, "vp8", "opus", None, 0)
    assert clip_summary(both) == "vp8 + opus, 640x360, 2.0 s"
    assert "None" not in clip_summary(MediaInfo("video/webm", None, None, None, None, None,
                                                None, 0))
