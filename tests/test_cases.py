"""The 26 field cases of ../shared/cases/watch-cache-cases.md, one or more named tests each.

Every case runs against Cacher(memory) with the in-memory backend's fault hooks (MemoryKV:
stall_current_watches, resume_watches, break_watches, inject_progress, strip_prev_kv,
cancel_watch_creates, drop_progress) or the FaultyStorage wrapper below (works around any backend:
gated/broken upstream watches, failing or slow LISTs, a backend without progress requests), and
against Cacher(etcd3) on a real etcd wherever the fault can be produced for real (dedicated servers
for kill/restart, compaction through the client). The test names start with the case ID.

Pinned choices where Kubernetes leaves one:
* PAG-2: (a) a LIST with resource version "0" ignores the limit and returns everything, no continue token.
* PAG-3: the legacy rule is copied: limit + resource version N (no match) is an exact read at N.
* BMK-2 (3): Kubernetes' validation rejects sendInitialEvents without resourceVersionMatch=NotOlderThan
  (400); with NotOlderThan but without allowWatchBookmarks the watch is valid and simply carries no
  initial-events-end bookmark (validation.go validateWatchOptions has no bookmark rule).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import tracemalloc
import uuid
from contextlib import asynccontextmanager
from typing import Any, Callable

import anyio
import pytest

from cacher.cacher import Cacher
from cacher.reflector import LIST_PAGE_SIZE
from cacher.watcher import TerminationReason
from storage.errors import (BadRequestError, ExpiredError, InternalError, NotFoundError,
                            ServiceUnavailableError, StorageError, TooLargeResourceVersionError,
                            TooManyRequestsError)
from storage.etcd3 import Etcd3Storage
from storage.interface import (INITIAL_EVENTS_END_ANNOTATION, EventType, GetOptions, ListOptions,
                               Resource, WatchEvent)
from storage.memory.store import MemoryStorage
from storage.testing.conformance import collect, collect_until_quiet, summary
from storage.testing.etcd_server import EtcdServer

pytestmark = pytest.mark.anyio

NOT_OLDER = "NotOlderThan"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


# ---------------------------------------------------------------------------------------------- helpers

def mk_res(base: str = "pods") -> Resource:
    return Resource(f"/{base}-{uuid.uuid4().hex[:8]}", field_paths=("spec.nodeName",),
                    trigger_field="spec.nodeName", index_fields=("spec.nodeName",))


def pod(name: str, ns: str = "ns", node: str = "", labels: dict[str, str] | None = None,
        **extra: Any) -> dict[str, Any]:
    out = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {})},
           "spec": {"nodeName": node}}
    out.update(extra)
    return out


def k(r: Resource, name: str, ns: str = "ns") -> str:
    return f"{r.prefix}/{ns}/{name}"


def rv(o: dict[str, Any]) -> int:
    return int(o["metadata"]["resourceVersion"])


def W(**kw: Any) -> ListOptions:
    return ListOptions(recursive=True, **kw)


def bump(**data: Any) -> Callable:
    return lambda o, m: {**o, "data": dict(data)}


def set_labels(labels: dict[str, str]) -> Callable:
    return lambda o, m: {**o, "metadata": {**o["metadata"], "labels": dict(labels)}}


def set_node(node: str) -> Callable:
    return lambda o, m: {**o, "spec": {**o.get("spec", {}), "nodeName": node}}


def rvs(events: list[WatchEvent]) -> list[int]:
    return [e.resource_version for e in events if e.type not in (EventType.BOOKMARK, EventType.ERROR)]


def errors_of(events: list[WatchEvent]) -> list[dict[str, Any]]:
    return [e.object for e in events if e.type is EventType.ERROR]


async def collect_for(watch, seconds: float) -> list[WatchEvent]:
    """Every event that arrives within ``seconds`` (or until the stream ends)."""
    out: list[WatchEvent] = []
    with anyio.move_on_after(seconds):
        while True:
            batch = await watch.next_batch()
            if not batch:
                break
            out.extend(batch)
    return out


async def until(cond: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02, what: str = "") -> None:
    with anyio.fail_after(timeout):
        while True:
            value = cond()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return
            await anyio.sleep(interval)


async def cache_reaches(c: Cacher, rev: int, timeout: float = 10.0) -> None:
    await until(lambda: c.watch_cache.resource_version >= rev, timeout)


async def expect_410(w) -> None:
    """The watch either fails to start with ExpiredError or delivers one ERROR 410 and ends."""
    try:
        await w.start()
    except ExpiredError:
        return
    got = await collect(w, 1, 5.0)
    await w.stop()
    assert got and got[0].type is EventType.ERROR and got[0].object["code"] == 410, summary(got)


class FaultWatch:
    """A watch of FaultyStorage: the inner watch, which the test can break or keep from starting."""

    def __init__(self, owner: "FaultyStorage", key: str, opts: ListOptions) -> None:
        self.owner, self.key, self.opts = owner, key, opts
        self.inner: Any = None
        self._error: StorageError | None = None
        self._done = False
        self._pending: list[WatchEvent] = []

    async def start(self) -> "FaultWatch":
        while self.owner.watch_gate is not None:
            await self.owner.watch_gate.wait()
        self.inner = self.owner.inner.watch(self.key, self.opts)
        await self.inner.start()
        self.owner.open_watches.add(self)
        return self

    async def __aenter__(self) -> "FaultWatch":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._done = True
        self.owner.open_watches.discard(self)
        if self.inner is not None:
            await self.inner.stop()

    def break_(self, error: StorageError) -> None:
        self._error = error
        self.owner.open_watches.discard(self)
        if self.inner is not None:
            self.inner._stop_now()  # a dropped connection: buffered events are lost, the reader wakes

    def _take_error(self) -> list[WatchEvent]:
        err, self._error, self._done = self._error, None, True
        return [WatchEvent(EventType.ERROR, err.to_status())]  # type: ignore[union-attr]

    async def next_batch(self) -> list[WatchEvent]:
        if self._error is not None:
            return self._take_error()
        if self._done:
            return []
        batch = await self.inner.next_batch()
        if self._error is not None:
            return self._take_error()
        return batch

    def __aiter__(self) -> "FaultWatch":
        return self

    async def __anext__(self) -> WatchEvent:
        if not self._pending:
            batch = await self.next_batch()
            if not batch:
                raise StopAsyncIteration
            self._pending.extend(batch)
        return self._pending.pop(0)


class FaultyStorage:
    """A Storage wrapper around any backend with fault switches for the tests.

    list_error: raised by get_list; list_delay: seconds get_list waits *after* reading (a slow
    transfer: the snapshot is as old as the call); watch_gate: while set, upstream watches do not start;
    break_watches(error): drop every open watch with ``error``; progress_supported False: the backend
    has no progress requests and cannot tell its version (kine). Records every list/watch option.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.resource = inner.resource
        self.list_error: StorageError | None = None
        self.list_delay = 0.0
        self.watch_gate: anyio.Event | None = None
        self.open_watches: set[FaultWatch] = set()
        self.list_opts: list[ListOptions] = []
        self.watch_opts: list[ListOptions] = []
        self.progress_supported = True

    def __getattr__(self, name: str) -> Any:
        if name == "server_version" and not self.__dict__.get("progress_supported", True):
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)

    async def get_list(self, key: str, opts: ListOptions = ListOptions()):
        # The list faults hit the cache's own (re)list only, which pages at LIST_PAGE_SIZE; reads the
        # Cacher delegates for its clients reach the backend untouched.
        self.list_opts.append(opts)
        cache_list = opts.limit == LIST_PAGE_SIZE
        if cache_list and self.list_error is not None:
            raise self.list_error
        out = await self.inner.get_list(key, opts)
        if cache_list and self.list_delay:
            await anyio.sleep(self.list_delay)
        return out

    def watch(self, key: str, opts: ListOptions = ListOptions()) -> FaultWatch:
        self.watch_opts.append(opts)
        return FaultWatch(self, key, opts)

    async def request_watch_progress(self) -> None:
        if self.progress_supported:
            await self.inner.request_watch_progress()

    def gate_watches(self) -> None:
        self.watch_gate = self.watch_gate or anyio.Event()

    def open_gate(self) -> None:
        gate, self.watch_gate = self.watch_gate, None
        if gate is not None:
            gate.set()

    def break_watches(self, error: StorageError) -> None:
        for w in list(self.open_watches):
            w.break_(error)


async def _wait_upstream(c: Cacher, count: int = 1) -> None:
    await until(lambda: c.reflector.watches_opened >= count, 10)
    await anyio.sleep(0.1)  # let the upstream create reach the server


@asynccontextmanager
async def dedicated_etcd(*extra: str):
    """A private etcd server for destructive faults (never the shared session one)."""
    server = EtcdServer(extra_args=list(extra))
    await anyio.to_thread.run_sync(server.start)
    try:
        yield server
    finally:
        await anyio.to_thread.run_sync(server.close)


# ------------------------------------------------------------------------------- both-target cases

