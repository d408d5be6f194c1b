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


@pytest.mark.parametrize("backend", ["memory", "etcd3"])
async def test_list_larger_than_the_default_page_reads_every_page_at_one_revision(backend, request,
                                                                                   monkeypatch):
    """A list with no limit over more keys than the backend reads per round trip (10,000 by default;
    shrunk to 5 here) still returns every object, all read at the first page's revision."""
    import storage.etcd3.lister as etcd_lister
    import storage.memory.store as memory_store
    from storage.interface import ListOptions
    from storage.testing.conformance import fresh_resource, key, pod

    monkeypatch.setattr(etcd_lister, "MAX_PAGE", 5)
    monkeypatch.setattr(memory_store, "MAX_PAGE", 5)
    target = etcd_target(request.getfixturevalue("etcd_server")) if backend == "etcd3" else memory_target()
    res = fresh_resource()
    async with target.open(res) as (s, _):
        for i in range(12):
            await s.create(key(res, f"p{i:02d}"), pod(res, f"p{i:02d}"))
        listed = await s.get_list(res.prefix, ListOptions(recursive=True))
        assert [o["metadata"]["name"] for o in listed.items] == [f"p{i:02d}" for i in range(12)]
        assert listed.continue_token == "" and listed.revision == await s.get_current_resource_version()
