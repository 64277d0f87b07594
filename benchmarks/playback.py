"""Playback while downloading: a 100 MB WebM from a sender capped at 4 MB/s, in chromium.

`python -m benchmarks playback [--mb 100] [--rate-mb 4]`

A real server and two node processes (LocalNetwork); the sender runs with
`--max-upload-rate`, the receiver serves its web inbox. The clip is VP8 made with PyAV
from bytes (grain over a moving bar, a keyframe every second) at about 1.6 MB/s of media,
so 100 MB is about a minute of video: the download (25 s at 4 MB/s) is still running when
the seek to 80% asks for bytes the receiver does not have yet. Headless Debian chromium
(Playwright with `executable_path`) opens the message page as soon as the receiver shows
the message `downloading`, then measures:

- play() to the first frame presented (`requestVideoFrameCallback`), target < 1.5 s;
- a seek to 80% of the duration to the first frame presented there while playing,
  target < 3 s.

Also reported: how much of the file the receiver held at each moment (the seek must land
beyond it to mean anything), and the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av

from benchmarks.common import report
from overlay.app.control import ControlClient
from overlay.app.lab import LocalNetwork, NodeHandle

MB = 1_000_000
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required"]
MEDIA_RATE = 1.6 * MB  # bytes of clip per second of video the encoder settles at here

# play() -> first frame presented; the promise resolves with milliseconds.
_PLAY_JS = """() => new Promise((resolve, reject) => {
  const v = document.getElementById('player');
  v.muted = true;
  const t0 = performance.now();
  v.requestVideoFrameCallback(() => resolve(performance.now() - t0));
  v.play().catch(reject);
})"""

# seek -> the first frame presented at the target while playing (milliseconds).
_SEEK_JS = """(target) => new Promise((resolve) => {
  const v = document.getElementById('player');
  const t0 = performance.now();
  const check = (now, meta) => {
    if (!v.seeking && !v.paused && meta.mediaTime >= target - 0.05) {
      resolve(performance.now() - t0);
    } else {
      v.requestVideoFrameCallback(check);
    }
  };
  v.currentTime = target;
  v.requestVideoFrameCallback(check);
})"""


def make_clip(path: Path, size: int, *, width: int = 480, height: int = 272, fps: int = 25,
              bitrate: int = 14_000_000) -> float:
    """A VP8 WebM of about `size` bytes; returns its duration in seconds. Frames come from
    bytes (no numpy): grain from 8 random planes with a white bar moving over it."""
    seconds = max(4, round(size / MEDIA_RATE))
    rng = random.Random(11)
    grain = [rng.randbytes(width * height * 3) for _ in range(8)]
    row, bar = width * 3, b"\xff\xff\xff" * 32
    with av.open(str(path), "w", format="webm") as out:
        stream: Any = out.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = bitrate
        stream.gop_size = fps
        stream.options = {"deadline": "realtime", "cpu-used": "8", "minrate": str(bitrate),
                          "maxrate": str(bitrate), "b:v": str(bitrate)}
        for n in range(seconds * fps):
            data = bytearray(grain[n % len(grain)])
            x = (n * 4) % (width - 32)
            for y in range(height):
                data[y * row + x * 3: y * row + x * 3 + len(bar)] = bar
            frame = av.VideoFrame(width, height, "rgb24")
            frame.planes[0].update(bytes(data))
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return float(seconds)


async def _entry(control: Path, mid: str) -> dict[str, Any] | None:
    async with ControlClient(control) as client:
        for e in await client.call("inbox", include_junk=True):
            if e["id"] == mid:
                return dict(e)
    return None


def entry(node: NodeHandle, mid: str) -> dict[str, Any] | None:
    """The receiver's inbox row over its control socket (no CLI start per look), from a
    thread of its own: Playwright's sync API keeps an event loop running in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _entry(node.home / "control.sock", mid)).result()


