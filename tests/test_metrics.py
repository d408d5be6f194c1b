"""Item 12: the Cacher's Prometheus metrics, under kube-apiserver's names, read back from a private
CollectorRegistry after the behaviour they count has happened. Runs under asyncio and trio."""

from __future__ import annotations

import uuid

import anyio
import pytest
from prometheus_client import CollectorRegistry

from cacher.cacher import Cacher
from cacher.metrics import CacherMetrics, group_resource
from cacher.watcher import TerminationReason
from storage.errors import ExpiredError, InternalError
from storage.interface import GetOptions, ListOptions, Resource
from storage.memory.store import MemoryStorage
from storage.testing.conformance import collect

pytestmark = pytest.mark.anyio

PODS = Resource("/pods", field_paths=("spec.nodeName",), trigger_field="spec.nodeName",
                index_fields=("spec.nodeName",))
GR = {"group": "", "resource": "pods"}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def pod(name: str, node: str = "", ns: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": {"nodeName": node}}


def k(name: str, ns: str = "default") -> str:
    return f"/pods/{ns}/{name}"


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    got = reg.get_sample_value(name, {**GR, **labels})
    return 0.0 if got is None else got


async def _until(cond, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.02)


def test_group_resource_from_prefix():
    assert group_resource("/pods") == ("", "pods")
    assert group_resource("/apiextensions.k8s.io/customresourcedefinitions") == (
        "apiextensions.k8s.io", "customresourcedefinitions")


def test_families_are_created_once_per_registry_and_labelled_per_resource():
    reg = CollectorRegistry()
    pods, nodes, pods_again = (CacherMetrics("/pods", reg), CacherMetrics("/nodes", reg),
                               CacherMetrics("/pods", reg))
    pods.events_received.inc(2)
    pods_again.events_received.inc()
    nodes.events_received.inc(5)
    assert reg.get_sample_value("apiserver_watch_cache_events_received_total", GR) == 3
    assert reg.get_sample_value("apiserver_watch_cache_events_received_total",
                                {"group": "", "resource": "nodes"}) == 5
    other = CollectorRegistry()  # a second registry gets its own families, no duplicate-name clash
    CacherMetrics("/pods", other).events_received.inc()
    assert other.get_sample_value("apiserver_watch_cache_events_received_total", GR) == 1
    pods.record_resource_version(10 ** 15 + 7)
    assert reg.get_sample_value("apiserver_watch_cache_resource_version", GR) == 7


async def test_events_received_and_dispatched_equal_writes():
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st, Cacher(st, metrics_registry=reg) as c:
        await c.wait_ready(5)
        assert value(reg, "apiserver_watch_cache_initializations_total") == 1
        assert value(reg, "apiserver_watch_cache_initialization_duration_seconds_count") == 1
        async with c.watch("/pods", ListOptions(resource_version="0", recursive=True)) as w:
            for i in range(5):
                await st.create(k(f"p{i}"), pod(f"p{i}"))
            last = await st.guaranteed_update(k("p0"), lambda o, m: {**o, "v": 1})
            await st.delete(k("p1"))
            await collect(w, 7)
        await _until(lambda: value(reg, "apiserver_watch_cache_events_dispatched_total") >= 7)
        assert value(reg, "apiserver_watch_cache_events_received_total") == 7
        assert value(reg, "apiserver_watch_cache_events_dispatched_total") == 7
        assert value(reg, "apiserver_watch_cache_resource_version") == c.watch_cache.resource_version
        assert c.watch_cache.resource_version > int(last["metadata"]["resourceVersion"]) - 1
        assert value(reg, "watch_cache_capacity") == c.watch_cache.history.capacity


async def test_terminated_slow_watcher_is_counted():
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st, Cacher(st, watcher_capacity=5, metrics_registry=reg,
                                                 catch_up_lagging=False) as c:
        await c.wait_ready(5)
        start = str(await st.get_current_resource_version())
        slow = c.watch("/pods", ListOptions(resource_version=start, recursive=True))
        await slow.start()
        for i in range(40):
            await st.create(k(f"p{i}"), pod(f"p{i}"))
        await _until(lambda: slow.termination is TerminationReason.TOO_SLOW)
        assert value(reg, "apiserver_terminated_watchers_total") == 1
        await slow.stop()


async def test_relist_counts_an_initialization_and_init_events():
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st, Cacher(st, metrics_registry=reg) as c:
        await c.wait_ready(5)
        await st.create(k("a"), pod("a"))
        await st.create(k("b"), pod("b"))
        with anyio.fail_after(5):
            while not st.kv._sinks:
                await anyio.sleep(0.01)
        st.kv.break_watches(ExpiredError("too old"))
        await _until(lambda: c.reflector.lists >= 2 and c.ready)
        assert value(reg, "apiserver_watch_cache_initializations_total") == 2
        assert value(reg, "apiserver_init_events_total") == 2  # the second list loaded a and b
        assert value(reg, "apiserver_watch_cache_initialization_duration_seconds_count") == 2


class _BrokenList:
    """A storage wrapper whose reflector LIST fails until ``healed``."""

    def __init__(self, inner: MemoryStorage) -> None:
        self.inner, self.resource, self.healed = inner, inner.resource, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def get_list(self, key, opts=ListOptions()):
        if not self.healed and opts.limit == 10000:
            raise InternalError("etcd unavailable")
        return await self.inner.get_list(key, opts)


async def test_failed_initialization_is_counted():
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st:
        broken = _BrokenList(st)
        async with Cacher(broken, metrics_registry=reg) as c:
            await _until(lambda: value(reg, "apiserver_watch_cache_initialization_errors_total") >= 1)
            assert value(reg, "apiserver_watch_cache_initializations_total") == 0
            broken.healed = True
            await c.wait_ready(10)
            assert value(reg, "apiserver_watch_cache_initializations_total") == 1


async def test_consistent_reads_and_read_wait_are_counted():
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st, Cacher(st, metrics_registry=reg, freshness_timeout=0.3) as c:
        await c.wait_ready(5)
        await st.create(k("a"), pod("a"))
        await c.get_list("/pods", ListOptions(recursive=True))
        assert value(reg, "apiserver_watch_cache_consistent_read_total", success="true", fallback="false") == 1
        assert value(reg, "apiserver_watch_cache_read_wait_seconds_count") >= 1
        st.kv.stall_watches()
        await st.create(k("b"), pod("b"))
        got = await c.get_list("/pods", ListOptions(recursive=True))
        assert len(got.items) == 2
        assert value(reg, "apiserver_watch_cache_consistent_read_total", success="true", fallback="true") == 1
        st.kv.resume_watches()


async def test_list_from_cache_counts_index_fetched_and_returned():
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st, Cacher(st, metrics_registry=reg) as c:
        await c.wait_ready(5)
        for i in range(9):
            last = await st.create(k(f"p{i}"), pod(f"p{i}", f"n{i % 3}"))
        rv = last["metadata"]["resourceVersion"]
        await c.get(k("p8"), GetOptions(resource_version=rv))
        by_node = await c.get_list("/pods", ListOptions(resource_version=rv, recursive=True,
                                                        field_selector="spec.nodeName=n1"))
        assert len(by_node.items) == 3
        assert value(reg, "apiserver_cache_list_total", index="spec.nodeName") == 1
        assert value(reg, "apiserver_cache_list_fetched_objects_total", index="spec.nodeName") == 3
        by_name = await c.get_list("/pods", ListOptions(resource_version="0", recursive=True,
                                                        field_selector="metadata.name=p4"))
        assert len(by_name.items) == 1
        assert value(reg, "apiserver_cache_list_total", index="") == 1
        assert value(reg, "apiserver_cache_list_fetched_objects_total", index="") == 9
        assert value(reg, "apiserver_cache_list_returned_objects_total") == 4


async def test_history_resizes_are_counted():
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st, Cacher(st, metrics_registry=reg, history_lower=4,
                                                 history_upper=16) as c:
        await c.wait_ready(5)
        assert value(reg, "watch_cache_capacity") == 4
        for i in range(10):
            last = await st.create(k(f"p{i}"), pod(f"p{i}"))
        await c.get(k("p9"), GetOptions(resource_version=last["metadata"]["resourceVersion"]))
        assert value(reg, "watch_cache_capacity_increase_total") == c.watch_cache.history.resizes["increase"] >= 1
        assert value(reg, "watch_cache_capacity") == c.watch_cache.history.capacity == 16


async def test_default_registry_is_used_without_a_custom_one():
    from prometheus_client import REGISTRY
    res = Resource(f"/widgets{uuid.uuid4().hex[:8]}")
    async with MemoryStorage(res) as st, Cacher(st) as c:
        await c.wait_ready(5)
        labels = {"group": "", "resource": res.prefix[1:]}
        assert REGISTRY.get_sample_value("apiserver_watch_cache_initializations_total", labels) == 1


async def test_lagging_watcher_ended_by_410_is_counted_as_terminated():
    reg = CollectorRegistry()
    async with MemoryStorage(PODS) as st, Cacher(st, watcher_capacity=5, history_lower=8, history_upper=8,
                                                 metrics_registry=reg) as c:
        await c.wait_ready(5)
        start = str(await st.get_current_resource_version())
        lagging = c.watch("/pods", ListOptions(resource_version=start, recursive=True))
        await lagging.start()
        for i in range(40):
            await st.create(k(f"p{i}"), pod(f"p{i}"))
        await _until(lambda: lagging.finished)
        assert value(reg, "apiserver_terminated_watchers_total") == 1
        await lagging.stop()


async def test_events_received_and_dispatched_against_etcd(etcd_server):
    from storage.etcd3.store import Etcd3Storage
    res = Resource(f"/pods{uuid.uuid4().hex[:8]}")
    labels = {"group": "", "resource": res.prefix[1:]}
    reg = CollectorRegistry()
    async with Etcd3Storage(res, endpoints=[etcd_server.endpoint]) as st, Cacher(st, metrics_registry=reg) as c:
        await c.wait_ready(10)
        async with c.watch(res.prefix, ListOptions(resource_version="0", recursive=True)) as w:
            for i in range(4):
                await st.create(f"{res.prefix}/ns/p{i}", {"metadata": {"name": f"p{i}", "namespace": "ns"}})
            await st.delete(f"{res.prefix}/ns/p0")
            await collect(w, 5)
        await _until(lambda: (reg.get_sample_value("apiserver_watch_cache_events_dispatched_total", labels)
                              or 0) >= 5)
        assert reg.get_sample_value("apiserver_watch_cache_events_received_total", labels) == 5
        assert reg.get_sample_value("apiserver_watch_cache_events_dispatched_total", labels) == 5
        assert reg.get_sample_value("apiserver_watch_cache_initializations_total", labels) == 1
