"""A NAT lab with a third home network, the "phone hotspot", so a host can change network.

    lab = RoamLab(NatMode.EIM, NatMode.EIM).up()
    lab.move("h1")       # h1 leaves r1's LAN and joins r3's: new address, new NAT

`RoamLab` is `NatLab` plus a router `r3` (198.18.0.3 on the public segment, LAN
10.3.0.0/24, an endpoint-independent NAT). `move(host)` does what a laptop's Wi-Fi does
when it changes network: the old interface goes away with its address (sockets bound to
it stay open but nothing they send arrives anywhere), and a new interface comes up with
an address on the other network (or, with `keep_address`, the one it had) and a default
route through its router. Processes keep running; they only see the network change under
them.
"""

from __future__ import annotations

from pathlib import Path

from tests.natlab.lab import NatLab, NatMode, _nat_rules

HOTSPOT = "r3"
HOTSPOT_WAN = "198.18.0.3"
HOTSPOT_LAN = "10.3.0"


class RoamLab(NatLab):
    """`NatLab` with a third NATed network that a host can move to (`move`)."""

    def __init__(self, h1: NatMode = NatMode.EIM, h2: NatMode = NatMode.EIM,
                 hotspot: NatMode = NatMode.EIM, *, log_dir: Path | None = None) -> None:
        super().__init__(h1, h2, log_dir=log_dir)
        self.hosts = (*self.HOSTS, HOTSPOT)
        self.modes[HOTSPOT] = hotspot
        self.moved: dict[str, str] = {}  # host -> its address on the hotspot

    def addr_of(self, host: str) -> str:
        if host == HOTSPOT:
            return HOTSPOT_WAN
        if host in self.moved:
            return self.moved[host]
        return super().addr_of(host)

    def router_of(self, host: str) -> str:
        """The router whose NAT `host`'s traffic goes through now."""
        return HOTSPOT if host in self.moved else {"h1": "r1", "h2": "r2"}[host]

    def _build(self) -> None:
        super()._build()
        self._wire(HOTSPOT, "wan", HOTSPOT, [f"{HOTSPOT_WAN}/24"])
        self._sysctl(HOTSPOT, "net.ipv4.ip_forward=1")

    def move(self, host: str, *, keep_address: bool = False) -> str:
        """Take `host` off its home network and onto the hotspot; its new address.

        The old veth is deleted (the address with it); a new one joins the hotspot's LAN.
        With `keep_address` the hotspot's LAN is numbered as the home's was and the host
        gets the very address it had (two routers that both hand out 192.168.1.2): only
        the NAT, and the public address the server sees, change."""
        if host not in ("h1", "h2") or self.moved:
            raise ValueError(f"{host} can't move: one home host moves, once, per lab")
        lan = f"10.{host[1]}.0" if keep_address else HOTSPOT_LAN  # h1's home is 10.1.0.0/24
        addr = f"{lan}.2"
        self._ip("link", "del", "eth0", ns=host)
        self._ip("link", "add", "eth1", "type", "veth", "peer", "name", "lan",
                 "netns", self.ns(HOTSPOT), ns=host)
        self._ip("addr", "add", f"{lan}.1/24", "dev", "lan", ns=HOTSPOT)
        self._ip("link", "set", "lan", "up", ns=HOTSPOT)
        self._cmd(["ip", "netns", "exec", self.ns(HOTSPOT), "nft", "-f", "-"],
                  stdin=_nat_rules(self.modes[HOTSPOT], addr))
        self._ip("addr", "add", f"{addr}/24", "dev", "eth1", ns=host)
        self._ip("link", "set", "eth1", "up", ns=host)
        self._ip("route", "add", "default", "via", f"{lan}.1", ns=host)
        self.moved[host] = addr
        return addr
