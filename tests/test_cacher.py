"""Cacher core behaviour beyond the conformance suite: one upstream watch, relist on 410, readiness,
slow watchers, history window, bookmarks, indexes and shutdown. Runs under asyncio and trio."""

from __future__ import annotations

import uuid

import anyio
import pytest

from cacher.cacher import Cacher
from cacher.watcher import TerminationReason
from storage.errors import BadRequestError, ExpiredError, InternalError, TooManyRequestsError
from storage.interface import EventType, GetOptions, ListOptions, Resource
from storage.memory.store import MemoryStorage
from storage.testing.conformance import collect, collect_until_quiet, summary

pytestmark = pytest.mark.anyio

PODS = Resource("/pods", field_paths=("spec.nodeName",), trigger_field="spec.nodeName",
                index_fields=("spec.nodeName",))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(params=["memory", "etcd3"])
def make_storage(request):
    """A factory of fresh, isolated storages for PODS: in memory, or on the session's real etcd under
    a path prefix of its own."""
    if request.param == "memory":
        return lambda: MemoryStorage(PODS)
    from storage.etcd3.store import Etcd3Storage
    server = request.getfixturevalue("etcd_server")
    return lambda: Etcd3Storage(PODS, endpoints=[server.endpoint], path_prefix=f"/registry-{uuid.uuid4().hex}")


def pod(name: str, node: str = "", ns: str = "default", **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node}}


def k(name: str, ns: str = "default") -> str:
    return f"/pods/{ns}/{name}"


async def test_many_watchers_share_one_upstream_watch():
    async with MemoryStorage(PODS) as st, Cacher(st) as c:
        await c.wait_ready(5)
        watches = [c.watch("/pods", ListOptions(resource_version="0", recursive=True,
                                                field_selector=f"spec.nodeName=n{i}")) for i in range(20)]
        for w in watches:
            await w.start()
        await st.create(k("a"), pod("a", "n3"))
        got = await collect(watches[3], 1)
        assert summary(got)[0][:2] == ("ADDED", "a")
        assert len(st.kv._sinks) == 1 and c.reflector.watches_opened == 1
        for w in watches:
            await w.stop()


async def test_trigger_index_visits_only_interested_watchers(make_storage):
    async with make_storage() as st, Cacher(st) as c:
        await c.wait_ready(5)
        async with c.watch("/pods", ListOptions(resource_version="0", recursive=True,
                                                field_selector="spec.nodeName=n1")) as w1, \
                c.watch("/pods", ListOptions(resource_version="0", recursive=True,
                                             field_selector="spec.nodeName=n2")) as w2:
            await st.create(k("a"), pod("a", "n1"))
            await anyio.sleep(0.2)
            event = c.watch_cache.history.events_since(c.watch_cache.history.list_rv)[-1]
            assert c.dispatcher.candidates(event) == [w1]
            moved = await st.guaranteed_update(k("a"), lambda o, m: {**o, "spec": {"nodeName": "n2"}})
            assert summary(await collect(w2, 1)) == [("ADDED", "a", int(moved["metadata"]["resourceVersion"]))]
            assert [e.type for e in await collect(w1, 2)] == [EventType.ADDED, EventType.DELETED]


async def test_list_by_indexed_field_is_served_from_the_index(make_storage):
    async with make_storage() as st, Cacher(st) as c:
        await c.wait_ready(5)
        for i in range(10):
            last = await st.create(k(f"p{i}"), pod(f"p{i}", f"n{i % 3}"))
        opts = ListOptions(resource_version=last["metadata"]["resourceVersion"], recursive=True,
                           field_selector="spec.nodeName=n1")
        got = await c.get_list("/pods", opts)
        assert [o["metadata"]["name"] for o in got.items] == ["p1", "p4", "p7"]
        assert [e.key for e in c.watch_cache.store.by_index("spec.nodeName", "n1")] == [
            k("p1"), k("p4"), k("p7")]


