"""What the real code draws from the OS comes from the seed while a simulation runs, and
only in the simulation's thread and only then."""

from __future__ import annotations

import os
import secrets
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
