"""Fan-out of cache events to watchers.

Mirrors k8s.io/apiserver pkg/storage/cacher/cacher.go dispatchEvents / dispatchEvent and time_budget.go:
watchers are indexed by the resource's trigger value (pods: spec.nodeName) or by their
(namespace, name) scope, so an event visits only the watchers that can want it; a first pass offers
the event to every candidate without blocking; watchers whose buffer is full share a small time
budget (refilled at 50 ms per second, capped at 100 ms) and are terminated when it runs out, so one
slow consumer never stalls the others. Bookmarks go out about once a minute to watchers that allow them.
"""

from __future__ import annotations

import random
import time
from typing import Callable

import anyio

from cacher.history import CacheEvent
from cacher.watcher import CacheWatcher, TerminationReason
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
    """

    def __init__(self, trigger_field: str | None, budget: TimeBudget | None = None,
                 bookmark_frequency: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 on_terminated: Callable[[CacheWatcher], None] | None = None) -> None:
        self.trigger_field = trigger_field
        self.budget = budget if budget is not None else TimeBudget(clock=clock)
        self.bookmark_frequency = bookmark_frequency
        self.clock = clock
        self.on_terminated = on_terminated
        self.by_scope: dict[tuple[str, str], set[CacheWatcher]] = {}
        self.by_trigger: dict[str, set[CacheWatcher]] = {}
        self.bookmark_watchers: set[CacheWatcher] = set()
        self.last_rv = 0
        self.dispatched = 0
        self.terminated = 0

    # ---- registry --------------------------------------------------------------------------------
    def register(self, w: CacheWatcher) -> None:
        """Index ``w`` by trigger value (if pinned) or by scope."""
        if w.trigger_value is not None:
            self.by_trigger.setdefault(w.trigger_value, set()).add(w)
        else:
            self.by_scope.setdefault(w.scope, set()).add(w)
        if w.opts.allow_watch_bookmarks:
            w.next_bookmark_time = self.clock() + self.bookmark_frequency
            self.bookmark_watchers.add(w)

    def unregister(self, w: CacheWatcher) -> None:
        """Remove ``w`` from every index (idempotent)."""
        index, value = ((self.by_trigger, w.trigger_value) if w.trigger_value is not None
                        else (self.by_scope, w.scope))
        bucket = index.get(value)  # type: ignore[arg-type]
        if bucket is not None:
            bucket.discard(w)
            if not bucket:
                del index[value]  # type: ignore[arg-type]
        self.bookmark_watchers.discard(w)

    def watchers(self) -> list[CacheWatcher]:
        """Every registered watcher."""
        out = [w for ws in self.by_scope.values() for w in ws]
        out.extend(w for ws in self.by_trigger.values() for w in ws)
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
        if blocked:
            await self._dispatch_blocked(event, blocked)
        self.last_rv = event.resource_version
        self.dispatched += 1

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
            w.next_bookmark_time = now + self.bookmark_frequency
