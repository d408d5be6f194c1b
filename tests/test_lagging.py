"""History window sizing (issue 4 item 1), slow and lagging watchers (items 9 and 14) and the field
cases SLOW-1, SLOW-3, MEM-1, MEM-3, CMP-3 (inside the cacher) and RST-2.

A watcher whose buffer is full is moved aside and caught up from the cache's history instead of being
cut off (cacher/dispatcher.py explains how it rejoins without gap or duplicate); it ends with one
ERROR event (410 Expired) only when the history has moved past its next event. Runs under asyncio and
trio, against Cacher(memory) and, where the fault can be produced on a real server, Cacher(etcd3).
No timing assertions: waits are bounded with generous timeouts.
"""

from __future__ import annotations

import random
import uuid
from contextlib import asynccontextmanager

import anyio
import pytest

from cacher.cacher import Cacher
from cacher.dispatcher import Dispatcher
from cacher.history import CacheEvent, EventHistory
from cacher.watcher import CacheWatcher, TerminationReason
from storage.errors import ExpiredError
from storage.interface import EventType, GetOptions, ListOptions, Resource, WatchEvent
from storage.memory.store import MemoryStorage
from storage.testing.conformance import collect, collect_until_quiet, summary

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def _resource() -> Resource:
    return Resource(f"/pods-{uuid.uuid4().hex[:12]}", field_paths=("spec.nodeName",),
                    trigger_field="spec.nodeName", index_fields=("spec.nodeName",))


@pytest.fixture(params=["memory", "etcd3"])
def target(request):
    """Opens a fresh storage of the parametrised backend: ``async with target() as storage``."""
    endpoint = request.getfixturevalue("etcd_server").endpoint if request.param == "etcd3" else None

    @asynccontextmanager
    async def open_storage():
        res = _resource()
        if endpoint is None:
            async with MemoryStorage(res) as st:
                yield st
        else:
            from storage.etcd3.store import Etcd3Storage
            async with Etcd3Storage(res, endpoints=[endpoint]) as st:
                yield st
    return open_storage


def pod(name: str, node: str = "", ns: str = "default", **extra) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node}, **extra}


def k(st, name: str, ns: str = "default") -> str:
    return f"{st.resource.prefix}/{ns}/{name}"


def rv_of(obj: dict) -> int:
    return int(obj["metadata"]["resourceVersion"])


def triples(events: list[WatchEvent]) -> list[tuple[str, str, int]]:
    return [(e.type.value, e.object["metadata"]["name"], e.resource_version)
            for e in events if e.type in (EventType.ADDED, EventType.MODIFIED, EventType.DELETED)]


async def wait_for(cond, timeout: float = 20.0, step: float = 0.02) -> None:
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(step)


async def synced(c: Cacher, obj: dict) -> None:
    """Wait until the cache (and so the history) holds ``obj``'s revision."""
    await c.get(k(c.storage, obj["metadata"]["name"]), GetOptions(resource_version=str(rv_of(obj))))


async def storage_events(st, rv: int, until_rv: int, quiet: float = 0.3, **opts) -> list[WatchEvent]:
    """What a direct storage watch from ``rv`` delivers up to revision ``until_rv`` (a selective
    watch may have nothing at ``until_rv``: then it reads until ``quiet`` seconds pass silently)."""
    out: list[WatchEvent] = []
    async with st.watch(st.resource.prefix, ListOptions(resource_version=str(rv), recursive=True, **opts)) as w:
        with anyio.fail_after(60):
            while not out or out[-1].resource_version < until_rv:
                with anyio.move_on_after(quiet) as scope:
                    batch = await w.next_batch()
                if scope.cancel_called:
                    break
                assert batch, "storage watch ended early"
                out.extend(e for e in batch if e.type is not EventType.BOOKMARK)
    return [e for e in out if e.resource_version <= until_rv]


async def read_until(w, until_rv: int, timeout: float = 30.0, pause=None) -> list[WatchEvent]:
    """Read ``w`` until an event at ``until_rv`` or later arrives (or the stream ends)."""
    out: list[WatchEvent] = []
    with anyio.fail_after(timeout):
        while True:
            batch = await w.next_batch()
            if not batch:
                return out
            out.extend(e for e in batch if e.type is not EventType.BOOKMARK)
            if out and out[-1].resource_version >= until_rv:
                return out
            if pause is not None:
                await anyio.sleep(pause())


