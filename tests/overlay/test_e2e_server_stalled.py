"""A server that holds its connections open but answers nothing (stopped, swapping, wedged):
`send` says so within the request timeout and leaves nothing half-sent."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork

pytestmark = pytest.mark.slow


def test_send_to_a_server_that_does_not_answer_says_so_and_sends_nothing(
        tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "net") as net:
        net.start_server()
        alice, bob = net.start_nodes("alice", "bob")
        clip = tmp_path / "clip.bin"
        clip.write_bytes(os.urandom(200_000))
        assert net.server is not None
        pid = net.server.popen.pid
        os.kill(pid, signal.SIGSTOP)  # the TCP connections stay up; nothing is read
        try:
            res = net.cli(alice, "send", str(clip), "--to", bob.address, check=False)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert res.returncode == 1
        err = " ".join(res.stderr.split())
        assert (f"your server did not answer when asked for {bob.address}'s keys (no reply "
                f"to FINGER from {net.server_hostport} within 10.0s), so nothing was sent: "
                "try again later") in err, err
        assert "Traceback" not in res.stderr
        assert net.cli_json(alice, "status") == []  # nothing half-sent
        assert net.cli_json(bob, "inbox", "--all") == []
        # Once it answers again, the same command works.
        mid = net.cli(alice, "send", str(clip), "--to", bob.address).stdout.strip()
        got = net.wait_complete(bob, mid, 30)
        assert Path(got["path"]).read_bytes() == clip.read_bytes()
        assert len(net.cli_json(bob, "inbox", "--all")) == 1
