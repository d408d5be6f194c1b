"""Shared fixtures: one real etcd server for the whole test session (never skipped: a missing etcd
binary is a failure), started on free loopback ports with a temporary data directory."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="session")
def etcd34_server():
    """A running etcd 3.4 server (Debian's ``etcd-server`` package): binary from ``ETCD34_BIN``, default
    /usr/bin/etcd. Missing or not 3.4 → the test fails (never skips); .ci/run installs the package."""
    from storage.testing.etcd_server import binary_version

    binary = os.environ.get("ETCD34_BIN", "/usr/bin/etcd")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"etcd 3.4 binary {binary!r} not found: apt-get install etcd-server or set ETCD34_BIN")
    version = binary_version(binary)
    if version[:2] != (3, 4):
        pytest.fail(f"{binary} is etcd {'.'.join(map(str, version))}, expected 3.4.x")
    server = EtcdServer(binary=binary, name="test-etcd34")
    server.start()
    try:
        yield server
    finally:
        server.close()