def assert_strictly_increasing(events: list[WatchEvent]) -> None:
    rvs = [e.resource_version for e in events]
    assert rvs == sorted(set(rvs)), "resource versions must strictly increase (no duplicate, no reorder)"


# ---- item 1: history window sized by time and churn ------------------------------------------------

def _event(rv: int, t: float) -> CacheEvent:
    obj = {"metadata": {"name": f"p{rv}", "namespace": "default", "resourceVersion": str(rv)}}
    return CacheEvent(EventType.ADDED, f"/pods/default/p{rv}", obj, {}, {}, None, None, None, rv, t)


def test_history_grows_while_oldest_event_is_fresh_up_to_the_upper_bound():
    h = EventHistory(lower=4, upper=32, fresh_duration=10.0)
    h.reset(list_rv=1)
    for rv in range(2, 102):  # 100 events within 1 s: churn far above capacity / fresh_duration
        h.append(_event(rv, 100.0 + rv / 100))
    assert h.capacity == 32 and len(h) == 32  # 4 -> 8 -> 16 -> 32, then bounded
    assert h.resizes == {"increase": 3, "decrease": 0}
    assert [e.resource_version for e in h.events_since(h.newest_rv - 3)] == [99, 100, 101]


def test_history_shrinks_when_even_recent_events_are_old_down_to_the_lower_bound():
    h = EventHistory(lower=4, upper=64, fresh_duration=10.0)
    h.reset(list_rv=1)
    for rv in range(2, 34):
        h.append(_event(rv, 0.0))
    assert h.capacity == 32
    # Much later: even the event a quarter of the way from the newest is older than fresh_duration.
    h.append(_event(34, 1000.0))
    assert h.capacity == 16 and h.resizes["decrease"] == 1
    for rv in range(35, 60):  # slow churn: one event per 20 s keeps the window shrinking
        h.append(_event(rv, 1000.0 + 20 * (rv - 34)))
    assert h.capacity == 4 and len(h) == 4  # never below the lower bound
    with pytest.raises(ExpiredError, match="too old resource version"):
        h.events_since(40)


def test_history_keeps_its_size_when_the_window_covers_about_the_fresh_duration():
    h = EventHistory(lower=8, upper=64, fresh_duration=10.0)
    h.reset(list_rv=1)
    for rv in range(2, 10):  # 8 events over 14 s: oldest older than 10 s, quarter-newest younger
        h.append(_event(rv, 2.0 * rv))
    h.append(_event(10, 20.5))
    assert h.capacity == 8 and h.resizes == {"increase": 0, "decrease": 0}
    assert len(h) == 8 and h.events_since(h.oldest_servable_rv())[0].resource_version == 3


def test_history_watch_older_than_the_window_is_410_and_intervals_share_events():
    h = EventHistory(lower=4, upper=4, fresh_duration=10.0)
    h.reset(list_rv=10)
    assert h.events_since(10) == [] and h.can_serve(10) and not h.can_serve(9)
    with pytest.raises(ExpiredError):
        h.events_since(9)  # before the list: nothing to replay from
    events = [_event(rv, 0.0) for rv in range(11, 21)]
    for ev in events:
        h.append(ev)
    assert h.oldest_servable_rv() == 16 and h.can_serve(16) and not h.can_serve(15)
    with pytest.raises(ExpiredError, match=r"too old resource version: 15 \(16\)"):
        h.events_since(15)
    got = h.events_since(16)
    assert all(a is b for a, b in zip(got, events[-4:])) and len(got) == 4  # references, no copies
    assert h.index_after(18) == h.end - 2 and h.event_at(h.end) is None and h.event_at(h.start - 1) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_history_window_follows_churn_through_the_cacher(target):
    async with target() as st, Cacher(st, history_lower=4, history_upper=64, fresh_duration=75.0) as c:
        await c.wait_ready(10)
        clock = FakeClock()
        c.watch_cache.clock = clock  # record times of new events come from the fake clock
        start = await st.get_current_resource_version()
        for i in range(40):  # 40 events "at once": the window must grow to keep them all
            last = await st.create(k(st, f"p{i}"), pod(f"p{i}"))
        await synced(c, last)
        h = c.watch_cache.history
        assert h.capacity == 64 and h.resizes["increase"] == 4
        async with c.watch(st.resource.prefix, ListOptions(resource_version=str(start), recursive=True)) as w:
            got = await collect(w, 40, timeout=20)
        assert [n for _, n, _ in summary(got)] == [f"p{i}" for i in range(40)]
        # Churn drops to one event per 20 s: once full, even the newest quarter of the window is
        # older than fresh_duration, so it shrinks (halving per insert, down to the lower bound).
        for i in range(40, 100):
            clock.now += 20
            last = await st.create(k(st, f"p{i}"), pod(f"p{i}"))
            await synced(c, last)  # applied (and stamped) before the clock moves on
        assert h.capacity < 64 and h.resizes["decrease"] >= 1 and h.capacity >= 4
        async with c.watch(st.resource.prefix, ListOptions(resource_version=str(start), recursive=True)) as w:
            events = await collect(w, 2)
        assert [e.type for e in events] == [EventType.ERROR] and events[0].object["code"] == 410
        assert "too old resource version" in events[0].object["message"]


