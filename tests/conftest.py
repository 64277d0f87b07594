"""Fixtures shared by tests in several folders."""

# Imported here, at collection: otherwise Hypothesis's pytest plugin first imports it in
# its terminal summary, after the tests, and pytest's assertion rewriting then parses it
# with Python 3.11.7's AST constructor, which can fail there with "SystemError: AST
# constructor recursion depth mismatch" (a CPython 3.11 bug) and make a passing run of a
# test file without Hypothesis exit 1 (tests/overlay/test_send_overlap.py did).
import hypothesis  # noqa: F401

from tests.dnstest import dns_server
from tests.pgtest import pg_cluster, pg_url

__all__ = ["dns_server", "pg_cluster", "pg_url"]
