"""A server stops promptly while its outbound queue waits for a domain that is down, even
when the cancel reaches the worker in the middle of a DNS lookup. dnspython's resolver
waits with asyncio.wait_for, which in Python 3.11 hands back the answer instead of the
CancelledError when both come in one loop iteration; the worker then went on retrying
and `serve` hung on SIGTERM until it was killed (1 stop in 3 in a loop of sends to a
domain just stopped, found by `python -m benchmarks soak --domains 2`)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from rendezvous.dns import DomainRecords, StaticResolver
from rendezvous.taskset import TaskSet
from tests.rendezvous.test_federation import ALICE, BOB, World, _closed_port

A, B = "a.test", "b.test"


class AnswersWhenCancelled(StaticResolver):
    """The first lookup answers only once its caller is cancelled, and then answers all
    the same: what dnspython's lookup does under Python 3.11 when its answer and the
    cancel coincide. Later lookups answer at once."""

    def __init__(self) -> None:
        super().__init__({})
        self.asked = asyncio.Event()

    async def resolve(self, domain: str) -> DomainRecords:
        if not self.asked.is_set():
            self.asked.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass  # the cancel lost, as asyncio.wait_for loses it
        return await super().resolve(domain)


async def test_close_ends_the_outbound_worker_whose_lookup_ate_the_cancel(
        tmp_path: Path) -> None:
    world = World(tmp_path)
    resolver = AnswersWhenCancelled()
    # b.test is down: its records name a port nobody listens on.
    resolver.add(DomainRecords(B, (_closed_port(),), world.keys[B].public))
    async with world.server(A, resolver=resolver) as a:
        async with world.client(a, ALICE, "alice@a.test") as alice:
            await alice.send(os.urandom(16), [("bob@b.test", BOB.peer_id, b"queued at a")])
        async with asyncio.timeout(10):
            await resolver.asked.wait()  # the worker is in the lookup
        assert a.federation is not None
        tasks = TaskSet("test")
        closing = tasks.spawn(a.aclose())
        assert closing is not None
        try:
            done, _ = await asyncio.wait({closing}, timeout=5)
            assert closing in done, "the server did not stop: its outbound worker retries on"
        finally:
            for task in a.federation._tasks:  # a second cancel ends what the first did not
                task.cancel()
            await tasks.aclose()
