"""The node's config.json: address, rendezvous server and its pinned key, name server,
listen address, web inbox, options (versioned JSON, checked field by field on load).

Its own module, imported where a config is read or written: as a dataclass it brings
dataclasses and inspect (7 ms), which `peerpost send`, `inbox`, ... would load with
overlay.app.home only to find the control socket.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field

from crypto.address import normalize_address, parse_hostport
from crypto.errors import DecodeError

CONFIG_VERSION = 1
DEFAULT_WEB = "127.0.0.1:8470"  # the web inbox; another free port if taken, "off": none


@dataclass
class NodeConfig:
    address: str
    server: str  # HOST:PORT of the rendezvous server of the address's domain
    listen: str = "0.0.0.0:0"  # direct TCP transfer listener
    listen_port: int = 0  # the port actually bound the first time, reused after restarts
    download_dir: str = ""  # default: <home>/received
    version: int = CONFIG_VERSION
    options: dict[str, object] = field(default_factory=dict)
    # The server's domain key (base64), pinned at `init`; "" in a config written before
    # keys were pinned: the next start pins the key the server shows, and logs it.
    server_key: str = ""
    plaintext: bool = False  # no TLS to the server: the simulator only
    web: str = DEFAULT_WEB  # HOST:PORT of the web inbox (overlay.app.web), or "off"
    # A command run (argv by shlex.split, no shell) when a message arrives or completes;
    # `node --on-message` overrides it (overlay.app.notify).
    on_message: str = ""
    # HOST:PORT of the name server to ask for the domain's SRV/TXT records (`init
    # --resolver`); "": $PEERPOST_RESOLVER, else the system's. The environment wins.
    resolver: str = ""
    # The server was found through the domain's `_peerpost._tcp` SRV records at `init`: a
    # node that cannot reach it tries the domain's other SRV targets (overlay.app.failover).
    srv: bool = False
    # The QUIC rung (overlay.transports.quic) between the TCP punch and WebRTC; false turns
    # it off (`node --no-quic` for one run): offers are declined, dials go on to WebRTC.
    quic: bool = True

    def pinned_key(self) -> bytes | None:
        """The pinned server key, or None if none is pinned yet."""
        from rendezvous.domainkey import decode_key

        return decode_key(self.server_key, "server_key") if self.server_key else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NodeConfig:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise DecodeError(f"config.json is not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("version") != CONFIG_VERSION:
            raise DecodeError("config.json: unsupported or missing version")
        try:
            cfg = cls(
                address=normalize_address(obj["address"]),
                server=str(obj["server"]),
                listen=str(obj.get("listen", "0.0.0.0:0")),
                listen_port=int(obj.get("listen_port", 0)),
                download_dir=str(obj.get("download_dir", "")),
                options=dict(obj.get("options", {})),
                server_key=str(obj.get("server_key", "")),
                plaintext=obj.get("plaintext", False) is True,
                web=str(obj.get("web", DEFAULT_WEB)),
                on_message=str(obj.get("on_message", "")),
                resolver=str(obj.get("resolver", "")),
                srv=obj.get("srv", False) is True,
                quic=obj.get("quic", True),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"config.json: bad or missing field: {exc}") from None
        if not isinstance(cfg.quic, bool):
            raise DecodeError(f"config.json: quic must be true or false, not {cfg.quic!r}")
        cfg.pinned_key()  # a key that is there must be a key
        parse_hostport(cfg.server, what="server")
        parse_hostport(cfg.listen, what="listen")
        if cfg.resolver:
            parse_hostport(cfg.resolver, what="resolver")
        try:
            shlex.split(cfg.on_message)
        except ValueError as exc:
            raise DecodeError(f"config.json: on_message: {exc}") from None
        if cfg.web != "off":
            parse_hostport(cfg.web, what="web")
        return cfg