def run(clip: Path, root: Path, rate: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    size = clip.stat().st_size
    with LocalNetwork(root / "lab") as net:
        net.start_server()
        alice = net.add_node("alice", extra=["--max-upload-rate", str(rate)])
        bob = net.add_node("bob", extra=["--web", "127.0.0.1:0"])
        net.start_node(alice)
        net.start_node(bob)
        base = json.loads((bob.home / "web.json").read_text())["url"]
        login = net.cli(bob, "web", "--url").stdout.strip()
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(root / "chromium-profile"), executable_path=shutil.which("chromium"),
                headless=True, args=CHROMIUM_ARGS)
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                t_origin = time.monotonic()
                ranges: list[dict[str, Any]] = []  # the player's /media requests, for meta

                def seen(req: Any) -> None:
                    if "/media/" in req.url:
                        ranges.append({"at": round(time.monotonic() - t_origin, 3),
                                       "range": req.headers.get("range")})

                def answered(resp: Any) -> None:
                    if "/media/" in resp.url:
                        ranges.append({"at": round(time.monotonic() - t_origin, 3),
                                       "status": resp.status,
                                       "range": resp.request.headers.get("range")})
                page.on("request", seen)
                page.on("response", answered)
                page.goto(login)
                t_send = time.time()
                mid = net.cli(alice, "send", str(clip), "--to", bob.address).stdout.strip()
                sent_s = time.time() - t_send
                net.wait_until(lambda: (e := entry(bob, mid)) and e["state"] == "downloading",
                               60, "bob downloading", interval=0.05)
                page.goto(f"{base}/message/{mid}")
                page.wait_for_selector("video#player")
                e = entry(bob, mid)
                held_play = e["progress"] if e else 0.0
                first_frame_ms = float(page.evaluate(_PLAY_JS))
                page.wait_for_function(
                    "() => document.getElementById('player').currentTime >= 1", timeout=30_000)
                duration = float(page.evaluate("() => document.getElementById('player')"
                                               ".duration"))
                e = entry(bob, mid)
                held_seek = e["progress"] if e else 0.0
                state_seek = e["state"] if e else "?"
                seek_at = round(time.monotonic() - t_origin, 3)
                seek_ms = float(page.evaluate(_SEEK_JS, 0.8 * duration))
            finally:
                ctx.close()
        got = net.wait_until(lambda: (e := entry(bob, mid)) and e["state"] == "complete" and e,
                             600, "bob's download")
        if Path(got["path"]).stat().st_size != size:
            raise SystemExit("the received clip differs in size")
        took = (got["completed_at"] or time.time()) - (got["first_byte_at"] or t_send)
        return {"first_frame_ms": first_frame_ms, "seek_ms": seek_ms, "duration": duration,
                "held_at_play": held_play, "held_at_seek": held_seek,
                "state_at_seek": state_seek, "send_seconds": sent_s,
                "seek_at": seek_at, "media_requests": ranges,
                "download_seconds": took, "download_rate": size / took if took > 0 else 0.0}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks playback")
    ap.add_argument("--mb", type=int, default=100, help="clip size in MB (10^6 bytes)")
    ap.add_argument("--rate-mb", type=float, default=4.0,
                    help="the sender's --max-upload-rate in MB/s")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default benchmarks/out/playback.json)")
    args = ap.parse_args(argv)
    if shutil.which("chromium") is None:
        print("needs Debian's chromium (apt-get install -y chromium) and playwright "
              "(pip install -e '.[test]')")
        return 2
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="peerpost-bench-") as tmp:
        clip = Path(tmp) / "clip.webm"
        t0 = time.perf_counter()
        make_clip(clip, args.mb * MB)
        made_s = time.perf_counter() - t0
        size = clip.stat().st_size
        r = run(clip, Path(tmp), int(args.rate_mb * MB))
    load_after = os.getloadavg()[0]
    rows: list[dict[str, Any]] = [
        {"metric": "clip (VP8 WebM)", "value": f"{size / MB:.1f} MB, {r['duration']:.1f} s",
         "unit": f"made in {made_s:.1f} s"},
        {"metric": "sender's upload cap", "value": args.rate_mb, "unit": "MB/s"},
        {"metric": "play() → first frame", "value": r["first_frame_ms"], "unit": "ms",
         "target": "< 1500", "ok": r["first_frame_ms"] < 1500},
        {"metric": "held by the receiver at play()", "value": 100 * r["held_at_play"],
         "unit": "%"},
        {"metric": "seek to 80% → playing there", "value": r["seek_ms"], "unit": "ms",
         "target": "< 3000", "ok": r["seek_ms"] < 3000},
        {"metric": "held by the receiver at the seek", "value": 100 * r["held_at_seek"],
         "unit": f"% ({r['state_at_seek']})", "target": "< 80 (downloading)",
         "ok": r["held_at_seek"] < 0.8 and r["state_at_seek"] == "downloading"},
        {"metric": "download, first byte to complete", "value": r["download_seconds"],
         "unit": f"s ({r['download_rate'] / MB:.2f} MB/s)"},
        {"metric": "load average (1 min) before / after",
         "value": f"{load_before:.2f} / {load_after:.2f}", "unit": f"{os.cpu_count()} CPUs"},
    ]
    report("playback", rows, out=args.out,
           meta={"bytes": size, "rate": int(args.rate_mb * MB), **r})
    return 0
