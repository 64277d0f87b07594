"""A node whose first login gets a server error (500: the server's store failed) waits for
the server as it does for one it can't reach, says why in `info`, and logs in once the
cause is gone. It exited with 'the server refused this node's login: 500 ...'."""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork
from rendezvous.sqlite_store import DB_NAME

pytestmark = pytest.mark.slow

_READY = re.compile(r"^ready\b")


def test_a_server_error_at_the_first_login_is_waited_out(tmp_path: Path) -> None:
    with LocalNetwork(tmp_path / "net") as net:
        net.start_server()
        alice, bob = net.start_nodes("alice", "bob")
        net.stop_node(alice)
        # The login writes the device's last_seen; a trigger makes that write fail in the
        # real server's store, which answers '500 server error while authenticating'.
        db = sqlite3.connect(net.data_dir / DB_NAME, isolation_level=None)
        db.execute("CREATE TRIGGER fail_login BEFORE UPDATE ON devices "
                   "BEGIN SELECT RAISE(ABORT, 'the test fails the login'); END")
        try:
            net.start_node(alice, ready=False)
            assert alice.proc is not None
            alice.proc.lines.wait_for(
                re.compile("did not log this node in \\(500 server error while "
                           "authenticating\\); trying again"), 30, "alice waiting")
            assert alice.proc.alive()
            info = net.cli(alice, "info", check=False)
            assert info.returncode != 0
            assert ("did not log this node in (500 server error while authenticating); "
                    "next try at") in " ".join(info.stderr.split()), info.stderr
        finally:
            db.execute("DROP TRIGGER IF EXISTS fail_login")
            db.close()
        alice.proc.lines.wait_for(_READY, 60, "alice logging in once the store works")
        assert net.cli_json(alice, "info")["connected"] is True
        clip = tmp_path / "clip.bin"
        clip.write_bytes(os.urandom(100_000))
        mid = net.cli(alice, "send", str(clip), "--to", bob.address).stdout.strip()
        got = net.wait_complete(bob, mid, 60)
        assert Path(got["path"]).read_bytes() == clip.read_bytes()
        assert "refused this node's login" not in alice.proc.log()
