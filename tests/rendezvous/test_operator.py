"""Real `peerpost-rendezvous` processes, as an operator runs them: the default services,
the config file and SIGHUP, one server per data folder, a busy port, `invite`'s checks,
the account and device commands next to a serving server, backup while a client sends,
and restore."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from crypto.identity import DeviceIdentity
from overlay.app.lab import _script
from rendezvous.client import RendezvousClient
from rendezvous.errors import ConnectionLostError
from rendezvous.messages import Deliver
from rendezvous.opcli import _deleted_text

from .conftest import DOMAIN, ident, mid

pytestmark = pytest.mark.slow
ALICE, ALICE2, BOB = ident(61), ident(62), ident(63)
SCRIPT = _script("peerpost-rendezvous")


class Server:
    """A `serve` process: its stdout lines, and its stderr (the log) to wait on."""

    def __init__(self, proc: asyncio.subprocess.Process, lines: list[str]) -> None:
        self.proc = proc
        self.lines = lines
        self.log: list[str] = []
        self._new = asyncio.Event()

    @property
    def port(self) -> int:
        return int(self.lines[0].rsplit(":", 1)[1])

    async def pump_log(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode())
            self._new.set()

    async def wait_log(self, text: str, after: int = 0, within: float = 20) -> str:
        """The first log line from line `after` on holding `text`, waited for `within` s."""
        try:
            async with asyncio.timeout(within):
                while True:
                    for line in self.log[after:]:
                        if text in line:
                            return line
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            raise AssertionError(f"no {text!r} in the server log within {within} s:\n"
                                 + "".join(self.log[-30:])) from None


@asynccontextmanager
async def serve(data: Path, *extra: str, listen: str = "127.0.0.1:0",
                expect: int = 3) -> AsyncIterator[Server]:
    """`serve --domain example.net --listen ... --data DATA EXTRA...` and its first lines."""
    argv = [SCRIPT, "serve", "--listen", listen, *extra]
    if "--config" not in extra:
        argv += ["--domain", DOMAIN, "--data", str(data)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    srv = Server(proc, [])
    async with asyncio.TaskGroup() as tg:
        pump = tg.create_task(srv.pump_log())
        try:
            assert proc.stdout is not None
            for _ in range(expect):
                line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
                if not line:
                    raise AssertionError(f"serve exited: {''.join(srv.log)}")
                srv.lines.append(line)
            yield srv
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 20)
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await pump


async def run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        SCRIPT, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ok_json(*args: str) -> Any:
    code, out, err = await run(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def rc(port: int, who: DeviceIdentity, address: str, **kw: Any) -> RendezvousClient:
    return RendezvousClient("127.0.0.1", port, who, address, request_timeout=10.0,
                            tls=True, **kw)


def free_port_pair() -> int:
    """A port P whose TCP and UDP P and UDP and TCP P + 1 were free a moment ago."""
    for _ in range(50):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            if port >= 65535:
                continue
            try:
                with socket.socket(type=socket.SOCK_DGRAM) as u1, \
                        socket.socket(type=socket.SOCK_DGRAM) as u2, socket.socket() as t2:
                    u1.bind(("127.0.0.1", port))
                    u2.bind(("127.0.0.1", port + 1))
                    t2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no free port pair found")


async def test_serve_runs_stun_at_the_port_and_the_dht_one_above(tmp_path: Path) -> None:
    port = free_port_pair()
    async with serve(tmp_path / "d", "--open-registration",
                     listen=f"127.0.0.1:{port}", expect=4) as srv:
        assert srv.lines == [f"listening 127.0.0.1:{port}",
                             f"stun listening 127.0.0.1:{port}",
                             f"dht listening 127.0.0.1:{port + 1}",
                             f"stun_tcp listening 127.0.0.1:{port + 1}"]
        async with rc(srv.port, ALICE, "alice@example.net", register=True) as a:
            assert a.server_info == {"stun": port, "dht": port + 1, "stun_tcp": port + 1}
    async with serve(tmp_path / "e", "--open-registration", "--stun-port", "off",
                     "--dht-port", "off", expect=1) as srv:
        async with rc(srv.port, ALICE, "alice@example.net", register=True) as a:
            assert a.server_info == {}


async def test_config_file_flags_override_and_sighup_reloads_limits(tmp_path: Path) -> None:
    data = tmp_path / "data"
    conf = tmp_path / "rv.toml"
    text = (f'domain = "{DOMAIN}"\ndata = "data"\nlisten = "127.0.0.1:1"\n'
            'open_registration = true\nstats_interval = 0.2\nsessions_per_device = 1\n'
            'block_domain = ["spam.test"]\n')
    conf.write_text(text)
    # --listen on the command line wins over the file's port 1 (which is not ours to bind).
    async with serve(data, "--config", str(conf)) as srv:
        async with rc(srv.port, ALICE, "alice@example.net", register=True,
                      reconnect=False) as first:
            with pytest.raises(Exception, match="1 sessions, the limit"):
                await rc(srv.port, ALICE, "alice@example.net", reconnect=False).start()

            conf.write_text(text.replace("sessions_per_device = 1", "sessions_per_device = 2"))
            mark = len(srv.log)
            srv.proc.send_signal(signal.SIGHUP)
            line = await srv.wait_log("event=server.reloaded", after=mark)
            assert "changed=sessions_per_device needs_restart=-" in line
            async with rc(srv.port, ALICE, "alice@example.net", reconnect=False) as second:
                assert (await second.finger("alice@example.net")).devices
            # The first session lived through the reload.
            assert first.connected
            assert (await first.finger("alice@example.net")).devices
            assert (await ok_json("stats", "--data", str(data)))["server_running"] is True

            # A broken file on reload keeps the old settings, and the server.
            conf.write_text("sessions_per_device = [\n")
            mark = len(srv.log)
            srv.proc.send_signal(signal.SIGHUP)
            await srv.wait_log("event=server.reload_failed", after=mark)
            assert first.connected and (await first.finger("alice@example.net")).devices
            # stats.json written every 0 s: the main loop rewrote it without a pause for
            # the server's life (a third of a core, measured).
            conf.write_text(text.replace("stats_interval = 0.2", "stats_interval = 0"))
            mark = len(srv.log)
            srv.proc.send_signal(signal.SIGHUP)
            line = await srv.wait_log("event=server.reload_failed", after=mark)
            assert "stats_interval: expected more than 0, got '0'" in line, line
            # A negative request rate: every new connection's token bucket refused it.
            conf.write_text(text + "request_rate = -1\n")
            mark = len(srv.log)
            srv.proc.send_signal(signal.SIGHUP)
            line = await srv.wait_log("event=server.reload_failed", after=mark)
            assert "request_rate: expected 0 or more, got '-1'" in line, line
            async with rc(srv.port, ALICE, "alice@example.net", reconnect=False) as third:
                assert (await third.finger("alice@example.net")).devices
        srv.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(srv.proc.wait(), 20) == 0
    doc = json.loads((data / "stats.json").read_text())
    assert doc["running"] is False
    assert (await ok_json("stats", "--data", str(data)))["server_running"] is False
    assert not any("Traceback" in line for line in srv.log)


async def test_a_request_rate_below_or_at_0_is_refused(tmp_path: Path) -> None:
    for rate, why in (("-1", "expected 0 or more, got '-1'"), ("0", "expected more than 0")):
        code, _, err = await run("serve", "--data", str(tmp_path / "d"), "--request-rate", rate)
        assert code == 2 and f"argument --request-rate: {why}" in err, err


async def test_a_bad_config_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "rv.toml"
    conf.write_text('domain = "example.net"\ndata = "d"\nrelay_rat = 5\n')
    code, _, err = await run("serve", "--config", str(conf))
    assert code == 2 and err.strip().count("\n") == 0
    assert "unknown key 'relay_rat' (did you mean relay_rate? keys are" in err
    conf.write_text('domain = "example.net"\ndata = "d"\nsessions_per_ip = "many"\n')
    code, _, err = await run("serve", "--config", str(conf))
    assert code == 2 and "sessions_per_ip" in err and "Traceback" not in err


async def test_one_server_per_data_folder_and_a_busy_port(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve(data, "--open-registration") as srv:
        code, out, err = await run("serve", "--domain", DOMAIN, "--listen", "127.0.0.1:0",
                                   "--data", str(data))
        assert code == 1 and out == ""
        assert err.strip() == (f"peerpost-rendezvous: {data} is already served by pid "
                               f"{srv.proc.pid} (one server per data folder)")
        code, out, err = await run("serve", "--domain", DOMAIN, "--listen",
                                   f"127.0.0.1:{srv.port}", "--data", str(tmp_path / "other"),
                                   "--stun-port", "off", "--dht-port", "off")
        assert code == 1 and "Traceback" not in err
        errors = [ln for ln in err.splitlines() if ln.startswith("peerpost-rendezvous:")]
        assert errors == [f"peerpost-rendezvous: cannot listen on 127.0.0.1:{srv.port} (TCP): "
                          "Address already in use"]
        # The first server did not notice.
        async with rc(srv.port, ALICE, "alice@example.net", register=True) as a:
            assert (await a.finger("alice@example.net")).devices


async def test_a_second_server_on_the_same_port_is_told_the_tcp_port_is_taken(
        tmp_path: Path) -> None:
    async with serve(tmp_path / "one", "--open-registration") as srv:
        (stun,) = [ln.split()[-1] for ln in srv.lines if ln.startswith("stun listening ")]
        # As the same `serve --listen H:P` twice gives: STUN's UDP port is taken too, and
        # was named first, with "--stun-port N moves it", which only led to the TCP error.
        code, out, err = await run("serve", "--domain", DOMAIN, "--listen",
                                   f"127.0.0.1:{srv.port}", "--stun-port", stun.split(":")[1],
                                   "--dht-port", "0", "--data", str(tmp_path / "two"))
        assert code == 1 and out == ""
        errors = [ln for ln in err.splitlines() if ln.startswith("peerpost-rendezvous:")]
        assert errors == [f"peerpost-rendezvous: cannot listen on 127.0.0.1:{srv.port} (TCP): "
                          "Address already in use"], err


async def test_invite_refuses_another_domain_and_a_missing_folder(tmp_path: Path) -> None:
    code, _, err = await run("invite", "bob@example.net", "--data", str(tmp_path / "nope"))
    assert code == 1 and f"no data folder {tmp_path / 'nope'}" in err
    assert not (tmp_path / "nope").exists()
    data = tmp_path / "data"
    async with serve(data):
        code, _, err = await run("invite", "bob@other.test", "--data", str(data))
        assert code == 1 and err.strip() == (f"peerpost-rendezvous: {data} serves "
                                             f"{DOMAIN}, not other.test")
        code, out, _ = await run("invite", "bob@example.net", "--data", str(data))
        assert code == 0 and len(out.strip()) >= 20
    # The folder is now example.net's: another domain cannot be served from it.
    code, _, err = await run("serve", "--domain", "other.test", "--data", str(data))
    assert code == 1 and f"{data} serves {DOMAIN}, not other.test" in err


async def test_accounts_and_device_revocation_next_to_a_serving_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve(data, "--stats-interval", "0.2") as srv:
        code, token, _ = await run("invite", "alice@example.net", "--data", str(data))
        _, token2, _ = await run("invite", "alice@example.net", "--data", str(data))
        _, btoken, _ = await run("invite", "bob@example.net", "--data", str(data))
        async with rc(srv.port, ALICE, "alice@example.net", register=True,
                      invite=token.strip()):
            pass
        async with rc(srv.port, BOB, "bob@example.net", register=True, invite=btoken.strip()):
            pass
        async with rc(srv.port, ALICE, "alice@example.net", register=True,
                      invite=token2.strip()):
            pass  # ALICE2 joins below; this only checks a known device ignores invites
        async with rc(srv.port, ALICE2, "alice@example.net", register=True,
                      invite=token2.strip()) as a2:
            await a2.send(mid(), [("bob@example.net", BOB.peer_id, b"x" * 50)])

        rows = await ok_json("accounts", "list", "--data", str(data))
        assert [(r["address"], r["devices"]) for r in rows] == [
            ("alice@example.net", 2), ("bob@example.net", 1)]
        code, out, _ = await run("accounts", "list", "--data", str(data))
        assert code == 0 and "alice@example.net" in out and "2 accounts" in out
        shown = await ok_json("accounts", "show", "Alice@Example.net", "--data", str(data))
        assert [d["peer_id"] for d in shown["device_list"]] == [
            ALICE.peer_id.hex(), ALICE2.peer_id.hex()]

        # Revoke ALICE2 while it is connected: its session ends, and it cannot log in.
        async with rc(srv.port, ALICE2, "alice@example.net", reconnect=False) as a2, \
                rc(srv.port, ALICE, "alice@example.net", reconnect=False) as a1:
            mark = len(srv.log)
            done = await ok_json("devices", "revoke", "alice@example.net",
                                 ALICE2.peer_id.hex()[:12], "--data", str(data))
            assert done["revoked"] == ALICE2.peer_id.hex()
            assert done["server_pid"] == srv.proc.pid
            await srv.wait_log("event=server.accounts_reread sessions_ended=1", after=mark)
            with pytest.raises(ConnectionLostError):
                await a2.finger("alice@example.net")
            # The other device of the account stayed connected.
            assert len((await a1.finger("alice@example.net")).devices) == 1
        with pytest.raises(Exception, match=r"not bound to alice@example\.net"):
            await rc(srv.port, ALICE2, "alice@example.net", reconnect=False).start()

        code, _, err = await run("devices", "revoke", "alice@example.net", "ffff0000",
                                 "--data", str(data))
        assert code == 1 and "alice@example.net has no device ffff0000" in err

        # Delete Bob with his queued envelope; the server forgets him at once.
        done = await ok_json("accounts", "delete", "bob@example.net", "--data", str(data))
        assert (done["devices"], done["envelopes"]) == (1, 1)
        await srv.wait_log("event=server.accounts_reread")
        async with rc(srv.port, ALICE, "alice@example.net") as a1:
            with pytest.raises(Exception, match=r"no such address: bob@example\.net"):
                await a1.finger("bob@example.net")
        rows = await ok_json("accounts", "list", "--data", str(data))
        assert [r["address"] for r in rows] == ["alice@example.net"]
        code, _, err = await run("accounts", "show", "bob@example.net", "--data", str(data))
        assert code == 1 and "no account bob@example.net" in err


async def test_backup_while_a_client_sends_then_restore(tmp_path: Path) -> None:
    data, dest = tmp_path / "data", tmp_path / "backup"
    acked: list[bytes] = []
    async with serve(data, "--open-registration", "--sender-quota-count", "0",
                     "--quota-count", "1000000") as srv:
        async with rc(srv.port, BOB, "bob@example.net", register=True):
            pass
        async with rc(srv.port, ALICE, "alice@example.net", register=True) as a:
            stop, going = asyncio.Event(), asyncio.Event()

            async def keep_sending() -> None:
                while not stop.is_set():
                    m = mid()
                    await a.send(m, [("bob@example.net", BOB.peer_id, m * 8)])
                    acked.append(m)
                    if len(acked) == 50:
                        going.set()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(keep_sending())
                await going.wait()
                before = len(acked)
                code, out, err = await run("backup", str(dest), "--data", str(data))
                after = len(acked)
                stop.set()
            assert code == 0, err
            assert "backed up" in out and "domain_key.json" in out
        # The copy is one consistent moment: every envelope acked before the backup began
        # is in it, nothing acked after it ended, and SQLite finds it whole.
        conn = sqlite3.connect(dest / "rendezvous.sqlite3")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            in_copy = {r[0] for r in conn.execute("SELECT mid FROM envelopes")}
        finally:
            conn.close()
        assert set(acked[:before]) <= in_copy <= set(acked[:after + 1])
        assert len(in_copy) < len(acked)  # the sender went on after the copy

        code, _, err = await run("restore", str(dest), "--data", str(data))
        assert code == 1 and re.search(rf"in use by a server \(pid {srv.proc.pid}\)", err)

    code, _, err = await run("restore", str(dest), "--data", str(data))
    assert code == 1 and "--force" in err
    restored = tmp_path / "restored"
    code, out, err = await run("restore", str(dest), "--data", str(restored))
    assert code == 0, err
    assert (restored / "domain_key.json").read_text() == (data / "domain_key.json").read_text()
    async with serve(restored) as srv:
        async with rc(srv.port, BOB, "bob@example.net") as b:
            got: set[bytes] = set()
            pushes = b.pushes()
            async with asyncio.timeout(30):
                while len(got) < len(in_copy):
                    p = await anext(pushes)
                    if isinstance(p, Deliver):
                        assert p.envelope.blob == p.envelope.message_id * 8
                        got.add(p.envelope.message_id)
            assert got == in_copy


def test_accounts_delete_says_one_device_not_one_devices() -> None:
    _, one = _deleted_text("bob@example.net", {"devices": 1, "envelopes": 1, "outbound": 0},
                           None)
    assert one.startswith("deleted bob@example.net: 1 device, 1 queued envelope, 0 outbound")
    _, two = _deleted_text("bob@example.net", {"devices": 2, "envelopes": 0, "outbound": 3},
                           None)
    assert two.startswith("deleted bob@example.net: 2 devices, 0 queued envelopes, 3 outbound")
