"""Hash and sealing speeds on this machine: the measurement behind the Merkle hash choice.

`python -m benchmarks hashes [--mib N]` hashes and seals N MiB in 1 MiB chunks (the default
chunk size) and prints MiB/s for SHA-256, BLAKE2b, BLAKE3 (1 and 2 threads), the chunk AEAD,
and the per-chunk pipeline a sender runs (seal, then leaf-hash).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import blake3

from benchmarks.common import report
from crypto.content import chunk_hash, open_chunk, seal_chunk

CHUNK = 1 << 20


def _rate(fn: Callable[[bytes], object], data: bytes, mib: int) -> float:
    best = 0.0
    for _ in range(3):  # best of 3: the machine is shared
        t0 = time.perf_counter()
        for _ in range(mib):
            fn(data)
        best = max(best, mib / (time.perf_counter() - t0))
    return best


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks hashes")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default benchmarks/out/hashes.json)")
    args = ap.parse_args(argv)
    data = os.urandom(CHUNK)
    key = os.urandom(32)
    sealed = seal_chunk(key, 0, data)
    cases: dict[str, Callable[[bytes], object]] = {
        "sha256": lambda d: hashlib.sha256(d).digest(),
        "blake2b-256": lambda d: hashlib.blake2b(d, digest_size=32).digest(),
        "blake3 (1 thread)": lambda d: blake3.blake3(d).digest(),
        "blake3 (all threads)": lambda d: blake3.blake3(d, max_threads=blake3.blake3.AUTO).digest(),
        "xchacha20-poly1305 seal": lambda d: seal_chunk(key, 0, d),
        "xchacha20-poly1305 open": lambda d: open_chunk(key, 0, sealed),
        "sender pipeline (seal + leaf hash)": lambda d: chunk_hash(seal_chunk(key, 0, d)),
    }
    rows = [{"metric": name, "value": round(_rate(fn, data, args.mib), 1), "unit": "MiB/s"}
            for name, fn in cases.items()]
    report("hashes", rows, out=args.out, meta={"mib": args.mib, "chunk": CHUNK})
    return 0
