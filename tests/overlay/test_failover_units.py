"""The node config's `resolver` and `srv` keys, and when a node looks for another server
of its domain (overlay.app.failover); the failover itself runs end to end in
test_e2e_dns_failover.py."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import cast

import pytest

from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from overlay.app.config import NodeConfig
from overlay.app.failover import ServerFailover, resolver_spec
from overlay.app.home import NodeHome
from overlay.app.links import PeerLinks
from overlay.transfer.server import TransferServer
from overlay.transports.webrtc import AiortcChannels, WebRtcEndpoint
from rendezvous.client import RendezvousClient
from rendezvous.dns import DomainRecords, StaticResolver
from rendezvous.domainkey import DomainKey, encode_key

ADDR = "bob@a.test"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_resolver_and_srv_round_trip_through_the_config() -> None:
    cfg = NodeConfig(ADDR, "127.0.0.1:4500", resolver="127.0.0.1:5353", srv=True)
    back = NodeConfig.from_json(cfg.to_json())
    assert back.resolver == "127.0.0.1:5353"
    assert back.srv is True
    assert back == cfg


def test_a_config_written_before_the_keys_loads_without_failover() -> None:
    old = {"version": 1, "address": ADDR, "server": "127.0.0.1:4500",
           "listen": "0.0.0.0:0", "listen_port": 0, "download_dir": "", "options": {},
           "server_key": "", "plaintext": False, "web": "off", "on_message": ""}
    cfg = NodeConfig.from_json(json.dumps(old))
    assert cfg.resolver == ""
    assert cfg.srv is False


def test_a_bad_resolver_in_the_config_is_named() -> None:
    text = NodeConfig(ADDR, "127.0.0.1:4500").to_json().replace(
        '"resolver": ""', '"resolver": "nowhere"')
    with pytest.raises(DecodeError, match="resolver"):
        NodeConfig.from_json(text)


def test_the_environment_wins_over_the_config() -> None:
    cfg = NodeConfig(ADDR, "127.0.0.1:4500", resolver="127.0.0.1:5353")
    assert resolver_spec(cfg, {"PEERPOST_RESOLVER": "127.0.0.2:53"}) == "127.0.0.2:53"
    assert resolver_spec(cfg, {}) == "127.0.0.1:5353"
    assert resolver_spec(NodeConfig(ADDR, "127.0.0.1:4500"), {}) is None


class _NeverAsked(StaticResolver):
    async def resolve(self, domain: str) -> DomainRecords:
        raise AssertionError("a node set up with --server must not look in DNS")


def _client(server: str) -> RendezvousClient:
    host, port = server.rsplit(":", 1)
    return RendezvousClient(host, int(port), DeviceIdentity.generate(), ADDR, tls=True,
                            reconnect=False, request_timeout=2.0)


def test_a_node_set_up_with_server_never_looks_in_dns(tmp_path: Path) -> None:
    key = DomainKey.generate()
    cfg = NodeConfig(ADDR, f"127.0.0.1:{closed_port()}", server_key=encode_key(key.public))
    failover = ServerFailover(NodeHome(tmp_path), cfg, _NeverAsked({}))
    assert not failover.enabled
    assert asyncio.run(failover.login_elsewhere(_client(cfg.server))) is None


def test_no_other_target_answering_leaves_the_configured_server(tmp_path: Path) -> None:
    key = DomainKey.generate()
    server = f"127.0.0.1:{closed_port()}"
    cfg = NodeConfig(ADDR, server, server_key=encode_key(key.public), srv=True)
    others = (("127.0.0.1", closed_port()), ("127.0.0.1", closed_port()))
    resolver = StaticResolver({"a.test": DomainRecords("a.test", others, key.public)})
    home = NodeHome(tmp_path)
    client = _client(server)
    assert asyncio.run(ServerFailover(home, cfg, resolver).login_elsewhere(client)) is None
    assert f"{client.host}:{client.port}" == server
    assert cfg.server == server
    assert not home.config_path.exists()  # nothing recorded


def test_webrtc_and_the_punch_use_the_stun_of_the_server_the_session_is_on() -> None:
    """After a failover the STUN a new peer connection and a punch would ask is the new
    server's, from its CHALLENGE, not the first's (whose services died with it)."""
    identity = DeviceIdentity.generate()
    client = _client("127.0.0.1:4500")
    client._services = {"stun": 3478, "stun_tcp": 3478, "dht": 4501}  # first CHALLENGE
    links = PeerLinks(identity, ADDR, ("127.0.0.1", 4500), client,
                      cast(TransferServer, None), WebRtcEndpoint)
    channels = links.rtc.channels
    assert isinstance(channels, AiortcChannels)

    def ice_urls() -> list[str]:
        servers = channels.settings.rtc_configuration().iceServers
        assert servers is not None
        return [u for s in servers for u in ([s.urls] if isinstance(s.urls, str) else s.urls)]
    assert ice_urls() == ["stun:127.0.0.1:3478"]
    assert links.punch.settings.stun == ("127.0.0.1", 3478)

    client.host, client.port = "127.0.0.2", 4600  # the session failed over
    client._services = {"stun": 5478, "stun_tcp": 5479, "dht": 4601}
    links.follow_server()
    assert ice_urls() == ["stun:127.0.0.2:5478"]
    assert links.rtc.settings.stun == [("127.0.0.2", 5478)]
    assert links.punch.settings.stun == ("127.0.0.2", 5479)


def test_a_failover_whose_config_cannot_be_written_keeps_the_session(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from rendezvous.server import RendezvousServer
    from rendezvous.sqlite_store import SqliteStore
    from rendezvous.tls import self_signed, server_tls

    async def run() -> None:
        data = tmp_path / "srv"
        data.mkdir()
        key = DomainKey.generate()
        server = RendezvousServer("a.test", SqliteStore(data / "rv.sqlite3"),
                                  open_registration=True, domain_key=key,
                                  tls=server_tls(*self_signed(data, "a.test")))
        other = await server.start("127.0.0.1", 0)
        try:
            dead = f"127.0.0.1:{closed_port()}"
            cfg = NodeConfig(ADDR, dead, server_key=encode_key(key.public), srv=True)
            resolver = StaticResolver({"a.test": DomainRecords("a.test", (other,), key.public)})
            home = NodeHome(tmp_path / "home")
            home.config_path.mkdir(parents=True)  # a config that can't be replaced
            client = _client(dead)
            client.register = True
            where = await ServerFailover(home, cfg, resolver).login_elsewhere(client)
            try:
                assert where == f"127.0.0.1:{other[1]}" == cfg.server
                assert (await client.finger(ADDR)).address == ADDR  # the session works
            finally:
                await client.aclose()
        finally:
            await server.aclose()

    asyncio.run(run())
    assert any("cannot record the server" in r.getMessage() for r in caplog.records)
