"""End to end: recipients whose co-recipient sourcing is off (`--no-co-recipients`) fetch
from the sender alone, and say so when they open the clip, so the sender, super-seeding
among several recipients (overlay/transfer/superseed.py), shows each of them every chunk:
one that opens while another fetches has its clip at once, not after the downloader's
probe wait (`PROBE_AFTER`), with real server and node processes on loopback."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork
from overlay.transfer.downloader import PROBE_AFTER
from tests.overlay.test_e2e_cli import MiB, make_file, same_bytes
from tests.overlay.test_metrics_units import KiB, fetch, metrics_url, samples

pytestmark = pytest.mark.slow


def test_recipients_that_fetch_only_from_the_sender_do_not_wait_for_one_still_fetching(
        tmp_path: Path) -> None:
    """r1 opens the clip and asks for both its chunks, and stops there (its host asleep:
    SIGSTOP, its session and requests standing at the sender). r2 and r3 then open it:
    before, the sender showed them nothing, every chunk being asked for already, and each
    got its clip only after probing (5 s); now each has it within a second or two of
    starting, and the sender answered no probe and sent no HAVE."""
    with LocalNetwork(tmp_path / "lab") as net:
        net.start_server()
        alice = net.add_node("alice", extra=["--metrics", "127.0.0.1:0"])
        r1, r2, r3 = (net.add_node(n, extra=["--no-co-recipients"]) for n in ("r1", "r2", "r3"))
        net.start_node(alice)
        net.start_node(r1)
        assert alice.proc is not None and r1.proc is not None
        url = metrics_url(alice.proc.log()) + "/metrics"

        def served() -> dict[str, float]:
            return {dict(labels)["event"]: v for (name, labels), v in
                    samples(fetch(url)[1]).items()
                    if name == "peerpost_node_upload_events_total"}

        # 2 MiB at 64 KiB/s: r1 alone would need 32 s, so it is still fetching when stopped.
        net.cli(alice, "prefs", "set", "max-upload-rate", str(64 * KiB))
        src = make_file(tmp_path / "clip.bin", 2 * MiB, seed=41)
        mid = net.cli(alice, "send", str(src), "--to",
                      ",".join(n.address for n in (r1, r2, r3))).stdout.strip()
        net.wait_until(lambda: served().get("opened", 0) >= 1, 60, "r1 opening the clip")
        pid = r1.proc.popen.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            net.cli(alice, "prefs", "set", "max-upload-rate", "none")
            net.start_node(r2)
            net.start_node(r3)
            got = {n.name: net.wait_complete(n, mid, 60, f"{n.name}'s download")
                   for n in (r2, r3)}
            during = served()
        finally:
            os.kill(pid, signal.SIGCONT)
        got["r1"] = net.wait_complete(r1, mid, 60, "r1's download once woken")

    for name, entry in got.items():
        assert same_bytes(src, Path(entry["path"])), name
    assert during.get("opened", 0) == 3  # r2 and r3 opened it while r1 had it open
    for name in ("r2", "r3"):
        took = got[name]["completed_at"] - got[name]["started_at"]
        assert took < PROBE_AFTER / 2, f"{name} took {took:.2f} s"
    assert during.get("super_seed_probes", 0) == 0, during
    assert during.get("super_seed_haves", 0) == 0, during
    assert during.get("first_not_shown", 0) == 0, during
