"""End to end across two domains: real `peerpost-rendezvous serve` processes for a.test
and b.test (each with its own --data and domain key), one dnsmasq serving what each one's
`dns-records` prints, and nodes made with `peerpost init --address NAME@DOMAIN` alone
(PEERPOST_RESOLVER names the dnsmasq), driven through the `peerpost` CLI: mail waits at
the sender's server while the other domain is offline or down, survives a kill -9 of that
server, arrives once, bounces when it expires, and a server that does not prove the
domain key DNS publishes is refused by nodes and by other servers alike.

Each server listens on a port chosen (bound, read back, released) before DNS is written,
since the records must name the port before a server that is "down" ever starts; a
restart reuses it, as a real deployment's fixed port."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from overlay.app.lab import LocalNetwork, NodeHandle, _script
from rendezvous.dns import DnsResolver
from rendezvous.domainkey import fingerprint, load_or_create
from rendezvous.federation import LinkClient
from rendezvous.messages import Send, SendItem
from rendezvous.status import Status
from tests.dnstest import Dnsmasq
from tests.web.test_web_access import request
from tests.web.test_web_actions import login

pytestmark = pytest.mark.slow

A, B = "a.test", "b.test"
RENDEZVOUS = _script("peerpost-rendezvous")
# Each domain's server; the DHT bootstrap node and STUN beside it, as in service.
SERVER_ARGS = ["--dht-port", "0", "--stun-port", "0"]


def dns_records(data: Path, domain: str, port: int) -> list[str]:
    res = subprocess.run([RENDEZVOUS, "dns-records", "--data", str(data), "--domain",
                          domain, "--host", f"rv.{domain}", "--port", str(port)],
                         capture_output=True, text=True, timeout=60, check=True)
    return res.stdout.splitlines()


def closed_port() -> int:
    """A loopback TCP port nobody listens on now (bound, read back, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


@dataclass
class Domain:
    """One domain: its LocalNetwork (server + nodes) on a port fixed before DNS."""

    net: LocalNetwork
    port: int

    @property
    def name(self) -> str:
        return self.net.domain

    def start(self) -> None:
        self.net.server_addr = ("127.0.0.1", self.port)  # listen there (start_server)
        self.net.start_server()

    def init(self, name: str, *, check: bool = True,
             server: str | None = None) -> tuple[NodeHandle, subprocess.CompletedProcess[str]]:
        """`peerpost init --address NAME@DOMAIN` through DNS (or `--server`)."""
        node = NodeHandle(name, f"{name}@{self.name}", self.net.root / name)
        args = ["init", "--address", node.address, "--listen", "127.0.0.1:0"]
        if server is not None:
            args += ["--server", server]
        res = self.net.cli(node, *args, check=check)
        if res.returncode == 0:
            self.net.nodes[name] = node
        return node, res

    def wait_log(self, pattern: str, timeout: float = 60.0) -> str:
        """The next line of the server's log matching `pattern` (after those read)."""
        assert self.net.server is not None
        m = self.net.server.lines.wait_for(re.compile(pattern), timeout,
                                           f"{self.name}'s server")
        return m.string


class World:
    """a.test and b.test, their DNS, and the helpers the tests share."""

    def __init__(self, root: Path, dns_server: Callable[..., Dnsmasq],
                 server_args: dict[str, list[str]]) -> None:
        self.domains: dict[str, Domain] = {}
        for d in (A, B):
            self.domains[d] = Domain(
                LocalNetwork(root / d, domain=d, server_args=SERVER_ARGS + server_args.get(d, [])),
                closed_port())
        lines: list[str] = []
        for dom in self.domains.values():
            lines += dns_records(dom.net.data_dir, dom.name, dom.port)
        self.ns = dns_server(lines, {f"rv.{d}": "127.0.0.1" for d in self.domains})
        for dom in self.domains.values():
            dom.net.env["PEERPOST_RESOLVER"] = self.ns.hostport
            dom.net.env["COLUMNS"] = "400"  # rich: `status` rows on one line each

    @property
    def a(self) -> Domain:
        return self.domains[A]

    @property
    def b(self) -> Domain:
        return self.domains[B]

    def close(self) -> None:
        for dom in self.domains.values():
            dom.net.close()


@pytest.fixture
def make_world(tmp_path: Path,
               dns_server: Callable[..., Dnsmasq]) -> Iterator[Callable[..., World]]:
    made: list[World] = []

    def make(**server_args: list[str]) -> World:
        w = World(tmp_path, dns_server, {k.replace("_", "."): v for k, v in server_args.items()})
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def send(dom: Domain, node: NodeHandle, src: Path, to: str) -> str:
    mid = dom.net.cli(node, "send", str(src), "--to", to).stdout.strip()
    assert len(mid) == 32, mid
    return mid


def complete(dom: Domain, node: NodeHandle, mid: str) -> dict[str, Any] | None:
    e = dom.net.inbox_entry(node, mid)
    return e if e and e["state"] == "complete" else None


def shown(dom: Domain, node: NodeHandle, mid: str, to: str) -> str:
    """What `peerpost status` shows for recipient `to` of message `mid`."""
    for m in dom.net.cli_json(node, "status"):
        if m["id"] == mid:
            for r in m["recipients"]:
                if r["address"] == to:
                    return str(r.get("shown") or r["state"])
    return ""


def status_table(dom: Domain, node: NodeHandle) -> str:
    return flat(dom.net.cli(node, "status").stdout)


def sent_page(dom: Domain, node: NodeHandle) -> str:
    """The web inbox's Sent page of `node`, as its owner sees it."""
    base, headers = login(dom.net, node)
    status, _, page = request(base, "GET", "/sent", {"Cookie": headers["Cookie"]})
    assert status == 200, page
    return page.decode()


KEEP_ON = '<p id="sent-owed" class="warn">Keep this computer on, with peerpost running'
KEEP_ON_CLI = "Keep this computer on, with peerpost running, until everyone has what you sent"


def make_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def deliver_once(w: World, alice: NodeHandle, bob: NodeHandle, src: Path, mid: str) -> None:
    """bob downloads `mid` byte-equal, and his inbox lists it once."""
    got = w.b.net.wait_until(lambda: complete(w.b, bob, mid), 120, "bob's download")
    assert got["from"] == alice.address
    assert Path(got["path"]).read_bytes() == src.read_bytes()
    assert [e["id"] for e in w.b.net.cli_json(bob, "inbox", "--all")].count(mid) == 1


def alice_and_bob(w: World) -> tuple[NodeHandle, NodeHandle]:
    """Both servers up; alice at a.test and bob at b.test, their nodes running."""
    w.a.start()
    w.b.start()
    alice, _ = w.a.init("alice")
    bob, _ = w.b.init("bob")
    w.a.net.start_node(alice)
    w.b.net.start_node(bob)
    return alice, bob


def bob_known_then_b_down(w: World, tmp_path: Path) -> tuple[NodeHandle, NodeHandle]:
    """`alice_and_bob`; a first message pins bob's keys at alice and bob's receipt of it
    is in; then b.test goes down, bob's node with it."""
    alice, bob = alice_and_bob(w)
    first = make_file(tmp_path / "first.bin", 1 << 20)
    first_mid = send(w.a, alice, first, bob.address)
    deliver_once(w, alice, bob, first, first_mid)
    assert w.a.net.wait_until(lambda: shown(w.a, alice, first_mid, bob.address)
                              == "downloaded", 60, "bob's receipt of the first at alice")
    w.b.net.stop_node(bob)
    assert w.b.net.server is not None
    w.b.net.server.stop()
    return alice, bob


def test_bob_offline_at_send_gets_it_once_when_he_comes_online(
        make_world: Callable[..., World], tmp_path: Path) -> None:
    w = make_world()
    w.a.start()
    w.b.start()
    alice, _ = w.a.init("alice")
    bob, _ = w.b.init("bob")
    w.a.net.start_node(alice)
    src = make_file(tmp_path / "clip.bin", 3 << 20)

    mid = send(w.a, alice, src, bob.address)  # bob's node is not running
    w.a.wait_log(r"event=outbound\.delivered .*to=bob@b\.test")
    assert w.a.net.wait_until(lambda: shown(w.a, alice, mid, bob.address) == "delivered to b.test",
                              60, "status 'delivered to b.test'")

    w.b.net.start_node(bob)
    deliver_once(w, alice, bob, src, mid)
    assert w.a.net.wait_until(lambda: shown(w.a, alice, mid, bob.address) == "downloaded",
                              60, "bob's receipt at alice")
    assert [e["id"] for e in w.b.net.cli_json(bob, "inbox", "--all")] == [mid]


def test_b_down_then_a_killed_while_waiting_nothing_lost_delivered_once(
        make_world: Callable[..., World], tmp_path: Path) -> None:
    w = make_world()
    alice, bob = bob_known_then_b_down(w, tmp_path)  # then alice sends
    src = make_file(tmp_path / "second.bin", 2 << 20)
    mid = send(w.a, alice, src, bob.address)
    w.a.wait_log(r"event=outbound\.retry domain=b\.test")
    waiting = re.compile(r"^queued at a\.test \(b\.test unreachable since "
                         r"\d{4}-\d\d-\d\d \d\d:\d\d UTC\)$")
    line = w.a.net.wait_until(lambda: waiting.match(shown(w.a, alice, mid, bob.address)),
                              60, "status 'queued at a.test (b.test unreachable since ...)'")
    assert line.string in status_table(w.a, alice)

    # kill -9 of a.test's server while the message waits; then it comes back, then b.test.
    assert w.a.net.server is not None
    w.a.net.server.kill()
    w.a.start()
    w.a.wait_log(r"event=outbound\.retry domain=b\.test")  # the queue survived the crash
    w.b.start()
    w.a.wait_log(r"event=outbound\.delivered .*to=bob@b\.test", timeout=90)
    assert w.a.net.wait_until(
        lambda: shown(w.a, alice, mid, bob.address) == "delivered to b.test",
        90, "status 'delivered to b.test'")  # alice's node reconnects to a.test first

    w.b.net.start_node(bob)
    deliver_once(w, alice, bob, src, mid)
    assert w.a.net.wait_until(lambda: shown(w.a, alice, mid, bob.address) == "downloaded",
                              60, "bob's receipt at alice")
    ids = [e["id"] for e in w.b.net.cli_json(bob, "inbox", "--all")]
    assert len(ids) == 2 and ids.count(mid) == 1  # the first message and this one, once


def test_the_sent_page_asks_to_stay_on_until_a_foreign_recipient_has_downloaded(
        make_world: Callable[..., World], tmp_path: Path) -> None:
    """Mail to bob at b.test, queued at a.test while b.test is down, then delivered there
    with bob's node off: alice's Sent page asks her to keep her computer on, since bob
    downloads from it. It did not: only a recipient shown `sent` or `downloading` counted,
    and a foreign one is shown by what the server says of its forwarding."""
    w = make_world()
    alice, bob = bob_known_then_b_down(w, tmp_path)
    assert KEEP_ON not in sent_page(w.a, alice)  # bob has the first message
    assert KEEP_ON_CLI not in status_table(w.a, alice)
    src = make_file(tmp_path / "second.bin", 2 << 20)
    mid = send(w.a, alice, src, bob.address)
    w.a.net.wait_until(lambda: shown(w.a, alice, mid, bob.address).startswith(
        "queued at a.test (b.test unreachable since "), 60, "status 'queued at a.test (...)'")
    page = sent_page(w.a, alice)
    assert "queued at a.test (b.test unreachable since " in page and KEEP_ON in page
    assert KEEP_ON_CLI in status_table(w.a, alice)

    w.b.start()
    w.a.wait_log(r"event=outbound\.delivered .*to=bob@b\.test", timeout=90)
    w.a.net.wait_until(lambda: shown(w.a, alice, mid, bob.address) == "delivered to b.test",
                       90, "status 'delivered to b.test'")
    page = sent_page(w.a, alice)
    assert "delivered to b.test" in page and KEEP_ON in page
    assert KEEP_ON_CLI in status_table(w.a, alice)

    # Once bob has it, nobody needs alice's computer: the page says so no more.
    w.b.net.start_node(bob)
    deliver_once(w, alice, bob, src, mid)
    w.a.net.wait_until(lambda: shown(w.a, alice, mid, bob.address) == "downloaded", 60,
                       "bob's receipt at alice")
    assert KEEP_ON not in sent_page(w.a, alice)
    assert KEEP_ON_CLI not in status_table(w.a, alice)


def test_a_server_without_the_published_key_is_refused_by_nodes_and_servers(
        make_world: Callable[..., World], tmp_path: Path) -> None:
    w = make_world()
    real_b = load_or_create(w.b.net.data_dir)  # what _peerpost.b.test TXT publishes
    # The impostor: a b.test server at the published address with a key of its own.
    w.b.net.data_dir.rename(tmp_path / "real-b-data")
    w.a.start()
    w.b.start()
    fake = load_or_create(w.b.net.data_dir)  # made by the impostor's serve
    assert fake.public != real_b.public

    # A node refuses it at init, before registering.
    bob, res = w.b.init("bob", check=False)
    assert res.returncode != 0
    assert (f"refusing the server at 127.0.0.1:{w.b.port}: it shows the key "
            f"{fingerprint(fake.public)}, but _peerpost.b.test TXT publishes "
            f"{fingerprint(real_b.public)}") in flat(res.stderr), res.stderr
    assert not (bob.home / "config.json").exists()

    # a.test refuses to link to it: alice's send says the domain is out of reach, and
    # a.test's log says why.
    alice, _ = w.a.init("alice")
    w.a.net.start_node(alice)
    src = make_file(tmp_path / "x.bin", 1 << 20)
    res = w.a.net.cli(alice, "send", str(src), "--to", "bob@b.test", check=False)
    assert res.returncode != 0
    assert "b.test is unreachable: " in flat(res.stderr), res.stderr
    assert "bob@b.test's keys are unknown, so nothing was sent" in flat(res.stderr), res.stderr
    line = w.a.wait_log(r"event=link\.identity_mismatch remote=b\.test")
    assert (f"did not prove the domain key DNS publishes for it: it shows "
            f"{fingerprint(fake.public)}, DNS publishes {fingerprint(real_b.public)}") in line

    # The impostor's mail is not accepted: a user of it (trusting it on first use) sends
    # to alice, and a.test refuses the impostor's link.
    mallory, _ = w.b.init("mallory", server=f"127.0.0.1:{w.b.port}")
    w.b.net.start_node(mallory)
    res = w.b.net.cli(mallory, "send", str(src), "--to", alice.address, check=False)
    assert res.returncode != 0
    assert "a.test is unreachable: " in flat(res.stderr), res.stderr
    assert "alice@a.test's keys are unknown, so nothing was sent" in flat(res.stderr), res.stderr
    line = w.a.wait_log(r"event=link\.refused .*domain=b\.test")
    assert "signature does not verify under the domain key" in line
    assert w.a.net.cli_json(alice, "inbox", "--all") == []
    assert w.a.net.server is not None and "event=link.in " not in w.a.net.server.log()


def test_an_envelope_from_outside_the_linking_domain_is_refused(
        make_world: Callable[..., World], tmp_path: Path) -> None:
    w = make_world()
    w.a.start()
    w.b.start()
    alice, _ = w.a.init("alice")
    bob, _ = w.b.init("bob")

    device = DeviceIdentity.from_seed(b"\x07" * 32).peer_id  # never opened: refused first

    async def forged() -> tuple[int, str, int, str]:
        records = await DnsResolver(w.ns.hostport).resolve(B)
        link = LinkClient(A, load_or_create(w.a.net.data_dir), records, tls=True)
        await link.connect()  # a.test's own key: the link itself is good
        try:
            item = SendItem(bob.address, device, b"forged")
            bad = await link.request(lambda rid: Send(rid, os.urandom(16), 0, (item,),
                                                      "mallory@c.test"))
            other = SendItem("carol@c.test", device, b"forged")
            wrong_to = await link.request(lambda rid: Send(rid, os.urandom(16), 0, (other,),
                                                           alice.address))
            return bad.status, bad.text, wrong_to.status, wrong_to.text
        finally:
            await link.aclose()

    status, text, status2, text2 = asyncio.run(forged())
    assert (status, text) == (Status.FORBIDDEN,
                              "sender mallory@c.test is not of the linking domain a.test")
    assert (status2, text2) == (Status.FORBIDDEN, "recipient carol@c.test is not of b.test")
    w.b.wait_log(r"event=link\.alignment domain=a\.test sender=mallory@c\.test")

    # Nothing of it reaches bob: a real message afterwards is his only one.
    w.a.net.start_node(alice)
    w.b.net.start_node(bob)
    src = make_file(tmp_path / "real.bin", 1 << 20)
    mid = send(w.a, alice, src, bob.address)
    deliver_once(w, alice, bob, src, mid)
    assert [e["id"] for e in w.b.net.cli_json(bob, "inbox", "--all")] == [mid]


def test_expiry_bounces_and_the_sender_sees_it_in_status(
        make_world: Callable[..., World], tmp_path: Path) -> None:
    # 0.0001 days is 8.64 s: long enough for the first message to go through at once
    # (its envelope is forwarded within a second).
    w = make_world(a_test=["--outbound-expiry", "0.0001"])
    alice, bob = bob_known_then_b_down(w, tmp_path)
    src = make_file(tmp_path / "late.bin", 1 << 20)
    mid = send(w.a, alice, src, bob.address)
    w.a.wait_log(r"event=outbound\.expired bounced=1", timeout=90)
    text = w.a.net.wait_until(
        lambda: (s := shown(w.a, alice, mid, bob.address)).startswith("bounced:") and s,
        60, "status 'bounced: ...'")
    assert text.startswith("bounced: not delivered to b.test before it expired "
                           "(b.test unreachable: "), text
    assert text in status_table(w.a, alice)
    # A bounced recipient will not download: nothing asks alice to stay on for it, and
    # watching the message ends, with the bounce as the error.
    assert KEEP_ON not in sent_page(w.a, alice)
    res = w.a.net.cli(alice, "status", "--wait", mid, timeout=30, check=False)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert f"0 of 1 recipients have it; bob@b.test: {text}" in flat(res.stderr), res.stderr


def test_a_blocked_domain_gets_no_link_and_no_mail(
        make_world: Callable[..., World], tmp_path: Path) -> None:
    w = make_world(b_test=["--block-domain", "A.test"])  # any case
    alice, bob = alice_and_bob(w)
    src = make_file(tmp_path / "x.bin", 1 << 20)
    res = w.a.net.cli(alice, "send", str(src), "--to", bob.address, check=False)
    assert res.returncode != 0
    assert ("bob@b.test: b.test refuses mail from a.test: links and mail from a.test are "
            "refused here") in flat(res.stderr), res.stderr
    line = w.b.wait_log(r"event=link\.refused .*domain=a\.test")
    assert "links and mail from a.test are refused here" in line
    assert w.b.net.cli_json(bob, "inbox", "--all") == []