class _Cases:
    """Cases that run against Cacher(memory) and Cacher(etcd3); subclasses say how to open storage."""

    kind = ""

    @asynccontextmanager
    async def storage(self, request, r: Resource, sibling_of: Any = None, **kw: Any):
        if self.kind == "memory":
            kv = sibling_of.kv if sibling_of is not None else None
            async with MemoryStorage(r, kv=kv, **kw) as st:
                yield st
        else:
            server = request.getfixturevalue("etcd_server")
            async with Etcd3Storage(r, server.endpoint, **kw) as st:
                yield st

    # ---- RV-1 ------------------------------------------------------------------------------------
    async def test_rv1_watch_from_n_excludes_n(self, request):
        r = mk_res("secrets")
        async with self.storage(request, r) as st, Cacher(st, freshness_timeout=1.0) as c:
            await c.wait_ready(10)
            t = await st.create(k(r, "t"), pod("t", labels={"app": "x"}))
            await cache_reaches(c, rv(t))
            selectors = [{}, {"label_selector": "app=x"}, {"field_selector": "metadata.name=t"},
                         {"field_selector": "spec.nodeName="}]
            watches = [c.watch(r.prefix, W(resource_version=str(rv(t)), **s)) for s in selectors]
            for w in watches:
                await w.start()
            u = await st.guaranteed_update(k(r, "t"), bump(v=1))
            for w, s in zip(watches, selectors):
                got = await collect_until_quiet(w, 0.5)
                assert summary(got) == [("MODIFIED", "t", rv(u))], s
                await w.stop()

    async def test_rv1_watch_from_oldest_event_in_window_excludes_it(self, request):
        r = mk_res("secrets")
        async with self.storage(request, r) as st, Cacher(st, history_lower=4, history_upper=4,
                                                          fresh_duration=0.0) as c:
            await c.wait_ready(10)
            await st.create(k(r, "pre"), pod("pre"))
            t = await st.create(k(r, "t"), pod("t"))
            ups = [await st.guaranteed_update(k(r, "t"), bump(v=i)) for i in range(3)]
            await cache_reaches(c, rv(ups[-1]))
            hist = c.watch_cache.history
            assert hist.events_since(hist.oldest_servable_rv())[0].resource_version == rv(t)
            async with c.watch(r.prefix, W(resource_version=str(rv(t)))) as w:
                got = await collect_until_quiet(w, 0.5)
            assert summary(got) == [("MODIFIED", "t", rv(u)) for u in ups]

    # ---- RV-2 ------------------------------------------------------------------------------------
    async def test_rv2_watch_without_rv_starts_with_current_state(self, request):
        r = mk_res("nodes")
        async with self.storage(request, r) as st, Cacher(st, history_lower=50, history_upper=50,
                                                          fresh_duration=0.0) as c:
            await c.wait_ready(10)
            a = await st.create(k(r, "a"), pod("a"))
            b = await st.create(k(r, "b"), pod("b"))
            last = await st.create(k(r, "c"), pod("c"))
            for i in range(150):  # history runs past the 50-event window
                last = await st.guaranteed_update(k(r, "c"), bump(v=i))
            await cache_reaches(c, rv(last))
            await st.compact(rv(last))
            for rv_opt in ("", "0"):
                async with c.watch(r.prefix, W(resource_version=rv_opt)) as w:
                    init = await collect(w, 3)
                    assert sorted(summary(init)) == sorted(
                        [("ADDED", "a", rv(a)), ("ADDED", "b", rv(b)), ("ADDED", "c", rv(last))]), (rv_opt, summary(init))
                    assert not errors_of(init)
                    a2 = await st.guaranteed_update(k(r, "a"), bump(rv_opt=rv_opt))
                    assert summary(await collect(w, 1)) == [("MODIFIED", "a", rv(a2))]
                a = a2
            # Only an explicit rv that fell out of the window is 410.
            await expect_410(c.watch(r.prefix, W(resource_version=str(rv(a) - 100))))

    # ---- RV-3 ------------------------------------------------------------------------------------
    async def test_rv3_quiet_resource_reaches_client_rv_via_progress(self, request):
        r, other = mk_res("runtimeclasses"), mk_res("other")
        async with self.storage(request, other) as ost, self.storage(request, r, sibling_of=ost) as st:
            await ost.create(k(other, "seed"), pod("seed"))
            async with Cacher(st, freshness_timeout=3.0) as c:
                await c.wait_ready(10)
                await _wait_upstream(c)
                for i in range(20):
                    last = await ost.create(k(other, f"o{i}"), pod(f"o{i}"))
                target = rv(last)
                if not c.consistent_reads_from_cache:
                    # Progress from this etcd version is not trusted (see CON-3): the "off" branch.
                    with anyio.fail_after(5), pytest.raises(TooLargeResourceVersionError) as err:
                        await c.get_list(r.prefix, W(resource_version=str(target)))
                    assert err.value.retry_after_seconds == 1
                    assert (await c.get_list(r.prefix, W())).revision >= target  # rv unset works
                    return
                with anyio.fail_after(5):
                    got = await c.get_list(r.prefix, W(resource_version=str(target)))
                assert got.revision >= target and got.items == []
                async with c.watch(r.prefix, W(resource_version=str(target))) as w:
                    x = await st.create(k(r, "rc"), pod("rc"))
                    assert summary(await collect(w, 1)) == [("ADDED", "rc", rv(x))]

    async def test_rv3_without_progress_notifications_too_large_rv_then_rv_unset(self, request):
        r, other = mk_res("runtimeclasses"), mk_res("other")
        async with self.storage(request, other) as ost, self.storage(request, r, sibling_of=ost) as st:
            await ost.create(k(other, "seed"), pod("seed"))
            fs = FaultyStorage(st)
            fs.progress_supported = False
            if self.kind == "memory":
                st.kv.drop_progress = True
            async with Cacher(fs, freshness_timeout=1.0) as c:
                await c.wait_ready(10)
                await _wait_upstream(c)
                for i in range(5):
                    last = await ost.create(k(other, f"o{i}"), pod(f"o{i}"))
                with anyio.fail_after(5), pytest.raises(TooLargeResourceVersionError) as ei:
                    await c.get_list(r.prefix, W(resource_version=str(rv(last))))
                status = ei.value.to_status()
                assert status["code"] == 504 and status["reason"] == "Timeout"
                assert any(cause["reason"] == "ResourceVersionTooLarge" for cause in status["details"]["causes"])
                assert (ei.value.retry_after_seconds or 0) >= 1
                # Our own reflector never relists with a remembered rv: every list is consistent ("").
                own = [o for o in fs.list_opts if o.limit == LIST_PAGE_SIZE]
                assert own and all(o.resource_version == "" for o in own)
                got = await c.get_list(r.prefix, W())  # rv unset answers
                assert got.revision >= rv(last)

    # ---- SEL-1 -----------------------------------------------------------------------------------
    async def test_sel1_selector_transitions_become_added_and_deleted(self, request):
        r = mk_res("configmaps")
        async with self.storage(request, r) as st, Cacher(st) as c:
            await c.wait_ready(10)
            a = await st.create(k(r, "a"), pod("a", node="n1", labels={"foo": "bar"}))
            await cache_reaches(c, rv(a))
            opts = {"label": W(resource_version=str(rv(a)), label_selector="foo=bar"),
                    "n1": W(resource_version=str(rv(a)), field_selector="spec.nodeName=n1"),
                    "n2": W(resource_version=str(rv(a)), field_selector="spec.nodeName=n2"),
                    "ns": W(resource_version=str(rv(a)), field_selector="metadata.namespace=ns,spec.nodeName!=n2")}
            ws = {name: c.watch(r.prefix, o) for name, o in opts.items()}
            for w in ws.values():
                await w.start()
            u11 = await st.guaranteed_update(k(r, "a"), set_labels({}))
            u12 = await st.guaranteed_update(k(r, "a"), bump(v=12))
            u13 = await st.guaranteed_update(k(r, "a"), set_labels({"foo": "bar"}))
            u13b = await st.guaranteed_update(k(r, "a"), bump(v=13))
            mv = await st.guaranteed_update(k(r, "a"), set_node("n2"))
            d = await st.delete(k(r, "a"))
            got = {name: await collect_until_quiet(w, 0.7) for name, w in ws.items()}
            assert summary(got["label"]) == [("DELETED", "a", rv(u11)), ("ADDED", "a", rv(u13)),
                                             ("MODIFIED", "a", rv(u13b)), ("MODIFIED", "a", rv(mv)),
                                             ("DELETED", "a", rv(d))]
            deleted = got["label"][0].object
            assert deleted["metadata"]["labels"] == {"foo": "bar"}  # the last matching state, at rv 11
            assert summary(got["n1"]) == [("MODIFIED", "a", rv(u11)), ("MODIFIED", "a", rv(u12)),
                                          ("MODIFIED", "a", rv(u13)), ("MODIFIED", "a", rv(u13b)),
                                          ("DELETED", "a", rv(mv))]
            assert got["n1"][-1].object["spec"]["nodeName"] == "n1"
            assert summary(got["n2"]) == [("ADDED", "a", rv(mv)), ("DELETED", "a", rv(d))]
            assert summary(got["ns"]) == summary(got["n1"])
            for w in ws.values():
                await w.stop()

    # ---- SEL-3 -----------------------------------------------------------------------------------
    async def test_sel3_delete_reaches_selector_watchers_with_full_object(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st, Cacher(st) as c:
            await c.wait_ready(10)
            a = await st.create(k(r, "a"), pod("a", labels={"app": "x"}))
            b = await st.create(k(r, "b"), pod("b", labels={"app": "y"}))
            await cache_reaches(c, rv(b))
            await _wait_upstream(c)
            async with c.watch(r.prefix, W(resource_version=str(rv(b)), label_selector="app=x")) as w:
                if self.kind == "memory":
                    st.kv.strip_prev_kv.add(k(r, "a"))  # the upstream DELETE arrives without prev_kv
                d = await st.delete(k(r, "a"))
                got = await collect_until_quiet(w, 1.5)
            _assert_sel3_stream(got, w, rv(d), rv(a))
            await cache_reaches(c, rv(d))
            assert await c.get(k(r, "a"), GetOptions(resource_version=str(rv(d)), ignore_not_found=True)) is None

    # ---- CMP-2 -----------------------------------------------------------------------------------
    async def test_cmp2_compaction_while_upstream_down_relists_without_gap(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st:
            fs = FaultyStorage(st)
            async with Cacher(fs, freshness_timeout=1.0) as c:
                await c.wait_ready(10)
                a = await st.create(k(r, "a"), pod("a"))
                b = await st.create(k(r, "b"), pod("b"))
                await cache_reaches(c, rv(b))
                await _wait_upstream(c)
                w = c.watch(r.prefix, W(resource_version=str(rv(b))))
                await w.start()
                fs.gate_watches()
                fs.break_watches(InternalError("connection reset by peer"))
                history: list[int] = []
                for i in range(20):
                    history.append(rv(await st.create(k(r, f"c{i}"), pod(f"c{i}"))))
                    if i == 10:
                        history.append(rv(await st.delete(k(r, "a"))))
                mid = history[12]
                await st.compact(mid)
                # The backend adapter: a watch from before the compaction is a typed 410, never a hang.
                raw = st.watch(r.prefix, W(resource_version=str(rv(b))))
                await expect_410(raw)
                assert st.compact_revision() >= mid
                fs.open_gate()
                await until(lambda: c.reflector.lists >= 2 and c.ready, 10)
                await cache_reaches(c, history[-1])
                # Never a quiet restart inside (b, last]: the watch resumed at b (410) or at the relist.
                for o in fs.watch_opts:
                    assert o.revision <= rv(b) or o.revision >= history[-1], (o.revision, rv(b), history[-1])
                got = await collect_until_quiet(w, 1.0)
                assert rvs(got) == history[:len(rvs(got))]
                assert w.finished
                assert await c.get(k(r, "a"), GetOptions(resource_version="0", ignore_not_found=True)) is None
                listed = await c.get_list(r.prefix, W(resource_version="0"))
                assert sorted(o["metadata"]["name"] for o in listed.items) == sorted(
                    ["b"] + [f"c{i}" for i in range(20)])
                await expect_410(c.watch(r.prefix, W(resource_version=str(rv(b)))))
                await w.stop()

    # ---- CMP-3 -----------------------------------------------------------------------------------
    async def test_cmp3_lagging_downstream_watcher_gets_410_never_a_jump(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st, Cacher(st, watcher_capacity=5, history_lower=20,
                                                          history_upper=20, fresh_duration=0.0) as c:
            await c.wait_ready(10)
            a = await st.create(k(r, "a"), pod("a"))
            await cache_reaches(c, rv(a))
            w = c.watch(r.prefix, W(resource_version=str(rv(a))))
            await w.start()
            history = []
            for i in range(60):
                history.append(rv(await st.create(k(r, f"p{i}"), pod(f"p{i}"))))
                if i == 25:
                    history.append(rv(await st.delete(k(r, "a"))))
            await st.compact(history[45])
            await cache_reaches(c, history[-1])
            got = await collect_until_quiet(w, 1.0)
            seen = rvs(got)
            assert seen == history[:len(seen)], "a watcher never skips events"
            if len(seen) < len(history):
                assert w.finished
                errs = errors_of(got)
                assert not errs or errs[-1]["code"] == 410
                # Resuming from the last rv: the rest from history, or 410 if it has moved on.
                resume = c.watch(r.prefix, W(resource_version=str(seen[-1] if seen else rv(a))))
                try:
                    await resume.start()
                except ExpiredError:
                    return
                rest = await collect_until_quiet(resume, 1.0)
                await resume.stop()
                if errors_of(rest):
                    assert errors_of(rest)[0]["code"] == 410 and not rvs(rest)
                else:
                    assert rvs(rest) == history[len(seen):]

    async def test_cmp3_slow_backend_watch_then_compaction_is_410_not_a_hole(self, request):
        r = mk_res("pods")
        async with self.storage(request, r, watch_capacity=5) as st:
            a = await st.create(k(r, "a"), pod("a"))
            async with st.watch(r.prefix, W(resource_version=str(rv(a)))) as w:
                history = []
                for i in range(60):
                    history.append(rv(await st.create(k(r, f"p{i}"), pod(f"p{i}"))))
                    if i == 25:
                        history.append(rv(await st.delete(k(r, "a"))))
                await st.compact(history[45])
                got = await collect_until_quiet(w, 1.5)
            seen = rvs(got)
            assert seen == history[:len(seen)]
            if len(seen) < len(history):
                errs = errors_of(got)
                assert errs and errs[0]["code"] == 410, "the first thing after the gap is the 410"

    # ---- BMK-1 -----------------------------------------------------------------------------------
    async def test_bmk1_initial_events_end_bookmark_is_sent_at_once(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st, Cacher(st, bookmark_frequency=60.0) as c:
            await c.wait_ready(10)
            for i in range(3):
                last = await st.create(k(r, f"p{i}"), pod(f"p{i}"))
            await cache_reaches(c, rv(last))
            opts = W(resource_version=str(rv(last)), resource_version_match=NOT_OLDER, send_initial_events=True,
                     allow_watch_bookmarks=True)
            async with c.watch(r.prefix, opts) as w:
                with anyio.fail_after(5):
                    first = await w.next_batch()  # queued with the initial events, not by a timer
            assert [e.type for e in first] == [EventType.ADDED] * 3 + [EventType.BOOKMARK]
            mark = first[-1].object["metadata"]
            assert int(mark["resourceVersion"]) >= rv(last)
            assert mark["annotations"] == {INITIAL_EVENTS_END_ANNOTATION: "true"}

    # ---- BMK-2 -----------------------------------------------------------------------------------
    async def test_bmk2_initial_events_end_bookmark_is_well_formed(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st, Cacher(st, bookmark_frequency=0.2) as c:
            await c.wait_ready(10)
            await st.create(k(r, "a"), pod("a"))
            await st.create(k(r, "b"), pod("b"))
            start_rv = await st.get_current_resource_version()
            opts = W(resource_version="", resource_version_match=NOT_OLDER, send_initial_events=True,
                     allow_watch_bookmarks=True)
            async with c.watch(r.prefix, opts) as w:
                with anyio.fail_after(5):
                    first = await w.next_batch()
                got = await collect_for(w, 2.5)  # later, periodic bookmarks
            assert [e.type for e in first] == [EventType.ADDED] * 2 + [EventType.BOOKMARK]
            mark = first[-1].object["metadata"]
            assert mark["resourceVersion"] and int(mark["resourceVersion"]) >= start_rv
            assert mark["annotations"] == {INITIAL_EVENTS_END_ANNOTATION: "true"}
            for e in got:
                assert INITIAL_EVENTS_END_ANNOTATION not in (e.object["metadata"].get("annotations") or {})

    async def test_bmk2_bookmark_sent_when_nothing_matches(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st, Cacher(st) as c:
            await c.wait_ready(10)
            await st.create(k(r, "a"), pod("a"))
            opts = W(resource_version="", resource_version_match=NOT_OLDER, send_initial_events=True,
                     allow_watch_bookmarks=True, label_selector="nothing=matches")
            async with c.watch(r.prefix, opts) as w:
                with anyio.fail_after(5):
                    first = await w.next_batch()
            assert [e.type for e in first] == [EventType.BOOKMARK]
            assert first[0].object["metadata"]["annotations"] == {INITIAL_EVENTS_END_ANNOTATION: "true"}

    async def test_bmk2_send_initial_events_option_validation(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st, Cacher(st) as c:
            await c.wait_ready(10)
            await st.create(k(r, "a"), pod("a"))
            await st.create(k(r, "b"), pod("b"))
            with pytest.raises(BadRequestError):  # sendInitialEvents needs resourceVersionMatch=NotOlderThan
                w = c.watch(r.prefix, W(send_initial_events=True))
                await w.start()
            # Valid in Kubernetes without allowWatchBookmarks: initial events, no end bookmark.
            async with c.watch(r.prefix, W(resource_version_match=NOT_OLDER, send_initial_events=True)) as w:
                got = await collect_until_quiet(w, 0.5)
            assert [e.type for e in got] == [EventType.ADDED] * 2

    # ---- SLOW-1 ----------------------------------------------------------------------------------
    async def test_slow1_blocked_watchers_do_not_stall_others(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st, Cacher(st, watcher_capacity=10) as c:
            await c.wait_ready(10)
            seed = [await st.create(k(r, f"p{i}"), pod(f"p{i}")) for i in range(10)]
            start = rv(seed[-1])
            await cache_reaches(c, start)
            ws = [c.watch(r.prefix, W(resource_version=str(start))) for _ in range(10)]
            for w in ws:
                await w.start()
            fast: dict[int, list[WatchEvent]] = {}
            history: list[int] = []

            async def read(i: int) -> None:
                fast[i] = await collect(ws[i], 100, 20.0)

            async with anyio.create_task_group() as tg:
                for i in range(3, 10):
                    tg.start_soon(read, i)
                for n in range(100):
                    history.append(rv(await st.guaranteed_update(k(r, f"p{n % 10}"), bump(n=n))))
                    await anyio.sleep(0.001)
            for i in range(3, 10):
                assert rvs(fast[i]) == history, f"healthy watcher W{i + 1} missed events"
            closed = 0
            for w in ws[:3]:
                got = await collect_until_quiet(w, 0.5)
                seen = rvs(got)
                assert seen == history[:len(seen)]
                if len(seen) < len(history):
                    assert w.finished
                    closed += 1
                    resume_from = seen[-1] if seen else start
                    async with c.watch(r.prefix, W(resource_version=str(resume_from))) as again:
                        rest = await collect(again, len(history) - len(seen), 5.0)
                    assert rvs(rest) == history[len(seen):], "a closed watcher resumes from history"
            if closed:
                assert c.dispatcher.terminated >= closed
            for w in ws:
                await w.stop()

    # ---- SLOW-4 ----------------------------------------------------------------------------------
    async def test_slow4_watch_and_cancel_from_inside_event_handling(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st, Cacher(st) as c:
            await c.wait_ready(10)
            for target in (c, st):  # through the cache, and on the backend adapter itself
                base = await st.get_current_resource_version()
                with anyio.fail_after(10):  # watchdog: any deadlock fails here
                    wa = target.watch(r.prefix, W(resource_version=str(base), field_selector="metadata.namespace=a"))
                    await wa.start()
                    x = await st.create(k(r, f"x{id(target)}", "a"), pod(f"x{id(target)}", "a"))
                    async for ev in wa:  # the "callback"
                        assert ev.type is EventType.ADDED and ev.resource_version == rv(x)
                        wb = target.watch(r.prefix, W(resource_version=str(ev.resource_version),
                                                      field_selector="metadata.namespace=b"))
                        await wb.start()
                        await wa.stop()
                        await wa.stop()
                    y = await st.create(k(r, f"y{id(target)}", "b"), pod(f"y{id(target)}", "b"))
                    assert summary(await collect(wb, 1)) == [("ADDED", f"y{id(target)}", rv(y))]
                    await wb.stop()

    # ---- RST-1 -----------------------------------------------------------------------------------
    async def test_rst1_watch_paused_across_reinit_never_silently_skips(self, request):
        """Needs a Cacher test hook: ``Cacher._after_ready_check`` (an async callable or None), awaited
        in ``_start_watch`` right after the readiness check, before the watch is registered."""
        r = mk_res("pods")
        async with self.storage(request, r) as st:
            fs = FaultyStorage(st)
            async with Cacher(fs, freshness_timeout=1.0) as c:
                await c.wait_ready(10)
                a = await st.create(k(r, "a"), pod("a"))
                await cache_reaches(c, rv(a))
                await _wait_upstream(c)
                reached, release = anyio.Event(), anyio.Event()

                async def pause() -> None:
                    reached.set()
                    await release.wait()

                c._after_ready_check = pause  # type: ignore[attr-defined]
                w = c.watch(r.prefix, W(resource_version=str(rv(a))))
                out: dict[str, Any] = {}

                async def run() -> None:
                    try:
                        await w.start()
                        out["events"] = await collect_until_quiet(w, 1.0)
                    except StorageError as exc:
                        out["error"] = exc

                async with anyio.create_task_group() as tg:
                    tg.start_soon(run)
                    with anyio.move_on_after(3):
                        await reached.wait()
                    if not reached.is_set():
                        release.set()
                        tg.cancel_scope.cancel()
                        pytest.fail("Cacher has no RST-1 hook (_after_ready_check) to pause a starting watch")
                    lists = c.reflector.lists
                    fs.break_watches(ExpiredError("The resourceVersion for the provided watch is too old."))
                    history = []
                    for i in range(10):
                        history.append(rv(await st.create(k(r, f"p{i}"), pod(f"p{i}"))))
                        if i == 4:
                            history.append(rv(await st.delete(k(r, "a"))))
                    await until(lambda: c.reflector.lists > lists and c.ready, 10)
                    await cache_reaches(c, history[-1])
                    release.set()
                c._after_ready_check = None  # type: ignore[attr-defined]
                if "error" in out:
                    return  # closed with an error: the client relists
                got = out["events"]
                seen = rvs(got)
                assert seen == history[:len(seen)], "never a live watch that silently starts later"
                if len(seen) < len(history):
                    assert w.finished

    # ---- RST-2 -----------------------------------------------------------------------------------
    async def test_rst2_no_duplicates_when_initial_replay_overlaps_live_events(self, request):
        r = mk_res("pods")
        count = 1000 if self.kind == "memory" else 300
        async with self.storage(request, r) as st, Cacher(st) as c:
            await c.wait_ready(10)
            for i in range(5):
                base = await st.create(k(r, f"p{i}"), pod(f"p{i}"))
            start = rv(base)
            written: list[tuple[str, int]] = []
            stop = anyio.Event()

            async def writer() -> None:
                n = 0
                while not stop.is_set():
                    o = await st.guaranteed_update(k(r, f"p{n % 5}"), bump(n=n))
                    written.append((o["metadata"]["name"], rv(o)))
                    n += 1
                    if self.kind == "memory" and n % 20 == 0:
                        await anyio.sleep(0.001)

            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                await until(lambda: len(written) >= 50, 10)
                async with c.watch(r.prefix, W(resource_version=str(start))) as w:
                    got = await collect(w, count, 20.0)
                stop.set()
            pairs = [(e.object["metadata"]["name"], e.resource_version) for e in got]
            assert len(got) >= count
            seen = [p[1] for p in pairs]
            assert all(x < y for x, y in zip(seen, seen[1:])), "rv strictly increases"
            assert len(set(pairs)) == len(pairs)
            assert pairs == written[:len(pairs)], "no gaps against the storage history"

    # ---- RST-6 -----------------------------------------------------------------------------------
    async def test_rst6_not_ready_answers_429_fast_then_recovers(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st:
            a = await st.create(k(r, "a"), pod("a"))
            fs = FaultyStorage(st)
            fs.list_error = ServiceUnavailableError("etcd is unavailable")
            async with Cacher(fs, freshness_timeout=1.0) as c:
                await until(lambda: len(fs.list_opts) >= 1)
                with anyio.fail_after(3):
                    with pytest.raises(TooManyRequestsError) as ei:
                        await c.watch(r.prefix, W(resource_version="0")).start()
                    assert (ei.value.retry_after_seconds or 0) >= 1
                    with pytest.raises(TooManyRequestsError):
                        await c.get_list(r.prefix, W(resource_version="0"))
                    try:
                        got = await c.get(k(r, "a"), GetOptions(resource_version="0"))
                        assert got["metadata"]["name"] == "a"  # served straight from storage
                    except TooManyRequestsError:
                        pass
                    assert [o["metadata"]["name"] for o in (await c.get_list(r.prefix, W())).items] == ["a"]
                    assert (await c.get(k(r, "a")))["metadata"]["name"] == "a"
                fs.list_error = None
                await c.wait_ready(15)
                async with c.watch(r.prefix, W(resource_version="0")) as w:
                    assert summary(await collect(w, 1)) == [("ADDED", "a", rv(a))]
                    assert [o["metadata"]["name"] for o in (await c.get_list(r.prefix, W(resource_version="0"))).items] == ["a"]
                    await _wait_upstream(c)
                    # Re-initialisation ends existing watchers in a way the client can tell and retry.
                    fs.break_watches(ExpiredError("The resourceVersion for the provided watch is too old."))
                    got = await collect_until_quiet(w, 2.0)
                    assert w.finished
                    errs = errors_of(got)
                    assert (errs and errs[-1]["code"] in (410, 429, 500, 503)) or \
                        w.termination is TerminationReason.REINITIALIZED

    # ---- RST-8 -----------------------------------------------------------------------------------
    async def test_rst8_cancel_and_close_end_every_thread(self, request):
        cycles = 100 if self.kind == "memory" else 25
        caught: list[Any] = []
        old_hook = threading.excepthook
        threading.excepthook = lambda args: caught.append(args)
        handler = _ListHandler()
        logging.getLogger().addHandler(handler)
        try:
            baseline = threading.active_count()
            for cycle in range(cycles):
                r = mk_res("pods")
                with anyio.fail_after(10):  # close is bounded even with a consumer blocked reading
                    async with anyio.create_task_group() as tg:
                        async with self.storage(request, r) as st:
                            ws = [st.watch(r.prefix, W(resource_version="0")) for _ in range(10)]
                            for w in ws:
                                await w.start()
                            for w in ws:
                                await w.stop()
                            await ws[0].stop()  # cancel twice
                            if cycle % 5 == 0:
                                blocked = st.watch(r.prefix, W(resource_version="0"))
                                await blocked.start()
                                tg.start_soon(collect_until_quiet, blocked, 30.0)
                                await anyio.sleep(0.05)
                late = ws[1]
                await late.stop()  # cancel after close
                if cycle % 10 == 0:
                    r2 = mk_res("pods")
                    async with self.storage(request, r2) as st2, Cacher(st2) as c:
                        await c.wait_ready(10)
                        cws = [c.watch(r2.prefix, W(resource_version="0")) for _ in range(10)]
                        for w in cws:
                            await w.start()
                        for w in cws:
                            await w.stop()
                            await w.stop()
                    await cws[0].stop()
            await until(lambda: not [t for t in threading.enumerate() if t.name.startswith("etcd3-watch")], 10)
            await until(lambda: threading.active_count() <= baseline + 4, 10)
        finally:
            threading.excepthook = old_hook
            logging.getLogger().removeHandler(handler)
        assert not caught, caught
        assert not [rec for rec in handler.records if rec.exc_info], [rec.getMessage() for rec in handler.records]

    # ---- PAG-2 -----------------------------------------------------------------------------------
    async def test_pag2_rv0_list_ignores_limit(self, request):
        r = mk_res("nodes")
        async with self.storage(request, r) as st, Cacher(st) as c:
            await c.wait_ready(10)
            for i in range(55):
                last = await st.create(k(r, f"n{i:02d}"), pod(f"n{i:02d}"))
            await cache_reaches(c, rv(last))
            got = await c.get_list(r.prefix, W(resource_version="0", limit=1))
            assert len(got.items) == 55 and got.continue_token == ""

    # ---- PAG-3 -----------------------------------------------------------------------------------
    async def test_pag3_limit_and_rv_matrix(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st, Cacher(st) as c:
            await c.wait_ready(10)
            o0 = await st.create(k(r, "o00"), pod("o00"))
            n = rv(o0)
            for i in range(1, 13):
                last = await st.create(k(r, f"o{i:02d}"), pod(f"o{i:02d}"))
            changed = await st.guaranteed_update(k(r, "o00"), bump(v=1))
            for i in range(3):
                last = await st.guaranteed_update(k(r, "o05"), bump(v=i))
            await cache_reaches(c, rv(last))
            current = await st.get_current_resource_version()
            for target in (c, st):
                plain = await target.get_list(r.prefix, W(resource_version=str(n)))
                assert plain.revision >= n and len(plain.items) == 13
                assert plain.items[0]["metadata"]["resourceVersion"] == str(rv(changed))
                for opts in (W(resource_version=str(n), limit=10),
                             W(resource_version=str(n), limit=10, resource_version_match="Exact")):
                    exact = await target.get_list(r.prefix, opts)
                    assert exact.revision == n and [o["metadata"]["name"] for o in exact.items] == ["o00"]
                    assert exact.items[0]["metadata"]["resourceVersion"] == str(n)
                newer = await target.get_list(r.prefix, W(resource_version=str(n), resource_version_match=NOT_OLDER,
                                                          limit=10))
                assert newer.revision >= current and len(newer.items) == 10 and newer.continue_token
                page2 = await target.get_list(r.prefix, W(continue_token=newer.continue_token, limit=10))
                assert page2.revision == newer.revision and len(page2.items) == 3
                first = await target.get_list(r.prefix, W(resource_version=str(rv(o0) + 3), limit=2,
                                                          resource_version_match="Exact"))
                rest = await target.get_list(r.prefix, W(continue_token=first.continue_token, limit=10))
                assert first.revision == rest.revision == rv(o0) + 3
                assert len(first.items) + len(rest.items) == 4
            await st.compact(rv(last))
            for target in (c, st):
                with pytest.raises(ExpiredError):
                    await target.get_list(r.prefix, W(resource_version=str(n), limit=10, resource_version_match="Exact"))

    # ---- MEM-3 -----------------------------------------------------------------------------------
    async def test_mem3_reconnecting_narrow_watchers_resume_without_410(self, request):
        r = mk_res("pods")
        writes1, writes2 = (300, 800) if self.kind == "memory" else (100, 300)
        async with self.storage(request, r) as st, Cacher(st, bookmark_frequency=0.2) as c:
            await c.wait_ready(10)
            pods = [await st.create(k(r, f"p{i}"), pod(f"p{i}", node=f"n{i % 20}")) for i in range(40)]
            start = rv(pods[-1])
            await cache_reaches(c, start)
            log: list[tuple[int, str]] = []  # (rv, node) of every update
            ws = [c.watch(r.prefix, W(resource_version=str(start), field_selector=f"spec.nodeName=n{i % 20}",
                                      allow_watch_bookmarks=True)) for i in range(40)]
            for w in ws:
                await w.start()

            async def write(n_writes: int) -> None:
                for n in range(n_writes):
                    i = random.randrange(40)
                    o = await st.guaranteed_update(k(r, f"p{i}"), bump(n=n, t=time.time()))
                    log.append((rv(o), f"n{i % 20}"))

            await write(writes1)
            await cache_reaches(c, log[-1][0])
            await anyio.sleep(1.2)  # bookmarks advance the narrow watchers
            last: list[int] = []
            for w in ws:
                got = await collect_until_quiet(w, 0.02)  # already buffered
                assert not errors_of(got)
                last.append(max([start] + [e.resource_version for e in got]))
                await w.stop()
            await write(writes2)  # watchers disconnected
            await cache_reaches(c, log[-1][0])
            expired = 0
            for i, from_rv in enumerate(last):
                node = f"n{i % 20}"
                async with c.watch(r.prefix, W(resource_version=str(from_rv), field_selector=f"spec.nodeName={node}")) as w:
                    want = [x for x, nd in log if nd == node and x > from_rv]
                    got = await collect(w, len(want), 5.0) if want else await collect_until_quiet(w, 0.1)
                if errors_of(got):
                    expired += 1
                    assert errors_of(got)[0]["code"] == 410
                    continue
                assert rvs(got) == want
            assert expired == 0 and c.reflector.lists == 1

    async def test_mem3_out_of_window_is_a_typed_410(self, request):
        r = mk_res("pods")
        async with self.storage(request, r) as st, Cacher(st, history_lower=10, history_upper=10,
                                                          fresh_duration=0.0) as c:
            await c.wait_ready(10)
            a = await st.create(k(r, "a"), pod("a"))
            for i in range(30):
                last = await st.guaranteed_update(k(r, "a"), bump(v=i))
            await cache_reaches(c, rv(last))
            w = c.watch(r.prefix, W(resource_version=str(rv(a))))
            try:
                await w.start()
                got = await collect(w, 1)
                assert got[0].type is EventType.ERROR
                assert got[0].object["code"] == 410 and got[0].object["reason"] in ("Expired", "Gone")
            except ExpiredError as exc:
                assert exc.status == 410


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _rv_named(events: list[WatchEvent], name: str) -> int:
    return next(e.resource_version for e in events if e.object["metadata"]["name"] == name)


def _assert_sel3_stream(got: list[WatchEvent], w: Any, delete_rv: int, create_rv: int) -> None:
    for e in got:
        if e.type is EventType.ERROR:
            continue
        meta = e.object.get("metadata") or {}
        assert e.object and meta.get("name") == "a", e.object  # never a null / empty object
    data = [e for e in got if e.type is not EventType.ERROR]
    if data:
        assert summary(data) == [("DELETED", "a", delete_rv)]
        assert data[0].object["metadata"]["labels"] == {"app": "x"}
    else:
        # The other allowed policy: resync and close the affected watcher with an error.
        assert w.finished and (errors_of(got) or w.termination is not TerminationReason.NONE)


class TestCasesMemory(_Cases):
    kind = "memory"


class TestCasesEtcd3(_Cases):
    kind = "etcd3"

    @pytest.fixture
    def anyio_backend(self):
        return "asyncio"


# ------------------------------------------------------------------------------- memory-hook cases

class TestMemoryFaults:
    """Faults only the in-memory backend can produce exactly (a stream that stalls while storage stays
    healthy, progress notifications out of order, a DELETE without prev_kv, created+canceled)."""

    # ---- CON-1 -----------------------------------------------------------------------------------
    async def test_con1_stalled_upstream_consistent_read_is_fresh(self):
        r = mk_res("services")
        async with MemoryStorage(r) as st, Cacher(st, freshness_timeout=1.0) as c:
            await c.wait_ready(10)
            base = await st.create(k(r, "base"), pod("base"))
            await cache_reaches(c, rv(base))
            await _wait_upstream(c)
            st.kv.stall_current_watches()
            await st.create(k(r, "x"), pod("x"))
            x2 = await st.guaranteed_update(k(r, "x"), bump(v=2))
            with anyio.fail_after(5):
                try:
                    got = await c.get_list(r.prefix, W())
                except (TooManyRequestsError, TooLargeResourceVersionError):
                    got = None  # a retryable error is allowed
            if got is not None:
                assert {o["metadata"]["name"]: rv(o) for o in got.items}["x"] == rv(x2)
            any_rv = await c.get_list(r.prefix, W(resource_version="0"))
            assert any_rv.revision < rv(x2) and any_rv.revision <= c.watch_cache.resource_version
            assert "x" not in [o["metadata"]["name"] for o in any_rv.items] or any_rv.revision >= rv(x2)
            st.kv.resume_watches()  # clean up even though the stalled stream was the fault

    async def test_con1_stalled_upstream_is_detected_and_rewatched(self):
        r = mk_res("services")
        async with MemoryStorage(r) as st, Cacher(st, freshness_timeout=1.0) as c:
            await c.wait_ready(10)
            base = await st.create(k(r, "base"), pod("base"))
            await cache_reaches(c, rv(base))
            await _wait_upstream(c)
            st.kv.stall_current_watches()  # only this stream: a new watch (another member) works
            await st.create(k(r, "x"), pod("x"))
            x2 = await st.guaranteed_update(k(r, "x"), bump(v=2))

            async def fresh() -> bool:
                o = await c.get(k(r, "x"), GetOptions(resource_version="0", ignore_not_found=True))
                return o is not None and rv(o) == rv(x2)

            await until(fresh, 9.0)

    # ---- CON-3 -----------------------------------------------------------------------------------
    async def _con3_setup(self, st: MemoryStorage, c: Cacher, r: Resource):
        await c.wait_ready(10)
        b = await st.create(k(r, "base"), pod("base"))
        await cache_reaches(c, rv(b))
        await _wait_upstream(c)
        st.kv.stall_current_watches()  # the upstream is catching up (unsynced)
        a = await st.create(k(r, "a"), pod("a"))
        st.kv.inject_progress(rv(a))  # progress 101 overtakes the rv-101 event
        await anyio.sleep(0.2)
        return b, a

    # A backend that can send progress ahead of events is what etcd < 3.4.31 / 3.5.13 is; the cacher
    # trusts progress only from backends that order it with events (detected from the version, as
    # Kubernetes does), so here it is told what the detection would say about such a backend.
    async def test_con3_early_progress_never_moves_rv_past_unapplied_event(self):
        r = mk_res("pods")
        async with MemoryStorage(r) as st, Cacher(st, freshness_timeout=1.0,
                                                  consistent_reads_from_cache=False) as c:
            b, a = await self._con3_setup(st, c, r)
            assert c.watch_cache.resource_version < rv(a), "cache claims a revision it has not applied"
            st.kv.resume_watches()

    async def test_con3_consistent_list_after_early_progress_includes_event(self):
        r = mk_res("pods")
        async with MemoryStorage(r) as st, Cacher(st, freshness_timeout=1.0,
                                                  consistent_reads_from_cache=False) as c:
            b, a = await self._con3_setup(st, c, r)
            with anyio.fail_after(5):
                got = await c.get_list(r.prefix, W())
            assert "a" in [o["metadata"]["name"] for o in got.items]
            st.kv.resume_watches()

    async def test_con3_stale_progress_is_ignored_and_resume_has_no_duplicates(self):
        r = mk_res("pods")
        async with MemoryStorage(r) as st:
            fs = FaultyStorage(st)
            async with Cacher(fs, freshness_timeout=1.0) as c:
                await c.wait_ready(10)
                b = await st.create(k(r, "base"), pod("base"))
                await cache_reaches(c, rv(b))
                await _wait_upstream(c)
                async with c.watch(r.prefix, W(resource_version=str(rv(b)))) as w:
                    a = await st.create(k(r, "a"), pod("a"))
                    await cache_reaches(c, rv(a))
                    st.kv.inject_progress(rv(b) - 1)  # behind the stream: must be ignored
                    await anyio.sleep(0.1)
                    assert c.watch_cache.resource_version >= rv(a)
                    opened = c.reflector.watches_opened
                    fs.break_watches(InternalError("connection reset by peer"))
                    await until(lambda: c.reflector.watches_opened > opened, 5)
                    assert fs.watch_opts[-1].revision >= rv(a), "resume from the last applied rv"
                    z = await st.create(k(r, "z"), pod("z"))
                    got = await collect_until_quiet(w, 1.0)
                assert summary(got) == [("ADDED", "a", rv(a)), ("ADDED", "z", rv(z))]

    # ---- CON-4 -----------------------------------------------------------------------------------
    async def test_con4_backend_without_progress_requests_delegates_consistent_reads(self):
        r = mk_res("runtimeclasses")
        async with MemoryStorage(r) as st:
            fs = FaultyStorage(st)
            fs.progress_supported = False
            async with Cacher(fs, freshness_timeout=1.0) as c:
                await c.wait_ready(10)
                await _wait_upstream(c)
                assert not c.consistent_reads_from_cache
                st.kv.stall_current_watches()  # the cache is stale (kine#577)
                x = await st.create(k(r, "x"), pod("x"))
                with anyio.fail_after(5):
                    got = await c.get_list(r.prefix, W())
                assert [o["metadata"]["name"] for o in got.items] == ["x"] and got.revision >= rv(x)
                st.kv.resume_watches()

    async def test_con4_dropped_progress_falls_back_within_bound(self):
        r = mk_res("runtimeclasses")
        async with MemoryStorage(r) as st, Cacher(st, freshness_timeout=1.0) as c:
            await c.wait_ready(10)
            await _wait_upstream(c)
            st.kv.drop_progress = True
            st.kv.stall_current_watches()
            x = await st.create(k(r, "x"), pod("x"))
            with anyio.fail_after(5):
                got = await c.get_list(r.prefix, W())
            assert [o["metadata"]["name"] for o in got.items] == ["x"] and got.revision >= rv(x)
            st.kv.resume_watches()

    # ---- SEL-3 -----------------------------------------------------------------------------------
    async def test_sel3_backend_delete_without_prev_value_is_a_stream_error(self):
        r = mk_res("pods")
        async with MemoryStorage(r) as st:
            a = await st.create(k(r, "a"), pod("a", labels={"app": "x"}))
            async with st.watch(r.prefix, W(resource_version=str(rv(a)))) as w:
                st.kv.strip_prev_kv.add(k(r, "a"))
                await st.delete(k(r, "a"))
                got = await collect(w, 1, 2.0)
            assert [e.type for e in got] == [EventType.ERROR], summary(got)

    async def test_sel3_delete_without_prev_value_all_watchers(self):
        r = mk_res("pods")
        async with MemoryStorage(r) as st, Cacher(st) as c:
            await c.wait_ready(10)
            a = await st.create(k(r, "a"), pod("a", labels={"app": "x"}))
            await cache_reaches(c, rv(a))
            await _wait_upstream(c)
            async with c.watch(r.prefix, W(resource_version=str(rv(a)))) as w_all, \
                    c.watch(r.prefix, W(resource_version=str(rv(a)), field_selector="metadata.name=a")) as w_name:
                st.kv.strip_prev_kv.add(k(r, "a"))
                d = await st.delete(k(r, "a"))
                for w in (w_all, w_name):
                    _assert_sel3_stream(await collect_until_quiet(w, 1.0), w, rv(d), rv(a))

    # ---- CMP-3 (upstream) --------------------------------------------------------------------------
    async def test_cmp3_slow_upstream_compacted_relists_and_drops_deleted(self):
        r = mk_res("pods")
        async with MemoryStorage(r) as st, Cacher(st, freshness_timeout=1.0) as c:
            await c.wait_ready(10)
            a = await st.create(k(r, "a"), pod("a"))
            await cache_reaches(c, rv(a))
            await _wait_upstream(c)
            w = c.watch(r.prefix, W(resource_version=str(rv(a))))
            await w.start()
            lists = c.reflector.lists
            st.kv.stall_current_watches()
            history = []
            for i in range(40):
                history.append(rv(await st.create(k(r, f"p{i}"), pod(f"p{i}"))))
                if i == 10:
                    history.append(rv(await st.delete(k(r, "a"))))
            await st.compact(history[30])
            st.kv.resume_watches()
            await until(lambda: c.reflector.lists > lists and c.ready, 10)
            await cache_reaches(c, history[-1])
            assert await c.get(k(r, "a"), GetOptions(resource_version="0", ignore_not_found=True)) is None
            got = await collect_until_quiet(w, 1.0)
            assert rvs(got) == history[:len(rvs(got))] and w.finished
            await w.stop()

    # ---- BMK-4 -----------------------------------------------------------------------------------
    @pytest.mark.parametrize("variant", ["consistent", "not-older-than"])
    async def test_bmk4_watch_list_waits_for_delayed_cache(self, variant):
        r = mk_res("pods")
        async with MemoryStorage(r) as st, Cacher(st, freshness_timeout=3.0) as c:
            await c.wait_ready(10)
            await _wait_upstream(c)
            st.kv.stall_current_watches()  # the cache stays behind
            x = await st.create(k(r, "x"), pod("x"))
            last = x
            for i in range(3):
                last = await st.create(k(r, f"y{i}"), pod(f"y{i}"))
            want = rv(last) if variant == "consistent" else rv(x)
            opts = W(resource_version="" if variant == "consistent" else str(rv(x)),
                     resource_version_match=NOT_OLDER, send_initial_events=True, allow_watch_bookmarks=True)
            out: dict[str, Any] = {}

            async def run() -> None:
                async with c.watch(r.prefix, opts) as w:
                    out["events"] = await collect(w, 5, 8.0)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await anyio.sleep(0.3)
                st.kv.resume_watches()
            events = out["events"]
            assert "x" in [e.object["metadata"]["name"] for e in events if e.type is EventType.ADDED]
            marks = [e for e in events if e.type is EventType.BOOKMARK]
            assert marks and int(marks[0].object["metadata"]["resourceVersion"]) >= want

    async def test_bmk4_watch_list_times_out_instead_of_stale_snapshot(self):
        r = mk_res("pods")
        async with MemoryStorage(r) as st, Cacher(st, freshness_timeout=1.0) as c:
            await c.wait_ready(10)
            await _wait_upstream(c)
            st.kv.stall_current_watches()
            st.kv.drop_progress = True
            x = await st.create(k(r, "x"), pod("x"))
            opts = W(resource_version="", resource_version_match=NOT_OLDER, send_initial_events=True,
                     allow_watch_bookmarks=True)
            w = c.watch(r.prefix, opts)
            with anyio.fail_after(5):
                try:
                    await w.start()
                except (TooLargeResourceVersionError, TooManyRequestsError):
                    return
                got = await collect(w, 1, 3.0)
            await w.stop()
            if got and got[0].type is EventType.ERROR:
                assert got[0].object["code"] in (429, 504)
                return
            names = [e.object["metadata"]["name"] for e in got if e.type is EventType.ADDED]
            assert "x" in names, "a stale snapshot served as the complete initial state"
            assert rv(x)  # noqa

    # ---- RST-5 -----------------------------------------------------------------------------------
    async def test_rst5_created_and_canceled_watch_is_an_error_and_recovers(self):
        r = mk_res("pods")
        async with MemoryStorage(r) as st, Cacher(st, freshness_timeout=1.0) as c:
            await c.wait_ready(10)
            a = await st.create(k(r, "a"), pod("a"))
            await cache_reaches(c, rv(a))
            await _wait_upstream(c)
            st.kv.cancel_watch_creates = 1
            async with st.watch(r.prefix, W(resource_version=str(rv(a)))) as raw:
                got = await collect(raw, 1, 2.0)
            assert [e.type for e in got] == [EventType.ERROR] and "cancel" in got[0].object["message"]
            async with c.watch(r.prefix, W(resource_version=str(rv(a)))) as w:
                st.kv.cancel_watch_creates = 3
                st.kv.break_watches(InternalError("etcdserver: invalid auth token"))
                x = await st.create(k(r, "x"), pod("x"))
                await cache_reaches(c, rv(x))
                got = await collect_until_quiet(w, 1.0)
                assert summary(got) == [("ADDED", "x", rv(x))] or (w.finished and "x" not in str(got))
            assert (await c.get(k(r, "x"), GetOptions(resource_version=str(rv(x)))))["metadata"]["name"] == "x"

    async def test_rst5_not_ready_while_upstream_watch_cannot_be_created(self):
        r = mk_res("pods")
        async with MemoryStorage(r) as st, Cacher(st, freshness_timeout=1.0) as c:
            await c.wait_ready(10)
            await _wait_upstream(c)
            st.kv.cancel_watch_creates = 10 ** 9
            st.kv.break_watches(InternalError("etcdserver: invalid auth token"))
            x = await st.create(k(r, "x"), pod("x"))
            with anyio.fail_after(5):
                try:
                    got = await c.get_list(r.prefix, W())
                    assert "x" in [o["metadata"]["name"] for o in got.items]
                except TooManyRequestsError:
                    pass
            await until(lambda: not c.ready, 5.0)
            st.kv.cancel_watch_creates = 0
            await c.wait_ready(15)
            await cache_reaches(c, rv(x))

    # ---- RST-6 (slow list) -------------------------------------------------------------------------
    async def test_rst6_slow_list_does_not_hang_callers(self):
        r = mk_res("pods")
        async with MemoryStorage(r) as st:
            a = await st.create(k(r, "a"), pod("a"))
            fs = FaultyStorage(st)
            fs.list_delay = 30.0
            async with Cacher(fs) as c:
                await until(lambda: len(fs.list_opts) >= 1)
                with anyio.fail_after(3):
                    with pytest.raises(TooManyRequestsError):
                        await c.watch(r.prefix, W()).start()
                    with pytest.raises(TooManyRequestsError):
                        await c.get_list(r.prefix, W(resource_version="0"))
                    assert (await c.get(k(r, "a")))["metadata"]["name"] == "a"
                    assert rv((await c.get_list(r.prefix, W())).items[0]) == rv(a)

    # ---- SLOW-3 ----------------------------------------------------------------------------------
    async def test_slow3_burst_with_briefly_slow_consumers_needs_no_relist(self):
        r = mk_res("pods")
        async with MemoryStorage(r) as st, Cacher(st) as c:
            await c.wait_ready(10)
            for i in range(50):
                last = await st.create(k(r, f"p{i}"), pod(f"p{i}"))
            start = rv(last)
            await cache_reaches(c, start)
            history: list[int] = []
            results: dict[int, list[int]] = {}
            expired = [0]
            burst = 2000
            done = anyio.Event()

            async def consumer(i: int) -> None:
                seen: list[int] = []
                w = c.watch(r.prefix, W(resource_version=str(start)))
                await w.start()
                paused = False
                while len(seen) < burst:
                    batch = await w.next_batch()
                    if not batch:  # closed: resume from the last rv within history
                        if errors_of([]) or w.error is not None and w.error.status == 410:
                            expired[0] += 1
                        w = c.watch(r.prefix, W(resource_version=str(seen[-1] if seen else start)))
                        try:
                            await w.start()
                        except ExpiredError:
                            expired[0] += 1
                            break
                        continue
                    if errors_of(batch):
                        if errors_of(batch)[0]["code"] == 410:
                            expired[0] += 1
                            break
                    seen.extend(rvs(batch))
                    if not paused and len(seen) > burst // 3:
                        paused = True
                        await anyio.sleep(0.3)  # briefly slow
                    else:
                        await anyio.sleep(0.002)
                await w.stop()
                results[i] = seen

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for i in range(40):
                        tg.start_soon(consumer, i)
                    for n in range(burst):
                        history.append(rv(await st.guaranteed_update(k(r, f"p{n % 50}"), bump(n=n))))
            done.set()
            assert expired[0] == 0
            assert c.reflector.lists == 1
            for i, seen in results.items():
                assert seen == history, f"consumer {i}"

    # ---- MEM-1 -----------------------------------------------------------------------------------
    async def test_mem1_mass_rewatch_shares_history_without_copies(self):
        r = mk_res("secrets")
        payload = "x" * 1024
        async with MemoryStorage(r) as st, Cacher(st) as c:
            await c.wait_ready(10)
            first = await st.create(k(r, "s0"), pod("s0", data={"p": payload}))
            for i in range(1, 10):
                await st.create(k(r, f"s{i}"), pod(f"s{i}", data={"p": payload}))
            behind = 300
            for n in range(behind):
                last = await st.guaranteed_update(k(r, f"s{n % 10}"), lambda o, m, n=n: {**o, "data": {"p": payload, "n": n}})
            await cache_reaches(c, rv(last))
            watchers = 200
            ws = [c.watch(r.prefix, W(resource_version=str(rv(first)))) for _ in range(watchers)]
            for w in ws:
                await w.start()
            for w in ws:  # all close at once ...
                await w.stop()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                ws = [c.watch(r.prefix, W(resource_version=str(rv(first)))) for _ in range(watchers)]
                for w in ws:  # ... and all re-watch from their last rv
                    await w.start()
                after, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            per_watcher = (peak - before) / watchers
            history_bytes = (behind + 9) * len(payload)
            assert per_watcher < history_bytes / 10, (per_watcher, history_bytes)
            b0, b1 = await ws[0].next_batch(), await ws[1].next_batch()
            assert len(b0) == len(b1) >= behind
            assert all(x.object is y.object for x, y in zip(b0, b1)), "events are shared, never copied"
            for w in ws:
                await w.stop()

    # ---- MEM-2 -----------------------------------------------------------------------------------
    async def test_mem2_slow_initial_list_with_short_history_still_initializes(self):
        r = mk_res("secrets")
        async with MemoryStorage(r) as st:
            for i in range(20):
                await st.create(k(r, f"s{i}"), pod(f"s{i}"))
            fs = FaultyStorage(st)
            fs.list_delay = 1.5
            marks: list[tuple[float, int]] = []
            stop = anyio.Event()

            async def churn() -> None:
                n = 0
                while not stop.is_set():
                    await st.guaranteed_update(k(r, f"s{n % 20}"), bump(n=n))
                    n += 1
                    marks.append((time.monotonic(), st.kv.revision))
                    cutoff = [rev for t, rev in marks if t < time.monotonic() - 0.5]  # a 0.5 s window
                    if cutoff and cutoff[-1] > st.kv.compacted:
                        st.kv.compact(cutoff[-1])
                    await anyio.sleep(0.02)

            async with anyio.create_task_group() as tg:
                tg.start_soon(churn)
                async with Cacher(fs) as c:
                    await until(lambda: len(fs.list_opts) >= 1)
                    results: list[Any] = []

                    async def reader() -> None:
                        with anyio.fail_after(3):
                            try:
                                results.append(await c.get(k(r, "s1"), GetOptions(resource_version="0")))
                            except TooManyRequestsError as exc:
                                results.append(exc)

                    async with anyio.create_task_group() as readers:
                        for _ in range(100):
                            readers.start_soon(reader)
                    assert len(results) == 100
                    try:
                        await c.wait_ready(8)
                        await anyio.sleep(2.0)
                        assert c.ready, "the cache did not stay initialised"
                    finally:
                        stop.set()


# ------------------------------------------------------------------------------ real-etcd fault cases

class TestRealEtcdFaults:
    """Faults produced on a real etcd process: a dedicated server per test (never the session one)."""

    @pytest.fixture
    def anyio_backend(self):
        return "asyncio"

    # ---- CON-3 (5) / reconnect -----------------------------------------------------------------------
    async def test_con3_etcd_restart_resumes_without_duplicates(self):
        r = mk_res("pods")
        async with dedicated_etcd() as server:
            async with Etcd3Storage(r, server.endpoint, request_timeout=5) as st:
                fs = FaultyStorage(st)
                async with Cacher(fs, freshness_timeout=1.0) as c:
                    await c.wait_ready(10)
                    b = await st.create(k(r, "base"), pod("base"))
                    await cache_reaches(c, rv(b))
                    async with c.watch(r.prefix, W(resource_version=str(rv(b)))) as w:
                        a = await st.create(k(r, "a"), pod("a"))
                        await cache_reaches(c, rv(a))
                        opened = c.reflector.watches_opened
                        await anyio.to_thread.run_sync(server.restart)
                        await until(lambda: c.reflector.watches_opened > opened, 15)
                        z = await st.create(k(r, "z"), pod("z"))
                        await cache_reaches(c, rv(z), 15)
                        got = await collect_until_quiet(w, 1.0)
                    assert min(o.revision for o in fs.watch_opts[1:]) >= rv(a)
                    if w.termination is TerminationReason.NONE:
                        assert summary(got) == [("ADDED", "a", rv(a)), ("ADDED", "z", rv(z))]
                    seen = summary(got)
                    assert len(seen) == len(set(seen)), "no duplicate events"

    # ---- CON-4 on a real etcd -------------------------------------------------------------------------
    async def test_con4_quiet_prefix_consistent_reads_complete(self, etcd_server):
        r, other = mk_res("runtimeclasses"), mk_res("other")
        async with Etcd3Storage(other, etcd_server.endpoint) as ost, \
                Etcd3Storage(r, etcd_server.endpoint) as st:
            await ost.create(k(other, "seed"), pod("seed"))
            async with Cacher(st) as c:
                await c.wait_ready(10)
                await _wait_upstream(c)
                for i in range(10):
                    last = await ost.create(k(other, f"o{i}"), pod(f"o{i}"))
                with anyio.fail_after(5):
                    got = await c.get_list(r.prefix, W())
                assert got.revision >= rv(last) and got.items == []
                opts = W(resource_version="", resource_version_match=NOT_OLDER, send_initial_events=True,
                         allow_watch_bookmarks=True)
                if not c.consistent_reads_from_cache:
                    # etcd < 3.5.13 (the packaged 3.5.1): progress is not trusted, so a quiet prefix
                    # cannot prove freshness; the watch-list fails within the bound instead of hanging.
                    with anyio.fail_after(5), pytest.raises(TooLargeResourceVersionError):
                        async with c.watch(r.prefix, opts):
                            pass
                    return
                with anyio.fail_after(5):
                    async with c.watch(r.prefix, opts) as w:
                        first = await w.next_batch()
                assert [e.type for e in first] == [EventType.BOOKMARK]
                assert int(first[0].object["metadata"]["resourceVersion"]) >= rv(last)

    # ---- RST-6 with a killed etcd -------------------------------------------------------------------
    async def test_rst6_etcd_down_at_start_429_then_ready_after_restart(self):
        r = mk_res("pods")
        async with dedicated_etcd() as server:
            async with Etcd3Storage(r, server.endpoint, request_timeout=2) as st:
                a = await st.create(k(r, "a"), pod("a"))
                await anyio.to_thread.run_sync(server.kill)
                async with Cacher(st, freshness_timeout=1.0) as c:
                    with anyio.fail_after(6):
                        with pytest.raises(TooManyRequestsError):
                            await c.watch(r.prefix, W(resource_version="0")).start()
                        with pytest.raises(TooManyRequestsError):
                            await c.get_list(r.prefix, W(resource_version="0"))
                        with pytest.raises(StorageError):  # delegated to storage, which is down
                            await c.get_list(r.prefix, W())
                    await anyio.to_thread.run_sync(server.start)
                    await c.wait_ready(20)
                    async with c.watch(r.prefix, W(resource_version="0")) as w:
                        assert summary(await collect(w, 1)) == [("ADDED", "a", rv(a))]

    # ---- BMK-4 with a delayed upstream ----------------------------------------------------------------
    async def test_bmk4_etcd_delayed_upstream_watch_list_waits(self, etcd_server):
        r = mk_res("pods")
        async with Etcd3Storage(r, etcd_server.endpoint) as st:
            fs = FaultyStorage(st)
            async with Cacher(fs, freshness_timeout=3.0) as c:
                await c.wait_ready(10)
                await _wait_upstream(c)
                fs.gate_watches()
                fs.break_watches(InternalError("connection reset by peer"))
                x = await st.create(k(r, "x"), pod("x"))
                opts = W(resource_version="", resource_version_match=NOT_OLDER, send_initial_events=True,
                         allow_watch_bookmarks=True)
                out: dict[str, Any] = {}

                async def run() -> None:
                    async with c.watch(r.prefix, opts) as w:
                        out["events"] = await collect(w, 2, 8.0)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(run)
                    await anyio.sleep(0.3)
                    fs.open_gate()
                events = out["events"]
                assert summary(events) == [("ADDED", "x", rv(x))]
                assert int(events[-1].object["metadata"]["resourceVersion"]) >= rv(x)

    # ---- MEM-2 on a real etcd -------------------------------------------------------------------------
    async def test_mem2_etcd_slow_list_with_compaction_still_initializes(self):
        r = mk_res("secrets")
        async with dedicated_etcd() as server:
            async with Etcd3Storage(r, server.endpoint) as st:
                for i in range(10):
                    await st.create(k(r, f"s{i}"), pod(f"s{i}"))
                fs = FaultyStorage(st)
                fs.list_delay = 1.5
                stop = anyio.Event()
                marks: list[tuple[float, int]] = []

                async def churn() -> None:
                    n, done = 0, 0
                    while not stop.is_set():
                        o = await st.guaranteed_update(k(r, f"s{n % 10}"), bump(n=n))
                        n += 1
                        marks.append((time.monotonic(), rv(o)))
                        cutoff = [x for t, x in marks if t < time.monotonic() - 0.5]
                        if cutoff and cutoff[-1] > done:
                            await st.compact(cutoff[-1])
                            done = cutoff[-1]
                        await anyio.sleep(0.02)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(churn)
                    try:
                        async with Cacher(fs) as c:
                            await c.wait_ready(8)
                            await anyio.sleep(2.0)
                            assert c.ready, "the cache did not stay initialised"
                    finally:
                        stop.set()
