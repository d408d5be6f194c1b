"""Shared fixtures: one real etcd server for the whole test session (never skipped: a missing etcd
binary is a failure), started on free loopback ports with a temporary data directory."""

from __future__ import annotations

import pytest

from storage.testing.etcd_server import EtcdServer


@pytest.fixture(scope="session")
def etcd_server():
    """A running EtcdServer (storage/testing/etcd_server.py); ``.endpoint`` is "127.0.0.1:<port>"."""
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