# ---- items 9 and 14: slow watchers never block dispatch; lagging watchers catch up ----------------------

async def test_slow1_three_stalled_watchers_do_not_hold_back_seven_readers(target):
    async with target() as st, Cacher(st, watcher_capacity=10) as c:
        await c.wait_ready(10)
        start = await st.get_current_resource_version()
        opts = ListOptions(resource_version=str(start), recursive=True)
        watches = [c.watch(st.resource.prefix, opts) for _ in range(10)]
        for w in watches:
            await w.start()
        stalled, readers = watches[:3], watches[3:]
        names = [f"p{i}" for i in range(100)]

        async def writer():
            for name in names:
                await st.create(k(st, name), pod(name))

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            got = [await collect(w, 100, timeout=60) for w in readers]
        for events in got:
            assert [n for _, n, _ in summary(events)] == names
        # The three were moved aside, not cut off: nothing terminated, no ERROR yet.
        assert c.dispatcher.terminated == 0 and c.dispatcher.expired == 0
        assert set(stalled) <= c.dispatcher.lagging and c.dispatcher.moved_aside >= 3
        assert all(w.termination is TerminationReason.NONE and not w.finished for w in stalled)
        last_rv = summary(got[0])[-1][2]
        for w in stalled:  # they resume and get all 100, in order, from the history
            events = await read_until(w, last_rv)
            assert [n for _, n, _ in summary(events)] == names
            assert_strictly_increasing(events)
        await wait_for(lambda: not c.dispatcher.lagging)
        assert c.dispatcher.caught_up >= 3
        after = await st.create(k(st, "after"), pod("after"))  # back on the fast path
        for w in watches:
            assert summary(await collect(w, 1, timeout=10)) == [("ADDED", "after", rv_of(after))]
            await w.stop()


async def test_lagging_watcher_with_kubernetes_behaviour_is_terminated_too_slow():
    async with MemoryStorage(_resource()) as st, \
            Cacher(st, watcher_capacity=3, catch_up_lagging=False) as c:
        await c.wait_ready(5)
        start = str(await st.get_current_resource_version())
        slow = c.watch(st.resource.prefix, ListOptions(resource_version=start, recursive=True))
        await slow.start()
        for i in range(20):
            last = await st.create(k(st, f"p{i}"), pod(f"p{i}"))
        await synced(c, last)
        await wait_for(lambda: slow.finished)
        assert slow.termination is TerminationReason.TOO_SLOW and not c.dispatcher.lagging
        await slow.stop()


async def test_blocked_watcher_the_history_cannot_serve_falls_back_to_the_time_budget():
    # Memory writes do not yield, so the reflector applies all of them before the dispatcher runs:
    # when the watcher blocks, its next event already left the 4-event history. Only then does the
    # Kubernetes rule apply (wait within the shared budget, then end the stream as too slow).
    async with MemoryStorage(_resource()) as st, \
            Cacher(st, watcher_capacity=2, history_lower=4, history_upper=4) as c:
        await c.wait_ready(5)
        start = str(await st.get_current_resource_version())
        w = c.watch(st.resource.prefix, ListOptions(resource_version=start, recursive=True))
        await w.start()
        for i in range(30):
            last = await st.create(k(st, f"p{i}"), pod(f"p{i}"))
        await synced(c, last)
        await wait_for(lambda: w.finished)
        assert w.termination is TerminationReason.TOO_SLOW and c.dispatcher.terminated == 1
        assert not c.dispatcher.lagging and c.dispatcher.moved_aside == 0
        assert [n for _, n, _ in summary(await collect_until_quiet(w, 0.3))] == ["p0", "p1"]


