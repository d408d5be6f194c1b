"""The conformance suite (storage/testing/conformance.py) against every target: memory, etcd3 (real
etcd), Cacher(memory) and Cacher(etcd3)."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest

from cacher.cacher import Cacher
from storage.memory.store import MemoryStorage
from storage.testing.conformance import ClosedStorageConformance, StorageConformance, Target


def memory_target() -> Target:
    @asynccontextmanager
    async def open_(resource):
        async with MemoryStorage(resource) as s:
            yield s, s
    return Target("memory", open_)


def etcd_target(server) -> Target:
    from storage.etcd3.store import Etcd3Storage

    @asynccontextmanager
    async def open_(resource):
        async with Etcd3Storage(resource, endpoints=[server.endpoint]) as s:
            yield s, s
    return Target("etcd3", open_)


def cached(inner: Target) -> Target:
    @asynccontextmanager
    async def open_(resource):
        async with inner.open(resource) as (s, raw):
            async with Cacher(s, freshness_timeout=1.0) as c:
                await c.wait_ready(10)
                yield c, raw
    return Target(f"cacher({inner.name})", open_, cached=True)


pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(params=["memory", "etcd3", "cacher(memory)", "cacher(etcd3)"])
def target(request) -> Target:
    name = request.param
    base = "etcd3" if "etcd3" in name else "memory"
    inner = etcd_target(request.getfixturevalue("etcd_server")) if base == "etcd3" else memory_target()
    return cached(inner) if name.startswith("cacher") else inner


class TestConformance(StorageConformance):
    pass


class TestClosed(ClosedStorageConformance):
    pass


class TestConformanceTrio(StorageConformance):
    """The same suite under trio: the library is anyio throughout."""

    @pytest.fixture
    def anyio_backend(self):
        return "trio"


class TestConformanceEtcd34(StorageConformance):
    """The etcd3 target against etcd 3.4 (Debian's etcd-server), asyncio only: the server version the
    oldest supported clusters run (progress notifications differ: reference 2.10)."""

    @pytest.fixture
    def target(self, etcd34_server) -> Target:
        assert etcd34_server.version.startswith("3.4."), etcd34_server.version
        return etcd_target(etcd34_server)