async def test_relist_on_410_ends_watchers_and_rebuilds():
    async with MemoryStorage(PODS) as st, Cacher(st) as c:
        await c.wait_ready(5)
        await st.create(k("a"), pod("a"))
        w = c.watch("/pods", ListOptions(resource_version="0", recursive=True))
        await w.start()
        await collect(w, 1)
        await _upstream_open(st)
        st.kv.break_watches(ExpiredError("The resourceVersion for the provided watch is too old."))
        rest = await collect_until_quiet(w, 1.0)
        assert rest == [] and w.finished and w.termination is TerminationReason.REINITIALIZED
        await st.create(k("b"), pod("b"))
        with anyio.fail_after(10):
            while c.reflector.lists < 2 or not c.ready:
                await anyio.sleep(0.05)
        got = await c.get(k("b"), GetOptions(resource_version="0", ignore_not_found=True))
        with anyio.fail_after(5):
            while got is None:
                await anyio.sleep(0.05)
                got = await c.get(k("b"), GetOptions(resource_version="0", ignore_not_found=True))
        assert got["metadata"]["name"] == "b"


async def test_non_410_watch_error_rewatches_without_relist():
    async with MemoryStorage(PODS) as st, Cacher(st) as c:
        await c.wait_ready(5)
        async with c.watch("/pods", ListOptions(resource_version="0", recursive=True)) as w:
            await _upstream_open(st)
            st.kv.break_watches(InternalError("connection reset"))
            b = await st.create(k("b"), pod("b"))
            got = await collect(w, 1)
        assert summary(got) == [("ADDED", "b", int(b["metadata"]["resourceVersion"]))]
        assert c.reflector.lists == 1 and c.reflector.watches_opened >= 2


async def _upstream_open(st: MemoryStorage) -> None:
    with anyio.fail_after(5):
        while not st.kv._sinks:
            await anyio.sleep(0.01)


class _BrokenList:
    """A storage wrapper whose LIST fails until ``healed`` (to hold the cache in Pending)."""

    def __init__(self, inner: MemoryStorage) -> None:
        self.inner, self.resource, self.healed = inner, inner.resource, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def get_list(self, key, opts=ListOptions()):
        if not self.healed and opts.limit == 10000:
            raise InternalError("etcd unavailable")
        return await self.inner.get_list(key, opts)


async def test_not_ready_watch_is_429_and_reads_are_delegated_where_kubernetes_does():
    async with MemoryStorage(PODS) as st:
        await st.create(k("a"), pod("a"))
        broken = _BrokenList(st)
        async with Cacher(broken) as c:
            await anyio.sleep(0.1)
            assert not c.ready
            with pytest.raises(TooManyRequestsError) as err:
                async with c.watch("/pods", ListOptions(recursive=True)):
                    pass
            assert err.value.status == 429 and 1 <= err.value.retry_after_seconds <= 30
            assert (await c.get(k("a"), GetOptions(resource_version="0")))["metadata"]["name"] == "a"
            page = await c.get_list("/pods", ListOptions(resource_version="0", limit=5, recursive=True))
            assert len(page.items) == 1
            with pytest.raises(TooManyRequestsError):
                await c.get_list("/pods", ListOptions(resource_version="0", label_selector="x=y", recursive=True))
            with pytest.raises(TooManyRequestsError):
                await c.readiness_check()
            broken.healed = True
            await c.wait_ready(10)
            await c.readiness_check()