async def test_cmp3_lagging_watcher_past_the_history_gets_one_410_never_a_jump(target):
    async with target() as st, Cacher(st, watcher_capacity=2, history_lower=8, history_upper=8) as c:
        await c.wait_ready(10)
        a = await st.create(k(st, "a"), pod("a"))
        await synced(c, a)
        start = rv_of(a)
        w = c.watch(st.resource.prefix, ListOptions(resource_version=str(start), recursive=True))
        await w.start()  # its consumer pauses: the buffer fills after 2 events
        for i in range(3):
            last = await st.create(k(st, f"p{i}"), pod(f"p{i}"))
            await synced(c, last)
        await wait_for(lambda: w in c.dispatcher.lagging)  # moved aside, not cut off
        for i in range(3, 30):
            last = await st.create(k(st, f"p{i}"), pod(f"p{i}"))
            if i == 10:
                await st.delete(k(st, "a"))  # the delete the watcher must not silently skip
        await synced(c, last)
        await wait_for(lambda: w.finished)  # the resync tick notices the history moved past it
        assert w.termination is TerminationReason.EXPIRED and c.dispatcher.expired == 1
        assert c.dispatcher.terminated == 0 and w not in c.dispatcher.lagging
        events = await collect_until_quiet(w, 1.0)
        assert await w.next_batch() == []
        *delivered, error = events
        assert error.type is EventType.ERROR and error.object["code"] == 410
        assert "too old resource version" in error.object["message"]
        # What it got is exactly the start of the storage history: contiguous, nothing skipped.
        expected = await storage_events(st, start, rv_of(last))
        assert triples(delivered) == triples(expected)[:len(delivered)] and len(delivered) >= 2
        assert sum(e.type is EventType.ERROR for e in events) == 1
        # The client re-watches from its last event: 410 again, typed, so it relists.
        again = c.watch(st.resource.prefix, ListOptions(resource_version=str(delivered[-1].resource_version),
                                                        recursive=True))
        async with again:
            assert [e.type for e in await collect(again, 2)] == [EventType.ERROR]


async def test_lagging_selective_watcher_catches_up_past_filtered_events_and_rejoins(target):
    async with target() as st, Cacher(st, watcher_capacity=2, history_lower=16, history_upper=16) as c:
        await c.wait_ready(10)
        start = await st.get_current_resource_version()
        w = c.watch(st.resource.prefix, ListOptions(resource_version=str(start), recursive=True,
                                                    field_selector="spec.nodeName=n1"))
        await w.start()
        mine = []
        for i in range(3):
            mine.append(await st.create(k(st, f"mine{i}"), pod(f"mine{i}", "n1")))
            await synced(c, mine[-1])
        await wait_for(lambda: w in c.dispatcher.lagging)  # mine2 did not fit
        for i in range(10):  # irrelevant to it, while it lags (the history still holds mine2)
            last = await st.create(k(st, f"other{i}"), pod(f"other{i}", "n2"))
        await synced(c, last)
        events = await read_until(w, rv_of(mine[-1]))
        assert summary(events) == [("ADDED", f"mine{i}", rv_of(o)) for i, o in enumerate(mine)]
        # The drain caught it up past the filtered events: it is back on the fast path, and far more
        # irrelevant events than the history holds cannot make it fall out of the window any more.
        await wait_for(lambda: w not in c.dispatcher.lagging)
        for i in range(10, 50):
            last = await st.create(k(st, f"other{i}"), pod(f"other{i}", "n2"))
        await synced(c, last)
        late = await st.create(k(st, "late"), pod("late", "n1"))
        assert summary(await collect(w, 1, timeout=10)) == [("ADDED", "late", rv_of(late))]
        assert not w.finished and c.dispatcher.expired == 0 and c.dispatcher.caught_up >= 1
        await w.stop()

