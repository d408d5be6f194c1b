"""Fan-out of cache events to watchers.

Mirrors k8s.io/apiserver pkg/storage/cacher/cacher.go dispatchEvents / dispatchEvent and time_budget.go:
watchers are indexed by the resource's trigger value (pods: spec.nodeName) or by their
(namespace, name) scope, so an event visits only the watchers that can want it; a first pass offers
the event to every candidate without blocking; watchers whose buffer is full share a small time
budget (refilled at 50 ms per second, capped at 100 ms) and are terminated when it runs out, so one
slow consumer never stalls the others. Bookmarks go out about once a minute to watchers that allow them.

Beyond Kubernetes (like etcd's client cache/): a watcher whose buffer is full is not waited on nor cut
off while the history still holds every event after the position it has covered. It is moved aside
(off the fast path, into ``lagging``) and refilled from the history by ``catch_up`` (when its consumer
drains its buffer, and every ``resync_interval`` from the dispatcher). It rejoins the fast path once it
has taken every event in the history. Only when the history has moved past its next event does it end,
with one ERROR event (410 Expired). The time budget and TOO_SLOW termination apply only to blocked
watchers the history cannot serve.

Why rejoining leaves no gap and no duplicate: the reflector appends each event to the history before
it hands it to the dispatcher, so every event not yet dispatched is in the history (or was evicted,
which the position check turns into 410). A catch-up runs without awaiting; it offers the history's
events after the watcher's ``sent_rv`` (filtered by ``convert``) and advances ``sent_rv`` over every
event it scans, delivered or filtered out. When it has scanned up to the history's newest event it
re-registers the watcher in the same synchronous step, so its ``sent_rv`` is >= every event still on its
way through the dispatcher: those are dropped by ``convert`` (``rv <= sent_rv``: no duplicate) and
every later event is appended to the history after the rejoin, hence dispatched to the watcher on the
fast path (no gap). Lagging watchers get no bookmarks (a bookmark at the dispatcher's version would
jump past events the watcher has not been sent yet).
"""

from __future__ import annotations

import random
import time
from typing import Callable

import anyio

from cacher.history import CacheEvent, EventHistory
from cacher.watcher import CacheWatcher, TerminationReason
from storage.errors import ExpiredError
from storage.interface import EventType, WatchEvent

ALL = ("", "")


