"""Item 11: the consistency checker compares the cache's (key, resourceVersion) digest with storage read
exactly at the cache's revision; a mismatch is logged, counted and re-initialises the cache. Against
Cacher(memory) under asyncio and trio, and Cacher(etcd3)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

import anyio
import pytest
from prometheus_client import CollectorRegistry

from cacher.cacher import Cacher
from cacher.consistency import ConsistencyChecker, digest, entry_of, first_difference
from cacher.watcher import TerminationReason
from storage.interface import GetOptions, ListOptions, Resource
from storage.memory.store import MemoryStorage

pytestmark = pytest.mark.anyio

PODS = Resource("/pods", field_paths=("spec.nodeName",), trigger_field="spec.nodeName",
                index_fields=("spec.nodeName",))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def pod(name: str, ns: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": {}}


def checks(reg: CollectorRegistry, status: str, resource: str = "pods") -> float:
    got = reg.get_sample_value("apiserver_storage_consistency_checks_total",
                               {"group": "", "resource": resource, "status": status})
    return 0.0 if got is None else got


def cache_entries(c: Cacher) -> list:
    return [entry_of(e.object) for e in c.watch_cache.store.scan(c.resource.prefix + "/")]


async def _fill(st, prefix: str, n: int) -> dict:
    last = None
    for i in range(n):
        last = await st.create(f"{prefix}/default/p{i}", pod(f"p{i}"))
    return last


async def _fresh(c: Cacher, obj: dict) -> None:
    key = c.resource.key_for(obj)
    await c.get(key, GetOptions(resource_version=obj["metadata"]["resourceVersion"]))


async def _relisted(c: Cacher, lists: int) -> None:
    with anyio.fail_after(10):
        while c.reflector.lists < lists or not c.ready:
            await anyio.sleep(0.02)


def test_digest_and_first_difference():
    a = [("ns", "a", "1"), ("ns", "b", "2")]
    assert digest(a) == digest(list(a)) and len(digest(a)) == 16
    assert digest(a) != digest([("ns", "a", "1"), ("ns", "b", "3")])
    assert digest(a) != digest(a[:1])
    assert first_difference(a, [("ns", "a", "1"), ("ns", "b", "3")]) == (("ns", "b", "2"), ("ns", "b", "3"))
    assert first_difference(a, a[:1]) == (("ns", "b", "2"), None)


async def test_consistent_cache_counts_success():
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st, Cacher(st, metrics_registry=reg) as c:
        await c.wait_ready(5)
        last = await _fill(st, "/pods", 5)
        await st.delete("/pods/default/p2")
        await _fresh(c, last)
        result = await c.consistency_checker.check_once()
        assert result.status == "success" and result.resource_version == c.watch_cache.resource_version
        assert checks(reg, "success") == 1 and checks(reg, "failure") == 0
        assert c.reflector.lists == 1


@pytest.mark.parametrize("corruption", ["drop", "stale_rv", "extra"])
async def test_corrupted_cache_is_detected_counted_and_relisted(corruption, caplog):
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st, Cacher(st, metrics_registry=reg) as c:
        await c.wait_ready(5)
        last = await _fill(st, "/pods", 5)
        await _fresh(c, last)
        truth = cache_entries(c)
        store = c.watch_cache.store
        if corruption == "drop":
            store.delete("/pods/default/p3")
        elif corruption == "stale_rv":
            elem = store.get("/pods/default/p1")
            obj = {**elem.object, "metadata": {**elem.object["metadata"], "resourceVersion": "1"}}
            store.upsert(replace(elem, object=obj, resource_version=1))
        else:
            ghost = {**pod("ghost"), "metadata": {"name": "ghost", "namespace": "default",
                                                  "resourceVersion": "2"}}
            store.upsert(c.watch_cache._element(ghost))
        assert cache_entries(c) != truth
        async with c.watch("/pods", ListOptions(resource_version="0", recursive=True)) as w:
            with caplog.at_level(logging.ERROR, logger="cacher.consistency"):
                result = await c.consistency_checker.check_once()
            assert result.status == "failure" and result.first_difference is not None
            assert any("inconsistent" in r.getMessage() for r in caplog.records)
            assert checks(reg, "failure") == 1
            assert w.termination is TerminationReason.REINITIALIZED
        await _relisted(c, 2)
        assert cache_entries(c) == truth
        assert (await c.consistency_checker.check_once()).status == "success"
        assert checks(reg, "success") == 1


async def test_compacted_revision_counts_error_without_reinit():
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st, Cacher(st, metrics_registry=reg) as c:
        await c.wait_ready(5)
        last = await _fill(st, "/pods", 3)
        await _fresh(c, last)
        c.watch_cache.store.delete("/pods/default/p0")  # would be a failure if storage could answer
        st.kv.stall_watches()  # the cache stays behind while storage moves on and compacts
        newer = await st.create("/pods/default/late", pod("late"))
        await st.compact(int(newer["metadata"]["resourceVersion"]))
        result = await c.consistency_checker.check_once()
        assert result.status == "error" and result.error is not None and result.error.status == 410
        assert checks(reg, "error") == 1 and checks(reg, "failure") == 0
        assert c.ready and c.reflector.lists == 1
        st.kv.resume_watches()


async def test_not_ready_cache_is_skipped():
    async with MemoryStorage(PODS) as st:
        c = Cacher(st, metrics_registry=CollectorRegistry())
        assert (await c.consistency_checker.check_once()).status == "skipped"


async def test_periodic_checker_runs_in_the_cachers_task_group():
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st, Cacher(st, metrics_registry=reg,
                                                 consistency_check_interval=0.05) as c:
        await c.wait_ready(5)
        c.consistency_checker.jitter = 0.0
        with anyio.fail_after(10):
            while checks(reg, "success") < 2:
                await anyio.sleep(0.02)
    off = Cacher(st, consistency_checks=False, metrics_registry=CollectorRegistry())
    assert isinstance(off.consistency_checker, ConsistencyChecker) and off.consistency_checks is False


async def test_consistency_check_against_etcd(etcd_server):
    from storage.etcd3.store import Etcd3Storage
    prefix = f"/pods{uuid.uuid4().hex[:8]}"
    res = Resource(prefix)
    reg = CollectorRegistry()
    async with Etcd3Storage(res, endpoints=[etcd_server.endpoint]) as st, \
            Cacher(st, metrics_registry=reg) as c:
        await c.wait_ready(10)
        last = await _fill(st, prefix, 4)
        await _fresh(c, last)
        truth = cache_entries(c)
        assert (await c.consistency_checker.check_once()).status == "success"
        assert checks(reg, "success", prefix[1:]) == 1
        c.watch_cache.store.delete(f"{prefix}/default/p1")
        assert (await c.consistency_checker.check_once()).status == "failure"
        assert checks(reg, "failure", prefix[1:]) == 1
        await _relisted(c, 2)
        assert cache_entries(c) == truth
