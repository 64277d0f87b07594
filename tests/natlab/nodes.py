"""Real peerpost processes in the NAT lab, driven through the `peerpost` CLI.

    with NatLab(NatMode.EIM, NatMode.EIM) as lab, LabNetwork(lab, tmp_path) as net:
        net.start_server()                          # peerpost-rendezvous serve, public side
        alice = net.add_node("alice", "h1")         # `peerpost init` inside h1
        net.start_node(alice)                       # `peerpost node` inside h1
        mid = net.cli(alice, "send", str(path), "--to", "bob@example.net").stdout

`LabNetwork` is overlay.app.lab's `LocalNetwork` (the same waits for printed lines, bounded
polls and per-process logs) with each process started inside a lab namespace: the server
in `server`, each node in the host it was added to. Only `init` (which registers with the
server) runs inside the node's namespace; the other CLI commands run here, in the root
namespace, and reach the daemon over the Unix socket in its home folder: a socket bound
to a path is found through the file system, which network namespaces don't separate.

The server's own STUN answers on its listen address only; `stun_servers` adds a second
STUN on the server's other address, so a test can ask both from one socket and tell an
endpoint-independent mapping from a symmetric one (what `assert_nat` checks).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from overlay.app.lab import LISTENING, LabError, LocalNetwork, NodeHandle, Proc, _script, listening
from tests.natlab.conftest import REPO, python_argv
from tests.natlab.lab import NatLab, NatMode, read_line


class LabNetwork(LocalNetwork):
    """A rendezvous server and nodes as real processes inside a `NatLab`."""

    def __init__(self, lab: NatLab, root: Path) -> None:
        super().__init__(root)
        self.lab = lab
        self.hosts: dict[str, str] = {"server": "server"}  # process name -> lab host
        self.stun_servers: list[tuple[str, int]] = []  # the server's STUN first

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        host = self.hosts[name]
        return super()._spawn(name, ["ip", "netns", "exec", self.lab.ns(host), *argv])

    def start_server(self, timeout: float = 30.0) -> tuple[str, int]:
        """`peerpost-rendezvous serve` on the server's first public address, with STUN and
        the DHT bootstrap node beside it, and a bare STUN on the second address."""
        addr, addr2 = self.lab.server_addrs
        argv = [_script("peerpost-rendezvous"), "serve", "--domain", self.domain,
                "--listen", f"{addr}:0", "--data", str(self.data_dir), "--open-registration",
                *self.server_args]
        self.server = self._spawn("server", argv)
        found: dict[str, tuple[str, int]] = {}
        while len(found) < 3:  # listening, stun listening, dht listening
            name, where = listening(
                self.server.lines.wait_for(LISTENING, timeout, "peerpost-rendezvous serve"))
            found[name] = where
        self.server_addr = found[""]
        if found["stun"][0] != addr:
            raise LabError(f"the server's STUN listens on {found['stun']}, not on {addr}")
        stun2 = self.lab.run("server", python_argv("tests.natlab.public", "--stun-only", addr2),
                             cwd=REPO)
        words = read_line(stun2, timeout, "second STUN").split()
        self.stun_servers = [found["stun"], (addr2, int(words[1]))]
        return self.server_addr

    def add_node(self, name: str, host: str = "h1", *, extra: list[str] | None = None,
                 listen: str = "0.0.0.0:0", resolver: str | None = None) -> NodeHandle:
        """`peerpost init` inside `host` (registers NAME@example.net), listening on
        `listen`: any address and port by default, as a real install does. With `resolver`
        it finds its server in DNS through that name server, as in `LocalNetwork`."""
        node = NodeHandle(name, f"{name}@{self.domain}", self.root / name, extra=extra or [])
        self.hosts[name] = host
        server = ["--resolver", resolver] if resolver else ["--server", self.server_hostport]
        argv = [_script("peerpost"), "--home", str(node.home), "init", "--address",
                node.address, *server, "--listen", listen]
        res = self.lab.exec(host, argv, timeout=60, env=self.env)
        if res.returncode != 0:
            raise LabError(f"`peerpost init` for {name} in {host} exited {res.returncode}: "
                           f"{res.stderr.strip() or res.stdout.strip()}")
        self.nodes[name] = node
        return node

    def mapping(self, host: str) -> list[tuple[str, int]]:
        """What the two STUN servers see of one UDP socket in `host`."""
        servers = [f"{a}:{p}" for a, p in self.stun_servers]
        r = self.lab.exec(host, python_argv("tests.natlab.peer", "probe", *servers), cwd=REPO)
        if r.returncode != 0:
            raise LabError(f"STUN probe from {host} failed: {r.stderr.strip()}")
        return [(ip, port) for ip, port in json.loads(r.stdout)["mapped"]]

    def assert_nat(self, host: str, mode: NatMode | None) -> None:
        """The NAT in front of `host` behaves as `mode` (None: no NAT) as STUN sees it."""
        first, second = self.mapping(host)
        router = {"h1": "r1", "h2": "r2"}.get(host)
        public = self.lab.addr_of(router or host)
        assert first[0] == second[0] == public, f"{host}: STUN saw {first}, {second}"
        if mode is NatMode.SYMMETRIC:
            assert first[1] != second[1], f"{host}: a symmetric NAT kept one port: {first}"
        else:
            assert first[1] == second[1], f"{host}: the mapping moved: {first} {second}"

    def logs(self, tail: int = 200) -> str:
        """The last `tail` lines of every process's log, for a failure report."""
        parts = []
        for log in sorted(self.root.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"===== {log.name} =====\n" + "\n".join(lines))
        return "\n".join(parts)

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The logs, once `text` is in them (a step a process logs when it ends, such as
        a punch that runs out its budget after a faster rung has already won)."""
        deadline = time.monotonic() + timeout
        while text not in (logs := self.logs()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout} s:\n{logs}")
            time.sleep(0.1)
        return logs
