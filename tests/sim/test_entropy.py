"""What the real code draws from the OS comes from the seed while a simulation runs, and
only in the simulation's thread and only then."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading

import nacl.public
import nacl.utils

from overlay.dht.tokens import TokenIssuer
from sim.simulation import Simulation


def _draws(seed: int) -> tuple[bytes, ...]:
    with Simulation(seed) as sim:
        async def draw() -> tuple[bytes, ...]:
            other: list[bytes] = []
            thread = threading.Thread(target=lambda: other.append(os.urandom(16)))
            thread.start()
            thread.join()
            issuer = TokenIssuer(0.0)
            return (os.urandom(16), nacl.utils.random(24), secrets.token_bytes(8),
                    bytes(nacl.public.PrivateKey.generate()), issuer.issue("10.0.0.1", 1, 0.0),
                    other[0])

        return sim.run(draw())


def test_a_simulation_draws_its_randomness_from_the_seed() -> None:
    first, again, other = _draws(5), _draws(5), _draws(6)
    assert first[:5] == again[:5]  # keys, ids, nonces and DHT tokens repeat with the seed
    assert all(a != b for a, b in zip(first[:5], other[:5], strict=True))
    assert [len(x) for x in first] == [16, 24, 8, 32, 16, 16]
    assert first[5] != again[5]  # another thread meanwhile: the OS's bytes
    assert os.urandom(16) != os.urandom(16) != first[0]  # outside a run: the OS's bytes


CLIP = {"topology.hosts": 3, "workload.size_mb.value": 1.0, "workload.online.window_s": 5.0,
        "workload.co_recipients": ["on"]}


def test_a_real_node_run_hashes_the_same_in_another_process_after_other_runs() -> None:
    # Real nodes, server, DHT and crypto: without seeded entropy this run gave a different
    # trace hash in each of 3 processes, and another one after other runs in the same one.
    from sim.scenario import run

    run("dht-lookup", 1, {"topology.hosts": 20, "workload.lookups": 4, "workload.keys": 2,
                          "workload.healthy_lookups": 0, "dht.bootstrap_batch": 10})
    here = run("family-video", 2, CLIP)
    assert here.summary["on: completed"] == "3/3" and here.summary["on: all bytes equal"]
    code = ("from sim.scenario import run\n"
            f"print(run('family-video', 2, {CLIP!r}).trace_hash)\n")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONHASHSEED="4242"), timeout=120,
                           check=True).stdout.split()[-1]
    assert there == here.trace_hash
