"""glibc's malloc held to one heap policy in the rendezvous server.

By default glibc returns the top of its heap to the kernel once more than twice its
(dynamic) mmap threshold is free there, about 512 KiB after the first quarter-megabyte
buffer was freed. A process that allocates and frees a few hundred kilobytes at a time,
as a TLS connection does for every read (uvloop hands each read's plaintext over as a new
`bytes`), then shrinks and regrows its heap on every buffer: `brk` twice and the kernel
zeroing the pages again on first touch, 96 minor page faults per 256 KiB buffer measured
here. Relaying over TLS, the server spent 9% of its samples in `brk` alone and 2.24-2.51
CPU s/GB (the relay rows of `benchmarks paths`, TLS on both legs, 512 MiB); with this
policy 1.60-1.70, 469-599 MB/s against 388-442, peak RSS 52 MiB against 51. Messages are
unchanged: 27.2 KiB per idle connection against 27.1 and 72 µs of CPU per delivered
message against 77 (`benchmarks rendezvous`, 10,000 connections).

The node daemon keeps glibc's default: its bulk buffers are reused already, and with the
policy a 1 GiB delivery was no cheaper (2.34 and 2.48 CPU s/GB against 2.26 and 2.31).

The policy: blocks of up to MMAP_THRESHOLD come from the heap; the heap grows by TOP_PAD
more than asked and is trimmed only when TRIM_THRESHOLD is free at its top, so at most
about 9 MiB stays mapped beyond what is in use. Settings the operator gave through glibc's
own environment (MALLOC_*_ variables, GLIBC_TUNABLES) win: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

# mallopt(3) parameter numbers (malloc.h); stable glibc ABI.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 8 << 20
TOP_PAD = 1 << 20
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_heap(environ: Mapping[str, str] | None = None) -> bool:
    """Apply the policy above to this process; False where it does not apply (no glibc
    `mallopt`, or the environment already sets malloc's tunables)."""
    env = os.environ if environ is None else environ
    if any(k in env for k in _ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting any of the three ends glibc's dynamic thresholds.
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD)))