async def test_slow_watcher_is_terminated_and_others_get_everything(make_storage):
    # Kubernetes behaviour (lagging watchers off): tests/test_lagging.py covers the default.
    async with make_storage() as st, Cacher(st, watcher_capacity=5, catch_up_lagging=False) as c:
        await c.wait_ready(5)
        start = str(await st.get_current_resource_version())
        slow = c.watch("/pods", ListOptions(resource_version=start, recursive=True))
        await slow.start()
        async with c.watch("/pods", ListOptions(resource_version=start, recursive=True)) as fast:
            async def writer():
                for i in range(60):
                    await st.create(k(f"p{i}"), pod(f"p{i}"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                got = await collect(fast, 60, timeout=20)
        assert [n for _, n, _ in summary(got)] == [f"p{i}" for i in range(60)]
        assert slow.termination is TerminationReason.TOO_SLOW and c.dispatcher.terminated == 1
        drained = await collect_until_quiet(slow, 0.2)
        assert len(drained) <= 5 and await slow.next_batch() == []


async def test_watch_older_than_history_window_is_410(make_storage):
    async with make_storage() as st, Cacher(st, history_lower=4, history_upper=4) as c:
        await c.wait_ready(5)
        first = await st.create(k("p0"), pod("p0"))
        for i in range(1, 10):
            last = await st.create(k(f"p{i}"), pod(f"p{i}"))
        await c.get(k("p9"), GetOptions(resource_version=last["metadata"]["resourceVersion"]))
        async with c.watch("/pods", ListOptions(resource_version=first["metadata"]["resourceVersion"],
                                                recursive=True)) as w:
            events = await collect(w, 2)
        assert [e.type for e in events] == [EventType.ERROR] and events[0].object["code"] == 410
        recent = str(int(last["metadata"]["resourceVersion"]) - 2)
        async with c.watch("/pods", ListOptions(resource_version=recent, recursive=True)) as w:
            assert [n for _, n, _ in summary(await collect(w, 2))] == ["p8", "p9"]


async def test_bookmarks_sent_to_watchers_that_allow_them(make_storage):
    async with make_storage() as st, Cacher(st, bookmark_frequency=0.5) as c:
        await c.wait_ready(5)
        start = str(await st.get_current_resource_version())
        async with c.watch("/pods", ListOptions(resource_version=start, recursive=True,
                                                allow_watch_bookmarks=True,
                                                field_selector="spec.nodeName=n1")) as w, \
                c.watch("/pods", ListOptions(resource_version=start, recursive=True)) as plain:
            other = await st.create(k("x"), pod("x", "n2"))  # filtered out for w
            marks = await collect(w, 1, timeout=5)
            assert [e.type for e in await collect_until_quiet(plain, 0.3)] == [EventType.ADDED]
        assert marks[0].type is EventType.BOOKMARK
        assert marks[0].resource_version >= int(other["metadata"]["resourceVersion"])


async def test_watch_options_are_validated(make_storage):
    async with make_storage() as st, Cacher(st) as c:
        await c.wait_ready(5)
        for opts in (ListOptions(send_initial_events=True, recursive=True),
                     ListOptions(resource_version_match="NotOlderThan", resource_version="1", recursive=True),
                     ListOptions(resource_version_match="Exact", resource_version="1", recursive=True)):
            with pytest.raises(BadRequestError):
                c.watch("/pods", opts)


async def test_leaving_the_cacher_ends_every_watch_and_task():
    async with MemoryStorage(PODS) as st:
        c = Cacher(st)
        async with c:
            await c.wait_ready(5)
            w = c.watch("/pods", ListOptions(resource_version="0", recursive=True))
            await w.start()
        assert w.termination is TerminationReason.CACHE_STOPPED
        assert await w.next_batch() == []
        assert st.kv._sinks == set()  # the upstream watch was released too


@pytest.mark.parametrize("version,safe", [("memory", True), ("3.5.13", True), ("3.5.12", False), ("3.5.1", False),
                                          ("3.4.31", True), ("3.4.30", False), ("3.6.0", True), ("v3.5.17", True),
                                          ("garbage", False), ("", False)])
def test_progress_notify_safety_by_etcd_version(version, safe):
    from cacher.progress import progress_notify_is_safe
    assert progress_notify_is_safe(version) is safe


async def test_consistent_list_is_served_from_cache_once_fresh():
    async with MemoryStorage(PODS) as st, Cacher(st) as c:
        await c.wait_ready(5)
        assert c.consistent_reads_from_cache is True
        made = await st.create(k("a"), pod("a"))
        got = await c.get_list("/pods", ListOptions(recursive=True))
        assert [o["metadata"]["name"] for o in got.items] == ["a"]
        assert got.revision >= int(made["metadata"]["resourceVersion"])
        assert c.consistent_reads == {"cache": 1, "fallback": 0, "delegated": 0}


async def test_con1_stalled_upstream_consistent_list_falls_back_to_storage():
    async with MemoryStorage(PODS) as st, Cacher(st, freshness_timeout=0.5) as c:
        await c.wait_ready(5)
        before = await st.create(k("x"), pod("x"))
        await c.get(k("x"), GetOptions(resource_version=before["metadata"]["resourceVersion"]))
        st.kv.stall_watches()  # open but silent: no events, no progress notifications
        updated = await st.guaranteed_update(k("x"), lambda o, m: {**o, "v": 2})
        got = await c.get_list("/pods", ListOptions(recursive=True))
        assert got.items[0]["v"] == 2 and got.revision >= int(updated["metadata"]["resourceVersion"])
        assert c.consistent_reads["fallback"] == 1
        stale = await c.get_list("/pods", ListOptions(resource_version="0", recursive=True))
        assert stale.revision < int(updated["metadata"]["resourceVersion"])  # honest about its age
        assert "v" not in stale.items[0]
        st.kv.resume_watches()
        fresh = await c.get(k("x"), GetOptions(resource_version=updated["metadata"]["resourceVersion"]))
        assert fresh["v"] == 2


async def test_consistent_list_is_delegated_on_etcd_without_safe_progress(etcd_server):
    from storage.etcd3.store import Etcd3Storage
    res = Resource(f"/pods-{uuid.uuid4().hex}", field_paths=("spec.nodeName",))
    async with Etcd3Storage(res, endpoints=[etcd_server.endpoint]) as st, Cacher(st) as c:
        await c.wait_ready(10)
        version = await st.server_version()
        from cacher.progress import progress_notify_is_safe
        assert c.consistent_reads_from_cache is progress_notify_is_safe(version)
        await st.create(f"{res.prefix}/ns/a", {"metadata": {"name": "a", "namespace": "ns"}})
        got = await c.get_list(res.prefix, ListOptions(recursive=True))
        assert [o["metadata"]["name"] for o in got.items] == ["a"]
        expected = "cache" if c.consistent_reads_from_cache else "delegated"
        assert c.consistent_reads[expected] == 1


async def test_one_event_object_and_one_serialization_shared_by_all_watchers(make_storage):
    async with make_storage() as st, Cacher(st) as c:
        await c.wait_ready(5)
        start = str(await st.get_current_resource_version())
        watches = [c.watch("/pods", ListOptions(resource_version=start, recursive=True)) for _ in range(3)]
        for w in watches:
            await w.start()
        await st.create(k("a"), pod("a"))
        events = [(await collect(w, 1))[0] for w in watches]
        assert events[0] is events[1] is events[2]
        assert events[0].encode() is events[2].encode()
        assert b'"type":"ADDED"' in events[0].encode()
        for w in watches:
            await w.stop()


class _Counting:
    """Counts the LISTs that reach the wrapped storage (to tell cache-served reads from delegated)."""

    def __init__(self, inner) -> None:
        self.inner, self.resource, self.lists = inner, inner.resource, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def get_list(self, key, opts=ListOptions()):
        self.lists += 1
        return await self.inner.get_list(key, opts)


async def _churn(st, n: int = 12) -> list[int]:
    revs = []
    for i in range(n):
        name = f"p{i % 5}"
        if i % 4 == 3:
            gone = f"p{(i - 1) % 5}"  # the one written just before: it exists
            revs.append(int((await st.delete(k(gone)))["metadata"]["resourceVersion"]))
        else:
            obj = await st.guaranteed_update(k(name), lambda o, m, i=i: {**pod(name, f"n{i % 3}", v=str(i))},
                                             ignore_not_found=True)
            revs.append(int(obj["metadata"]["resourceVersion"]))
    return revs


def _names_rvs(result) -> list[tuple[str, str]]:
    return [(o["metadata"]["name"], o["metadata"]["resourceVersion"]) for o in result.items]


async def test_exact_lists_inside_the_history_window_are_served_from_cache_and_match_storage(make_storage):
    async with make_storage() as st:
        counting = _Counting(st)
        async with Cacher(counting) as c:
            await c.wait_ready(5)
            revs = await _churn(st)
            await c.get(k("p0"), GetOptions(resource_version=str(revs[-1]), ignore_not_found=True))
            before = counting.lists
            for rv in revs:
                for sel in ("", "spec.nodeName=n1"):
                    opts = ListOptions(resource_version=str(rv), resource_version_match="Exact", recursive=True,
                                       field_selector=sel)
                    from_cache = await c.get_list("/pods", opts)
                    from_storage = await st.get_list("/pods", opts)
                    assert _names_rvs(from_cache) == _names_rvs(from_storage), (rv, sel)
                    assert from_cache.resource_version == str(rv)
            assert counting.lists == before  # none of them reached storage


async def test_continue_pages_are_served_from_cache_at_the_first_page_revision(make_storage):
    async with make_storage() as st:
        counting = _Counting(st)
        async with Cacher(counting) as c:
            await c.wait_ready(5)
            for i in range(9):
                last = await st.create(k(f"p{i}"), pod(f"p{i}"))
            rv = last["metadata"]["resourceVersion"]
            # Where progress is not trusted (etcd < 3.5.13) a revision ahead of the cache is delegated,
            # as in Kubernetes; let the cache reach it first so the pages are the cache's to serve.
            await c.get(k("p8"), GetOptions(resource_version=rv))
            before_first = counting.lists
            first = await c.get_list("/pods", ListOptions(resource_version=rv, limit=4, recursive=True))
            assert counting.lists == before_first
            assert first.resource_version == rv and first.remaining_item_count == 5
            await st.delete(k("p6"))
            before = counting.lists
            names, token = [o["metadata"]["name"] for o in first.items], first.continue_token
            while token:
                page = await c.get_list("/pods", ListOptions(limit=4, continue_token=token, recursive=True))
                assert page.resource_version == rv
                names += [o["metadata"]["name"] for o in page.items]
                token = page.continue_token
            assert names == [f"p{i}" for i in range(9)] and counting.lists == before


async def test_exact_list_older_than_the_window_is_delegated_to_storage(make_storage):
    async with make_storage() as st:
        counting = _Counting(st)
        old = await st.create(k("a"), pod("a"))
        await st.create(k("a2"), pod("a2"))  # the cache will list after this: a's revision is older
        async with Cacher(counting) as c:
            await c.wait_ready(5)
            await st.create(k("b"), pod("b"))
            before = counting.lists
            got = await c.get_list("/pods", ListOptions(resource_version=old["metadata"]["resourceVersion"],
                                                        resource_version_match="Exact", recursive=True))
            assert [o["metadata"]["name"] for o in got.items] == ["a"] and counting.lists == before + 1
            await st.compact(await st.get_current_resource_version())
            with pytest.raises(ExpiredError):
                await c.get_list("/pods", ListOptions(resource_version=old["metadata"]["resourceVersion"],
                                                      resource_version_match="Exact", recursive=True))


async def test_pag2_rv0_list_ignores_limit(make_storage):
    async with make_storage() as st, Cacher(st) as c:
        await c.wait_ready(5)
        for i in range(55):
            last = await st.create(k(f"n{i:02d}"), pod(f"n{i:02d}"))
        await c.get(k("n54"), GetOptions(resource_version=last["metadata"]["resourceVersion"]))
        got = await c.get_list("/pods", ListOptions(resource_version="0", limit=1, recursive=True))
        assert len(got.items) == 55 and got.continue_token == "" and got.remaining_item_count is None


async def test_watch_timeout_ends_normally_after_a_bookmark_two_seconds_before(make_storage):
    async with make_storage() as st, Cacher(st) as c:
        await c.wait_ready(5)
        start = str(await st.get_current_resource_version())
        async with c.watch("/pods", ListOptions(resource_version=start, recursive=True, allow_watch_bookmarks=True,
                                                timeout_seconds=3.5)) as w:
            await st.create(k("a"), pod("a"))
            events = []
            with anyio.fail_after(15):
                while batch := await w.next_batch():
                    events.extend(batch)
        assert [e.type for e in events] == [EventType.ADDED, EventType.BOOKMARK]
        assert w.error is None and w.termination is TerminationReason.NONE  # a normal end


async def test_storage_watch_timeout_ends_the_stream():
    async with MemoryStorage(PODS) as st:
        async with st.watch("/pods", ListOptions(resource_version="0", recursive=True, timeout_seconds=0.3)) as w:
            with anyio.fail_after(5):
                assert await w.next_batch() == []
        with pytest.raises(BadRequestError):
            ListOptions(timeout_seconds=-1)


async def test_wait_ready_returns_after_an_unhealthy_spell_and_a_reinitialisation():
    async with MemoryStorage(PODS) as st, Cacher(st) as c:
        await c.wait_ready(5)
        c._on_unhealthy(InternalError("watch keeps failing"))
        done: list[bool] = []

        async def waiter():
            await c.wait_ready(10)
            done.append(c.ready)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.05)
            c.reinitialize("test")
        assert done == [True]


async def test_objects_written_around_the_library_without_a_usable_name_do_not_stop_the_cache():
    async with MemoryStorage(PODS) as st, Cacher(st) as c:
        await c.wait_ready(5)
        st.kv.put_if("/pods/default/raw", b'{"metadata": {"name": 5, "labels": ["x"]}}', 0)
        good = await st.create(k("good"), pod("good"))
        got = await c.get(k("good"), GetOptions(resource_version=good["metadata"]["resourceVersion"]))
        assert got["metadata"]["name"] == "good" and c.ready


async def test_next_batch_on_a_watch_nobody_entered_starts_it():
    async with MemoryStorage(PODS) as st, Cacher(st) as c:
        await c.wait_ready(5)
        await st.create(k("a"), pod("a"))
        w = c.watch("/pods", ListOptions(resource_version="0", recursive=True))
        with anyio.fail_after(5):
            assert [e.type for e in await w.next_batch()] == [EventType.ADDED]
        await w.stop()
