"""A reconnect that gets a server error (5xx: its store down) or a session cap (429) from
the current server tries the domain's other servers at once, as it does when the current
one can't be reached: an operator running two instances expects a client to land on the
healthy one. It kept retrying the broken one, one backoff step after another. A refusal
(401, 403) is still the server's word on the device and ends it, and while every server
refuses, each is tried once per backoff step, no faster."""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from rendezvous.client import RendezvousClient
from rendezvous.errors import AuthenticationError
from rendezvous.limits import Limits
from rendezvous.server import RendezvousServer

from .conftest import ident, port_of, running_server

ALICE = "alice@example.net"
FULL = Limits(sessions_per_ip=1)  # one session from 127.0.0.1 fills the instance


@asynccontextmanager
async def instances(tmp: Path, *kinds: dict[str, Any]) -> AsyncIterator[list[RendezvousServer]]:
    """One server per `kinds` entry (running_server's keyword arguments), each with its
    own store and the same domain key, as an operator sets up another instance."""
    async with AsyncExitStack() as stack:
        servers = []
        for i, kw in enumerate(kinds):
            data = tmp / f"instance{i}"
            data.mkdir()
            if i:
                shutil.copy2(tmp / "instance0" / "domain_key.json", data)
            servers.append(await stack.enter_async_context(running_server(data, **kw)))
        yield servers


def hostport(server: RendezvousServer) -> tuple[str, int]:
    return "127.0.0.1", port_of(server)


def client(at: RendezvousServer, alternates: list[RendezvousServer],
           heard: list[tuple[str, int]], n: int = 1,
           address: str = ALICE) -> RendezvousClient:
    """A client logged in at `at` whose domain's servers are `alternates`; `heard` collects
    what `on_failover` is told."""
    async def servers() -> list[tuple[str, int]]:
        return [hostport(s) for s in alternates]

    return RendezvousClient("127.0.0.1", port_of(at), ident(n), address, register=True,
                            request_timeout=5.0, alternates=servers,
                            on_failover=lambda host, port: heard.append((host, port)))


def rounds_failed(caplog: pytest.LogCaptureFixture) -> int:
    return caplog.text.count("event=client.reconnect_failed address=alice@example.net")


@pytest.mark.parametrize("fault", ["store down (500)", "instance full (429)"])
async def test_a_reconnect_refused_by_a_failing_instance_lands_on_the_other_at_once(
        fault: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, "rendezvous.client")
    full = fault.endswith("(429)")
    heard: list[tuple[str, int]] = []
    async with instances(tmp_path, {}, {"limits": FULL if full else None}, {}) as servers:
        where, broken, healthy = servers  # where alice is first; the domain's two
        async with AsyncExitStack() as stack:
            rc = await stack.enter_async_context(client(where, [broken, healthy], heard))
            if full:  # bob takes the broken instance's only session from 127.0.0.1
                await stack.enter_async_context(client(broken, [], [], 2, "bob@example.net"))
            else:
                async def authenticate(*args: Any, **kw: Any) -> Any:
                    raise RuntimeError("the test fails the store")

                monkeypatch.setattr(broken.store, "authenticate", authenticate)
            rc.host, rc.port = hostport(broken)  # as if alice's configured server
            rc.relogin("the test")
            assert (await rc.finger(ALICE)).devices
            assert heard == [hostport(healthy)] and rc.failovers == 1
            assert (rc.host, rc.port) == hostport(healthy)
            assert rc.reconnects == 1
            assert rounds_failed(caplog) == 0  # no backoff step waited
    if full:
        assert broken.sessions_refused == 1
    why = ("1 sessions are already open from your IP address, the limit" if full
           else "server error while authenticating")
    assert (f"event=client.failover address=alice@example.net old=127.0.0.1:"
            f"{port_of(broken)} new=127.0.0.1:{port_of(healthy)} text=\"{why}\"") \
        in caplog.text
    assert "client.reauth_refused" not in caplog.text


async def test_a_refusal_by_the_current_instance_still_ends_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "rendezvous.client")
    heard: list[tuple[str, int]] = []
    # Alice has no account at the first instance, which is closed to registration.
    async with instances(tmp_path, {}, {"open_registration": False}, {}) as servers:
        where, refusing, healthy = servers
        async with client(where, [refusing, healthy], heard) as rc:
            rc.host, rc.port = hostport(refusing)
            rc.relogin("the test")
            with pytest.raises(AuthenticationError) as info:
                await rc.finger(ALICE)
            assert info.value.status in (401, 403) and not info.value.transient
            assert rc.refused == str(info.value)
            assert heard == [] and rc.failovers == 0
    assert "event=client.reauth_refused address=alice@example.net" in caplog.text


async def test_while_every_instance_is_full_each_is_tried_once_per_backoff_step(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "rendezvous.client")
    heard: list[tuple[str, int]] = []
    async with instances(tmp_path, {}, {"limits": FULL}, {"limits": FULL}) as servers:
        where, first, second = servers
        async with AsyncExitStack() as stack:
            rc = await stack.enter_async_context(client(where, [first, second], heard))
            await stack.enter_async_context(client(first, [], [], 2, "bob@example.net"))
            carol = await stack.enter_async_context(
                client(second, [], [], 3, "carol@example.net"))
            rc.host, rc.port = hostport(first)
            rc.relogin("the test")
            with pytest.raises(Exception, match="not connected"):
                await rc.wait_connected(2.0)
            rounds = rounds_failed(caplog)
            assert rounds >= 2  # 0.1 s doubling: several steps in 2 s
            # Each round tries the current instance, then the other, then waits its step:
            # no ping-pong between the two full ones faster than the backoff.
            assert rounds <= first.sessions_refused <= rounds + 1
            assert rounds <= second.sessions_refused <= rounds + 1
            assert heard == []
            await carol.aclose()  # a session at the second ends
            rc.retry_now()
            assert (await rc.finger(ALICE)).devices
            assert heard == [hostport(second)] and rc.failovers == 1
