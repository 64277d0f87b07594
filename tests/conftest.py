"""Fixtures shared by tests in several folders."""

from tests.dnstest import dns_server
from tests.pgtest import pg_cluster, pg_url

__all__ = ["dns_server", "pg_cluster", "pg_url"]
