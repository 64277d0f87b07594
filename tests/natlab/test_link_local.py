"""The TCP punch and QUIC on a LAN with no DHCP: a real `peerpost-rendezvous serve` and two
peers on one link (a bridge), each with an IPv4 link-local address (169.254/16) only, so
the server's STUN sees each peer at its link-local address, and that is its public
candidate. Both rungs carry the bytes across the link; the answering peer used to refuse
such an offer as invalid ('the public candidate ... is link-local'), so the dialler waited
out its budget and the pair lost both rungs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overlay.app.lab import LISTENING, _script, listening
from tests.natlab.conftest import REPO, python_argv
from tests.natlab.lab import NatLab, read_line

pytestmark = pytest.mark.netns

ADDRS = {"server": "169.254.0.10", "h1": "169.254.1.1", "h2": "169.254.2.2"}
BYTES = 1_000_000


class LinkLab(NatLab):
    """The server, h1 and h2 on one bridge, with an IPv4 link-local address each."""

    def __init__(self, *, log_dir: Path | None = None) -> None:
        super().__init__(log_dir=log_dir)
        self.hosts = ("server", "h1", "h2", "inet")

    def addr_of(self, host: str) -> str:
        return ADDRS[host]

    def _build(self) -> None:
        for host, address in ADDRS.items():
            self._wire(host, "eth0", host, [f"{address}/16"])


def _serve(lab: LinkLab, data: Path) -> dict[str, tuple[str, int]]:
    """A plaintext `serve` on the server's link-local address: its services' addresses."""
    proc = lab.run("server", [_script("peerpost-rendezvous"), "serve", "--domain",
                              "example.net", "--data", str(data), "--listen",
                              f"{ADDRS['server']}:0", "--plaintext", "--open-registration"],
                   cwd=REPO)
    found: dict[str, tuple[str, int]] = {}
    while len(found) < 4:  # the mailbox, STUN, the DHT and STUN over TCP
        m = LISTENING.match(read_line(proc, 30, "serve"))
        if m is not None:
            name, where = listening(m)
            found[name] = where
    return found


@pytest.mark.parametrize(("rung", "stun"), [("tcp-punch", "stun_tcp"), ("quic", "stun")])
def test_a_pair_on_one_link_with_no_dhcp_meets_on_its_link_local_addresses(
        natlab_available: None, tmp_path: Path, rung: str, stun: str) -> None:
    with LinkLab(log_dir=tmp_path / "lab") as lab:
        services = _serve(lab, tmp_path / "rv")
        stun_at = f"{ADDRS['server']}:{services['stun'][1]}"
        # What the server's STUN sees of h1: its link-local address, as its public one.
        r = lab.exec("h1", python_argv("tests.natlab.peer", "probe", stun_at, stun_at),
                     cwd=REPO)
        assert r.returncode == 0, r.stderr
        assert [m[0] for m in json.loads(r.stdout)["mapped"]] == [ADDRS["h1"]] * 2

        common = ["--rv", f"{ADDRS['server']}:{services[''][1]}", "--stun",
                  f"{ADDRS['server']}:{services[stun][1]}", "--rung", rung, "--timeout", "5"]
        bob = lab.run("h2", python_argv("tests.natlab.peer", "answer", *common, "--seed", "2",
                                        "--address", "bob@example.net"), cwd=REPO)
        assert read_line(bob, 30, "bob") == "ready"
        alice = lab.exec("h1", python_argv(
            "tests.natlab.peer", "dial", *common, "--seed", "1", "--address",
            "alice@example.net", "--to", "bob@example.net", "--to-seed", "2", "--bytes",
            str(BYTES)), cwd=REPO, timeout=60)
        dialer = json.loads(alice.stdout.strip().splitlines()[-1])
        assert dialer["ok"], dialer
        answerer = json.loads(read_line(bob, 30, "bob"))
        assert answerer["ok"] and answerer["received"] == dialer["sent"] == BYTES
        assert answerer["sha256"] == dialer["sha256"] == dialer["peer_sha256"]
        # Across the link, between the two link-local addresses.
        assert str(dialer["peer"]).startswith(f"{ADDRS['h2']}:"), dialer
        assert str(answerer["peer"]).startswith(f"{ADDRS['h1']}:"), answerer