class TimeBudget:
    """Seconds the dispatcher may spend waiting on blocked watchers: +refill per second, up to cap."""

    def __init__(self, refill_per_second: float = 0.05, cap: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.refill, self.cap, self.clock = refill_per_second, cap, clock
        self.available = cap
        self._last = clock()

    def take_available(self) -> float:
        """Take everything available now (seconds)."""
        now = self.clock()
        self.available = min(self.cap, self.available + (now - self._last) * self.refill)
        self._last = now
        taken, self.available = self.available, 0.0
        return taken

    def return_unused(self, seconds: float) -> None:
        """Give back what a dispatch pass did not use."""
        self.available = min(self.cap, self.available + max(0.0, seconds))


class Dispatcher:
    """Registry of watchers plus the dispatch loop.

    trigger_field: the resource's trigger field or None; bookmark_frequency: seconds between
    bookmarks per watcher (60); on_terminated: called with each watcher terminated as too slow.
    history: returns the watch cache's EventHistory (enables the lagging path; None = Kubernetes
    behaviour, blocked watchers share the budget and are terminated); catch_up_lagging: False turns
    the lagging path off; resync_interval: seconds between catch-up passes over lagging watchers.
    """

    def __init__(self, trigger_field: str | None, budget: TimeBudget | None = None,
                 bookmark_frequency: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 on_terminated: Callable[[CacheWatcher], None] | None = None,
                 history: Callable[[], EventHistory] | None = None, catch_up_lagging: bool = True,
                 resync_interval: float = 0.05) -> None:
        self.trigger_field = trigger_field
        self.budget = budget if budget is not None else TimeBudget(clock=clock)
        self.bookmark_frequency = bookmark_frequency
        self.clock = clock
        self.on_terminated = on_terminated
        #: Called after each event is dispatched (the Cacher counts events_dispatched_total with it).
        self.on_dispatched: Callable[[], None] | None = None
        self.by_scope: dict[tuple[str, str], set[CacheWatcher]] = {}
        self.by_trigger: dict[str, set[CacheWatcher]] = {}
        self.bookmark_watchers: set[CacheWatcher] = set()
        self.last_rv = 0
        self.dispatched = 0
        self.terminated = 0
        self.history = history if catch_up_lagging else None
        self.resync_interval = resync_interval
        self.lagging: set[CacheWatcher] = set()
        self.moved_aside = 0  # times a watcher left the fast path to be fed from the history
        self.caught_up = 0  # times a lagging watcher rejoined the fast path
        self.expired = 0  # lagging watchers ended with 410 because the history moved past them

    # ---- registry --------------------------------------------------------------------------------
    def register(self, w: CacheWatcher) -> None:
        """Index ``w`` by trigger value (if pinned) or by scope."""
        if w.opts.allow_watch_bookmarks:
            w.next_bookmark_time = w.next_bookmark_after(self.clock(), self.bookmark_frequency)
        if self.history is not None:
            w.catch_up = self.catch_up
        self._add_to_fast_path(w)

    def _add_to_fast_path(self, w: CacheWatcher) -> None:
        if w.trigger_value is not None:
            self.by_trigger.setdefault(w.trigger_value, set()).add(w)
        else:
            self.by_scope.setdefault(w.scope, set()).add(w)
        if w.opts.allow_watch_bookmarks:
            self.bookmark_watchers.add(w)

    def unregister(self, w: CacheWatcher) -> None:
        """Remove ``w`` from every index and from the lagging set (idempotent)."""
        self._remove_from_fast_path(w)
        self.lagging.discard(w)
        w.lagging = False

    def _remove_from_fast_path(self, w: CacheWatcher) -> None:
        index, value = ((self.by_trigger, w.trigger_value) if w.trigger_value is not None
                        else (self.by_scope, w.scope))
        bucket = index.get(value)  # type: ignore[arg-type]
        if bucket is not None:
            bucket.discard(w)
            if not bucket:
                del index[value]  # type: ignore[arg-type]
        self.bookmark_watchers.discard(w)

    def watchers(self) -> list[CacheWatcher]:
        """Every registered watcher, lagging ones included."""
        out = [w for ws in self.by_scope.values() for w in ws]
        out.extend(w for ws in self.by_trigger.values() for w in ws)
        out.extend(self.lagging)
        return out

    def terminate_all(self, reason: TerminationReason) -> None:
        """End every watcher (re-initialisation or shutdown)."""
        for w in self.watchers():
            self.unregister(w)
            w.terminate(reason)

    def candidates(self, event: CacheEvent) -> list[CacheWatcher]:
        """Watchers that may want ``event``: by its namespace/name scope and by its old and new trigger
        values (cacher.go startDispatching)."""
        fields = event.fields
        ns, name = fields.get("metadata.namespace", ""), fields.get("metadata.name", "")
        out: list[CacheWatcher] = []
        for scope in ((ns, name), (ns, ""), ("", name), ALL) if ns else (("", name), ALL):
            ws = self.by_scope.get(scope)
            if ws:
                out.extend(ws)
        if self.by_trigger:
            if self.trigger_field is None:
                out.extend(w for ws in self.by_trigger.values() for w in ws)
            else:
                value = fields.get(self.trigger_field, "")
                ws = self.by_trigger.get(value)
                if ws:
                    out.extend(ws)
                if event.prev_fields is not None:
                    old = event.prev_fields.get(self.trigger_field, "")
                    if old != value and (ws := self.by_trigger.get(old)):
                        out.extend(ws)
        return out

    # ---- dispatch --------------------------------------------------------------------------------
    async def run(self, receive: anyio.abc.ObjectReceiveStream) -> None:
        """Dispatch every batch from ``receive`` (lists of CacheEvents, or an int resource version
        from a progress notification) until the stream closes; ticks bookmarks about every second."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._bookmark_loop)
            if self.history is not None:
                tg.start_soon(self._resync_loop)
            async for item in receive:
                if isinstance(item, int):
                    self.last_rv = max(self.last_rv, item)
                    continue
                for event in item:
                    await self.dispatch(event)
            tg.cancel_scope.cancel()

    async def dispatch(self, event: CacheEvent) -> None:
        """Offer ``event`` to its candidates; blocked ones share the time budget."""
        blocked = [w for w in self.candidates(event) if not w.try_add(event)]
        if blocked and self.history is not None:
            blocked = [w for w in blocked if not self._move_aside(w)]
        if blocked:
            await self._dispatch_blocked(event, blocked)
        self.last_rv = event.resource_version
        self.dispatched += 1
        if self.on_dispatched is not None:
            self.on_dispatched()

    async def _dispatch_blocked(self, event: CacheEvent, blocked: list[CacheWatcher]) -> None:
        budget = self.budget.take_available()
        deadline = self.clock() + budget
        timed_out = False
        for w in blocked:
            if w.finished:
                continue
            if not timed_out:
                with anyio.move_on_after(max(0.0, deadline - self.clock())) as scope:
                    if await w.add_waiting(event):
                        continue
                timed_out = scope.cancel_called
            elif w.try_add(event):
                continue
            self._terminate_slow(w)
        self.budget.return_unused(deadline - self.clock())

    def _terminate_slow(self, w: CacheWatcher) -> None:
        self.unregister(w)
        w.terminate(TerminationReason.TOO_SLOW)
        self.terminated += 1
        if self.on_terminated is not None:
            self.on_terminated(w)

    # ---- lagging watchers (beyond Kubernetes) ------------------------------------------------------
    def _move_aside(self, w: CacheWatcher) -> bool:
        """Take ``w`` (its buffer full for the event being dispatched) off the fast path if the history
        can serve it from the position it has covered; False leaves it to the time budget."""
        assert self.history is not None
        # On the fast path the watcher has seen (or had filtered out) every event up to last_rv, the
        # version of the previous dispatched event; the current event is after it.
        covered = max(w.sent_rv, self.last_rv)
        if w.finished or not self.history().can_serve(covered):
            return False
        self._remove_from_fast_path(w)
        w.sent_rv = covered
        w.lagging = True
        self.lagging.add(w)
        self.moved_aside += 1
        return True

    def catch_up(self, w: CacheWatcher) -> None:
        """Refill lagging ``w`` from the history; rejoin the fast path once it has every event in the
        history; 410 if the history moved past it. Synchronous: nothing can be dispatched meanwhile."""
        if w not in self.lagging:
            return
        if w.finished:
            self.unregister(w)
            return
        assert self.history is not None
        history = self.history()
        try:
            index = history.index_after(w.sent_rv)
        except ExpiredError as exc:
            self.lagging.discard(w)
            self.expired += 1
            w.expire(exc)
            if self.on_terminated is not None:  # apiserver_terminated_watchers_total counts it too
                self.on_terminated(w)
            return
        room = w.free()
        out: list[WatchEvent] = []
        last = w.sent_rv
        end = history.end
        while index < end:
            event = history.event_at(index)
            assert event is not None
            converted = w.convert(event)
            if converted is not None:
                if len(out) == room:
                    break
                out.append(converted)
            last = event.resource_version
            index += 1
        if out and not w.offer(out):
            return  # ended meanwhile; unregister() runs on stop
        w.sent_rv = max(w.sent_rv, last)
        if index == end:  # every event in the history is covered: back on the fast path
            self.lagging.discard(w)
            w.lagging = False
            self._add_to_fast_path(w)
            self.caught_up += 1

    def resync(self) -> None:
        """One catch-up pass over every lagging watcher."""
        for w in list(self.lagging):
            self.catch_up(w)

    async def _resync_loop(self) -> None:
        while True:
            await anyio.sleep(self.resync_interval)
            if self.lagging:
                self.resync()

    # ---- bookmarks -------------------------------------------------------------------------------
    async def _bookmark_loop(self) -> None:
        while True:
            await anyio.sleep(random.uniform(0.75, 1.25))  # 1 s +-25 %, like the Go ticker
            self.send_bookmarks()

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK at the last dispatched resource version to watchers whose time has come."""
        now, rv = self.clock(), self.last_rv
        if rv == 0:
            return
        for w in list(self.bookmark_watchers):
            if w.next_bookmark_time > now or rv < w.sent_rv or rv < w.bookmark_after_rv:
                continue
            if w.offer(WatchEvent(EventType.BOOKMARK, {"metadata": {"resourceVersion": str(rv)}})):
                w.sent_rv = rv
            w.next_bookmark_time = w.next_bookmark_after(now, self.bookmark_frequency)
