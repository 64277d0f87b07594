"""The lab's server keeps its port across a restart, whatever else runs on the machine."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from overlay.app.lab import LocalNetwork


def test_the_port_stays_held_while_the_server_is_down(tmp_path: Path) -> None:
    # While the server was down, another process's outgoing connection could be given its
    # port, and the restart failed ("cannot listen on 127.0.0.1:42483: Address already in
    # use"). A bound port is never handed out to an outgoing connection, so the lab keeps
    # one bound: a plain bind to it fails while the server is down.
    with LocalNetwork(tmp_path / "net") as net:
        host, port = net.start_server()
        assert net.server is not None
        net.server.kill()
        with socket.socket() as other, pytest.raises(OSError) as exc:
            other.bind((host, port))
        assert exc.value.errno == errno.EADDRINUSE
        assert net.start_server() == (host, port)
        node = net.add_node("alice")
        net.start_node(node)
        assert net.cli_json(node, "info")["connected"] is True
