"""Per-address limits against a client that owns a whole IPv6 /64, with real processes:
`peerpost-rendezvous serve --sessions-per-ip 2` in a namespace where 2001:db8:1:2::/64 and
2001:db8:1:3::/64 are local (routed to the loopback, as a VPS's /64 is to its host), and a
client process there that takes a fresh source address from its /64 for every session,
STUN request and DHT request (tests/natlab/v6_sources.py; the server is plaintext so that
the client can speak the protocol by hand). Every address is real to the
kernel, so the server sees as many peers as the client picks; the /64 still gets one
allowance, and a source of the other /64 is served beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self

import pytest

from overlay.app.lab import LISTENING, _script, listening
from tests.natlab.conftest import REPO, python_argv
from tests.natlab.lab import read_line
from tests.natlab.test_quic_ipv6 import HOST, Ipv6Host

pytestmark = pytest.mark.netns

SERVER = "2001:db8:1:2::1"


class TwoPrefixes(Ipv6Host):
    """`Ipv6Host` with two /64s routed to its loopback: any address in them can be bound
    (net.ipv6.ip_nonlocal_bind) and is delivered locally."""

    def up(self) -> Self:
        if self.log_dir is not None:  # the server's stderr goes there
            self.log_dir.mkdir(parents=True, exist_ok=True)
        super().up()
        try:
            for prefix in ("2001:db8:1:2::/64", "2001:db8:1:3::/64"):
                self._ip("-6", "route", "add", "local", prefix, "dev", "lo", ns=HOST)
            self._sysctl(HOST, "net.ipv6.ip_nonlocal_bind=1")
        except BaseException:
            self.down()
            raise
        return self


def _serve(lab: TwoPrefixes, data: Path) -> dict[str, tuple[str, int]]:
    """Start the server; its services by name ("" the mailbox, "stun", "dht", ...)."""
    proc = lab.run(HOST, [_script("peerpost-rendezvous"), "serve", "--domain", "example.net",
                          "--listen", f"[{SERVER}]:0", "--data", str(data),
                          "--open-registration", "--plaintext", "--sessions-per-ip", "2"])
    found: dict[str, tuple[str, int]] = {}
    while len(found) < 4:  # the mailbox, stun, dht, stun_tcp
        m = LISTENING.match(read_line(proc, 30, "peerpost-rendezvous serve"))
        if m is not None:
            name, addr = listening(m)
            found[name] = addr
    return found


def test_one_64_gets_one_allowance_of_sessions_stun_and_dht(
        natlab_available: None, tmp_path: Path) -> None:
    with TwoPrefixes(log_dir=tmp_path / "lab") as lab:
        services = _serve(lab, tmp_path / "data")
        assert {host for host, _ in services.values()} == {SERVER}
        probe = lab.exec(HOST, python_argv("tests.natlab.v6_sources", SERVER,
                                           str(services[""][1]), str(services["stun"][1]),
                                           str(services["dht"][1])),
                         cwd=REPO, timeout=60)
        if probe.returncode != 0:
            raise AssertionError(f"the probe failed:\n{probe.stderr}")
        got = json.loads(probe.stdout)
    ok, limited = ("authenticated",
                   "2 sessions are already open from your network (IPv6 /64), the limit")
    assert [s[1:] for s in got["sessions"]] == [
        [200, ok], [200, ok], [429, limited], [200, ok]], got["sessions"]
    # Of the fresh sources, the /64's one burst and what its rate refilled while the
    # server took them: no more than over the probe's span from its first request to its
    # last reply. A fixed 215 failed at load ~8 with 220; 3 probes at once beside 4 busy
    # loops took the DHT's 300 in 0.15-0.40 s and 206-219 were answered.
    fresh, other, seconds = got["stun"]
    assert 40 <= fresh <= 40 + 20 * seconds + 1 and fresh < 100, got["stun"]  # burst 40, 20/s
    assert other == 1, got["stun"]
    fresh, other, seconds = got["dht"]
    assert 200 <= fresh <= 200 + 50 * seconds + 1 and fresh < 300, got["dht"]  # 200, 50/s
    assert other == 1, got["dht"]