async def test_rejoin_while_history_is_ahead_of_dispatch_has_no_gap_and_no_duplicate():
    """Deterministic: the history holds events the dispatcher has not dispatched yet when a lagging
    watcher catches up and rejoins; dispatching them afterwards must not deliver them twice."""
    history = EventHistory(lower=64, upper=64)
    history.reset(list_rv=1)
    d = Dispatcher(None, history=lambda: history)
    opts = ListOptions(resource_version="1", recursive=True)
    w = CacheWatcher("/pods/", opts, 2, trigger_value=None, scope=("", ""), on_start=None, on_stop=None)
    w.sent_rv = 1
    d.register(w)
    events = [_event(rv, 0.0) for rv in range(2, 12)]
    for ev in events[:5]:  # the reflector appends to the history first ...
        history.append(ev)
    for ev in events[:5]:  # ... and the dispatcher follows
        await d.dispatch(ev)
    assert w in d.lagging and d.last_rv == 6
    for ev in events[5:8]:  # history ahead of dispatch: rv 7..9 appended, not dispatched yet
        history.append(ev)
    got: list[WatchEvent] = []
    while w in d.lagging:  # the consumer drains; each drain catches it up from the history
        got.extend(await w.next_batch())
    assert w.sent_rv == 9 and d.caught_up == 1
    for ev in events[5:8]:  # now the dispatcher reaches them: already covered, not sent again
        await d.dispatch(ev)
    for ev in events[8:]:  # later events arrive on the fast path
        history.append(ev)
        await d.dispatch(ev)  # the buffer (2) is full again: it may lag once more, that's fine
    with anyio.fail_after(5):
        while len(got) < 10:
            got.extend(await w.next_batch())
    assert [e.resource_version for e in got] == list(range(2, 12))
    assert not d.lagging and w.free() == w.capacity


async def test_lagging_watcher_gets_no_bookmark_ahead_of_its_events():
    history = EventHistory(lower=64, upper=64)
    history.reset(list_rv=1)
    clock = FakeClock()
    d = Dispatcher(None, history=lambda: history, bookmark_frequency=1.0, clock=clock)
    opts = ListOptions(resource_version="1", recursive=True, allow_watch_bookmarks=True)
    w = CacheWatcher("/pods/", opts, 2, trigger_value=None, scope=("", ""), on_start=None, on_stop=None)
    w.sent_rv = 1
    d.register(w)
    for rv in range(2, 8):
        history.append(_event(rv, 0.0))
        await d.dispatch(history.event_at(history.end - 1))
    assert w in d.lagging
    clock.now += 5  # its bookmark is due
    d.send_bookmarks()  # the dispatcher is at rv 7; the watcher has been sent up to rv 3: none
    got: list[WatchEvent] = []
    while w in d.lagging:
        got.extend(await w.next_batch())
    got.extend(await w.next_batch())  # drained
    d.send_bookmarks()  # caught up, with room: a bookmark may follow now
    with anyio.fail_after(5):
        got.extend(await w.next_batch())
    assert [(e.type, e.resource_version) for e in got] == (
        [(EventType.ADDED, rv) for rv in range(2, 8)] + [(EventType.BOOKMARK, 7)])


# ---- SLOW-3 / MEM-3: reconnect from the last resource version inside the window: no relist -------------

async def test_slow3_mem3_reconnect_with_last_rv_resumes_without_relist(target):
    async with target() as st, Cacher(st, history_lower=100) as c:
        await c.wait_ready(10)
        start = await st.get_current_resource_version()
        nodes = [f"n{i}" for i in range(5)]
        watches = {n: c.watch(st.resource.prefix, ListOptions(resource_version=str(start), recursive=True,
                                                              field_selector=f"spec.nodeName={n}"))
                   for n in nodes}
        for w in watches.values():
            await w.start()
        for i in range(20):
            await st.create(k(st, f"p{i}"), pod(f"p{i}", nodes[i % 5]))
        last_seen = {}
        for n, w in watches.items():
            events = await collect(w, 4, timeout=20)
            assert len(events) == 4
            last_seen[n] = events[-1].resource_version
            await w.stop()  # disconnected
        for i in range(20, 150):  # churn while they are away: more than the lower bound
            last = await st.guaranteed_update(k(st, f"p{i % 20}"), lambda o, m: {**o, "gen": i})
        await synced(c, last)
        for n in nodes:
            rv = last_seen[n]
            expected = await storage_events(st, rv, rv_of(last), field_selector=f"spec.nodeName={n}")
            async with c.watch(st.resource.prefix, ListOptions(resource_version=str(rv), recursive=True,
                                                               field_selector=f"spec.nodeName={n}")) as w:
                got = await read_until(w, expected[-1].resource_version)
            assert triples(got) == triples(expected) and len(got) == 26
        assert c.reflector.lists == 1  # nobody had to relist


# ---- MEM-1: initial events of watches from an old rv share the history's objects ------------------------

