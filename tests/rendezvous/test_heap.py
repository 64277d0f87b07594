"""The heap policy of the long-running processes: a buffer of a few hundred kilobytes,
freed and allocated again, no longer costs the kernel fresh pages each time."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from rendezvous.heap import keep_heap

# Allocates and frees 500 buffers of each size, as a TLS connection does per read, and
# prints the minor page faults that took.
_CHURN = r"""
import os, resource, sys
from rendezvous.heap import keep_heap
applied = keep_heap() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
for size in (256 << 10, 1 << 20):
    for _ in range(500):
        x = os.urandom(16) * (size // 16)
        y = x + b"."
        del x, y
print(applied, faults() - before)
"""


def _churn(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_buffers_freed_and_taken_again_reuse_their_pages() -> None:
    applied, kept = _churn("keep")
    _, default = _churn("default")
    assert applied == "True"
    # glibc's default: 96 faults per 256 KiB buffer and 384 per MiB, about 240,000 here.
    assert default > 100_000, default
    assert kept < 5_000, kept


def test_malloc_settings_from_the_environment_win() -> None:
    for var in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_",
                "GLIBC_TUNABLES"):
        assert keep_heap({var: "glibc.malloc.trim_threshold=1"}) is False
