"""Fixtures shared by tests in several folders."""

# Imported here, at collection: otherwise Hypothesis's pytest plugin first imports it in
# its terminal summary, after the tests, and pytest's assertion rewriting then parses it
# with Python 3.11.7's AST constructor, which can fail there with "SystemError: AST
# constructor recursion depth mismatch" (a CPython 3.11 bug) and make a passing run of a
# test file without Hypothesis exit 1 (tests/overlay/test_send_overlap.py did).
import os
import signal
import tempfile

import hypothesis  # noqa: F401

from tests.dnstest import dns_server
from tests.pgtest import own_pg_cluster, pg_cluster, pg_url

__all__ = ["dns_server", "own_pg_cluster", "pg_cluster", "pg_url"]

# Matplotlib (the simulator's plots) keeps its font cache in MPLCONFIGDIR, else in
# ~/.cache/matplotlib: a test run wrote into the user's home. This run, and the processes
# its tests start, get a folder of their own, removed when the run ends; the user's own
# runs keep theirs. Set before anything imports matplotlib (sim/ imports it only to draw).
_MPL_CONFIG = tempfile.TemporaryDirectory(prefix="peerpost-tests-matplotlib-")
os.environ["MPLCONFIGDIR"] = _MPL_CONFIG.name

# A shell without job control (`pytest ... &` in a script, CI runners) starts background
# commands with SIGINT ignored, and every process they start inherits that: the tests that
# press Ctrl-C (on `fetch --wait`, `status --wait`, a simulation) then saw nothing happen
# and failed. Python's own handler here is reset to the default in the processes the
# tests start, so those get Ctrl-C as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