async def test_mem1_mass_rewatch_shares_history_events_without_copies():
    async with MemoryStorage(_resource()) as st, Cacher(st, history_lower=1000) as c:
        await c.wait_ready(5)
        start = await st.get_current_resource_version()
        for i in range(300):
            last = await st.guaranteed_update(k(st, f"p{i % 30}"), lambda o, m: {**(o or pod(f"p{i % 30}")),
                                                                                  "gen": i},
                                              ignore_not_found=True)
        await synced(c, last)
        interval = c.watch_cache.history.events_since(start)
        assert len(interval) == 300
        watches = [c.watch(st.resource.prefix, ListOptions(resource_version=str(start), recursive=True))
                   for _ in range(50)]
        for w in watches:
            await w.start()
        streams = [await collect(w, 300, timeout=20) for w in watches]
        for events in streams:
            assert [e.resource_version for e in events] == [ev.resource_version for ev in interval]
            # Same WatchEvent objects (hence same encoded bytes) and the history's own objects.
            assert all(a is b for a, b in zip(events, streams[0]))
            assert all(e.object is ev.object for e, ev in zip(events, interval))
        for w in watches:
            await w.stop()


# ---- RST-2 / CMP-3: continuous writes while many small-buffer watchers start and lag --------------------

async def test_rst2_watchers_started_during_writes_match_storage_history(target):
    n_writes = 400
    async with target() as st, Cacher(st, watcher_capacity=3, history_lower=1000) as c:
        await c.wait_ready(10)
        rng = random.Random(7)
        written: list[int] = []
        starts: list[int] = [await st.get_current_resource_version()]

        async def writer():
            for i in range(n_writes):
                name = f"p{i % 25}"
                if i % 25 == i:
                    obj = await st.create(k(st, name), pod(name, f"n{i % 3}"))
                elif i % 7 == 0:
                    written.append(rv_of(await st.delete(k(st, name))))
                    obj = await st.create(k(st, name), pod(name, f"n{i % 3}"))
                else:
                    obj = await st.guaranteed_update(k(st, name), lambda o, m: {
                        **o, "spec": {"nodeName": f"n{rng.randrange(3)}"}, "gen": i})
                written.append(rv_of(obj))
                if i % 5 == 0:
                    await anyio.sleep(0)
            writer_done.set()

        results: list[tuple[int, str | None, list[WatchEvent]]] = []

        async def watcher(start: int, selector: str | None, seed: int):
            r = random.Random(seed)
            opts = ListOptions(resource_version=str(start), recursive=True, field_selector=selector or "")
            async with c.watch(st.resource.prefix, opts) as w:
                out: list[WatchEvent] = []
                with anyio.fail_after(60):
                    while True:
                        # Done once everything was written, dispatched and taken by this watcher.
                        if (done.is_set() and c.dispatcher.last_rv >= final[0] and w.free() == w.capacity
                                and w not in c.dispatcher.lagging):
                            break
                        with anyio.move_on_after(0.2):
                            batch = await w.next_batch()
                            assert batch, f"watch ended: {w.termination} {w.error}"
                            out.extend(e for e in batch if e.type is not EventType.BOOKMARK)
                        if r.random() < 0.3:
                            await anyio.sleep(r.uniform(0, 0.01))  # a slow consumer
                results.append((start, selector, out))

        done, writer_done, final = anyio.Event(), anyio.Event(), [0]
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            for j in range(16):  # start watchers while updates keep flowing
                await anyio.sleep(0.01)
                rv = written[-1] if written else starts[0]
                tg.start_soon(watcher, rv, f"spec.nodeName=n{j % 3}" if j % 2 else None, j)
            while not writer_done.is_set():
                await anyio.sleep(0.01)
            final[0] = written[-1]
            await wait_for(lambda: c.watch_cache.resource_version >= final[0])
            done.set()
        assert len(results) == 16
        assert c.dispatcher.terminated == 0 and c.dispatcher.expired == 0
        assert c.dispatcher.moved_aside > 0  # the lagging path was exercised
        for start, selector, events in results:
            assert_strictly_increasing(events)
            keys = [(e.object["metadata"]["name"], e.resource_version) for e in events]
            assert len(keys) == len(set(keys))
            opts = {"field_selector": selector} if selector else {}
            expected = await storage_events(st, start, final[0], **opts)
            assert triples(events) == triples(expected), (start, selector)
