"""WebRTC between two NATed homes: first what each NAT does, then whether bytes get through.

Each case builds a fresh lab, checks each home's NAT as the STUN server sees it (one socket
asking two server addresses: the same public port for endpoint-independent mapping, two
ports for symmetric), then runs the answering and the dialing peer as real processes in the
home namespaces, signalling through a real rendezvous server on the public side.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.natlab.conftest import REPO, python_argv, start_public
from tests.natlab.lab import NatLab, NatMode, read_line

pytestmark = pytest.mark.netns

_BYTES = 2_000_000


def _mapping(lab: NatLab, host: str, stun_ports: list[int]) -> list[tuple[str, int]]:
    servers = [f"{a}:{p}" for a, p in zip(lab.server_addrs, stun_ports, strict=True)]
    r = lab.exec(host, python_argv("tests.natlab.peer", "probe", *servers), cwd=REPO)
    assert r.returncode == 0, r.stderr
    return [(ip, port) for ip, port in json.loads(r.stdout)["mapped"]]


def _assert_nat(lab: NatLab, host: str, router: str, mode: NatMode,
                stun_ports: list[int]) -> None:
    first, second = _mapping(lab, host, stun_ports)
    assert first[0] == second[0] == lab.addr_of(router), "the STUN server sees the NAT's address"
    if mode is NatMode.SYMMETRIC:
        assert first[1] != second[1], f"{host}: symmetric NAT kept one port for two servers"
    else:
        assert first[1] == second[1], f"{host}: {mode.value} NAT moved the port: {first} {second}"


def _transfer(lab: NatLab, rv_port: int, stun_port: int) -> tuple[dict[str, object],
                                                                   dict[str, object] | None]:
    server = lab.addr_of("server")
    common = ["--rv", f"{server}:{rv_port}", "--stun", f"{server}:{stun_port}"]
    bob = lab.run("h2", python_argv("tests.natlab.peer", "answer", *common, "--seed", "2",
                                    "--address", "bob@example.net"), cwd=REPO)
    assert read_line(bob, 30, "bob") == "ready"
    alice = lab.exec("h1", python_argv(
        "tests.natlab.peer", "dial", *common, "--seed", "1", "--address", "alice@example.net",
        "--to", "bob@example.net", "--to-seed", "2", "--bytes", str(_BYTES)), cwd=REPO,
        timeout=90)
    dialer = json.loads(alice.stdout.strip().splitlines()[-1])
    answerer = json.loads(read_line(bob, 30, "bob")) if dialer.get("ok") else None
    return dialer, answerer


@pytest.mark.parametrize(("h1", "h2"), [
    (NatMode.EIM, NatMode.EIM),
    (NatMode.FULL_CONE, NatMode.SYMMETRIC),
    (NatMode.SYMMETRIC, NatMode.FULL_CONE),
])
def test_webrtc_crosses_nats_that_allow_hole_punching(
        nat_lab: Callable[[NatMode, NatMode], NatLab], h1: NatMode, h2: NatMode) -> None:
    lab = nat_lab(h1, h2)
    rv_port, stun_ports = start_public(lab)
    _assert_nat(lab, "h1", "r1", h1, stun_ports)
    _assert_nat(lab, "h2", "r2", h2, stun_ports)

    dialer, answerer = _transfer(lab, rv_port, stun_ports[0])

    assert dialer["ok"], dialer
    assert answerer is not None and answerer["ok"]
    assert answerer["received"] == dialer["sent"] == _BYTES
    assert answerer["sha256"] == dialer["sha256"] == dialer["peer_sha256"]
    # The bytes went home to home through the NATs' public addresses.
    assert str(dialer["peer"]).startswith(lab.addr_of("r2") + ":")
    assert str(answerer["peer"]).startswith(lab.addr_of("r1") + ":")


def test_webrtc_between_two_symmetric_nats_fails_at_our_timeout(
        nat_lab: Callable[[NatMode, NatMode], NatLab]) -> None:
    lab = nat_lab(NatMode.SYMMETRIC, NatMode.SYMMETRIC)
    rv_port, stun_ports = start_public(lab)
    _assert_nat(lab, "h1", "r1", NatMode.SYMMETRIC, stun_ports)
    _assert_nat(lab, "h2", "r2", NatMode.SYMMETRIC, stun_ports)

    dialer, _ = _transfer(lab, rv_port, stun_ports[0])

    assert not dialer["ok"]
    assert str(dialer["error"]).startswith(
        "WebRtcConnectError: no WebRTC connection to bob@example.net within 10.0 s (ICE ")
    assert "srflx" in str(dialer["error"])  # our STUN answered; the punch itself failed
