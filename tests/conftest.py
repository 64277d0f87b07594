"""Fixtures shared by tests in several folders."""

# Imported here, at collection: otherwise Hypothesis's pytest plugin first imports it in
# its terminal summary, after the tests, and pytest's assertion rewriting then parses it
# with Python 3.11.7's AST constructor, which can fail there with "SystemError: AST
# constructor recursion depth mismatch" (a CPython 3.11 bug) and make a passing run of a
# test file without Hypothesis exit 1 (tests/overlay/test_send_overlap.py did).
import signal

import hypothesis  # noqa: F401

from tests.dnstest import dns_server
from tests.pgtest import own_pg_cluster, pg_cluster, pg_url

__all__ = ["dns_server", "own_pg_cluster", "pg_cluster", "pg_url"]

# A shell without job control (`pytest ... &` in a script, CI runners) starts background
# commands with SIGINT ignored, and every process they start inherits that: the tests that
# press Ctrl-C (on `fetch --wait`, `status --wait`, a simulation) then saw nothing happen
# and failed. Python's own handler here is reset to the default in the processes the
# tests start, so those get Ctrl-C as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
