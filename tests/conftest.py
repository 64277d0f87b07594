"""Fixtures shared by tests in several folders."""

from tests.dnstest import dns_server

__all__ = ["dns_server"]
