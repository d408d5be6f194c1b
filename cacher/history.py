"""The watch cache's event history: a ring buffer with absolute, ever-increasing indices.

Mirrors k8s.io/apiserver pkg/storage/cacher/watch_cache_history.go: capacity starts at the lower bound
and doubles while the oldest event is younger than ``fresh_duration`` (75 s), halves when even the
event a quarter of the way in is older, between ``lower`` (100) and ``upper`` (102,400); when full the
oldest event is evicted. A watch from a resource version older than the window gets 410 Expired.
("A quarter of the way in" is counted from the newest end: the event at ``end - capacity/4``.) Event
ages come from each event's ``record_time`` (stamped by the WatchCache's clock, injectable in tests).

Memory (case MEM-1): events are immutable and shared. A watch from an old resource version gets
``events_since`` = a list of references to the history's events (O(events in the interval) pointers,
no object copies); each watcher then buffers the WatchEvent that ``CacheEvent.watch_event`` built once
for all watchers. ``index_after`` / ``event_at`` give a free cursor (an absolute index) that the
dispatcher's lagging path uses to refill a watcher a buffer at a time, without any interval copy.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from storage.errors import ExpiredError, InternalError
from storage.interface import EventType, WatchEvent
from storage.versioner import with_resource_version


@dataclass(slots=True, eq=False)
class CacheEvent:
    """One change applied to the cache, shared by the history, the dispatcher and every watcher.

    ``object`` is the new object (for DELETED: the previous object stamped with the deletion revision);
    ``prev_object`` the object before the change (None on create). Labels and fields of both are
    computed once at ingest. ``watch_event(kind)`` builds each outgoing WatchEvent at most once, so all
    watchers share one event object (and its serialized bytes).
    """

    type: EventType
    key: str
    object: dict[str, Any]
    labels: Mapping[str, str]
    fields: Mapping[str, str]
    prev_object: dict[str, Any] | None
    prev_labels: Mapping[str, str] | None
    prev_fields: Mapping[str, str] | None
    resource_version: int
    record_time: float
    _out: dict[EventType, WatchEvent] = field(default_factory=dict)

    def watch_event(self, kind: EventType) -> WatchEvent:
        """The outgoing event of type ``kind`` (ADDED/MODIFIED carry ``object``; a DELETED for a
        watcher the object stopped matching carries ``prev_object`` at this event's revision)."""
        out = self._out.get(kind)
        if out is None:
            if kind is EventType.DELETED and self.type is not EventType.DELETED:
                obj = with_resource_version(self.prev_object or {}, self.resource_version)
            else:
                obj = self.object
            out = self._out[kind] = WatchEvent(kind, obj)
        return out


class EventHistory:
    """Ring buffer of CacheEvents. Indices are absolute; slot = index % capacity.

    lower / upper: capacity bounds (events); fresh_duration: seconds of history to try to keep;
    clock: seconds source for event ages.
    """

    def __init__(self, lower: int = 100, upper: int = 100 * 1024, fresh_duration: float = 75.0,
                 clock: Callable[[], float] | None = None) -> None:
        import time
        self.lower, self.upper = lower, max(lower, upper)
        self.fresh_duration = fresh_duration
        self.clock = clock or time.monotonic
        self.capacity = lower
        self._ring: list[CacheEvent | None] = [None] * lower
        self.start = 0
        self.end = 0
        self.list_rv = 0
        self.evicted_since_relist = False
        self.resizes = {"increase": 0, "decrease": 0}
        #: Called with (old, new) capacity on every resize (the Cacher feeds its metrics from it).
        self.on_resize: Callable[[int, int], None] | None = None

    def __len__(self) -> int:
        return self.end - self.start

    def reset(self, list_rv: int) -> None:
        """Forget every event (after a relist at ``list_rv``); indices keep growing."""
        for i in range(self.start, self.end):
            self._ring[i % self.capacity] = None
        self.start = self.end
        self.list_rv = list_rv
        self.evicted_since_relist = False

    def append(self, event: CacheEvent) -> None:
        """Add the newest event, resizing or evicting the oldest as the policy says."""
        if len(self) == self.capacity:
            self._resize(event.record_time)
        if len(self) == self.capacity:
            self._ring[self.start % self.capacity] = None
            self.start += 1
            self.evicted_since_relist = True
        self._ring[self.end % self.capacity] = event
        self.end += 1

    def _at(self, index: int) -> CacheEvent:
        ev = self._ring[index % self.capacity]
        assert ev is not None
        return ev

    def _resize(self, now: float) -> None:
        oldest = self._at(self.start).record_time
        if now - oldest < self.fresh_duration and self.capacity < self.upper:
            self._set_capacity(min(self.capacity * 2, self.upper))
            self.resizes["increase"] += 1
            return
        quarter = self._at(self.end - self.capacity // 4).record_time
        if now - quarter > self.fresh_duration and self.capacity > self.lower:
            new = max(self.capacity // 2, self.lower)
            self.start = self.end - new  # the oldest events fall out of the window
            self.evicted_since_relist = True
            self._set_capacity(new)
            self.resizes["decrease"] += 1

    def _set_capacity(self, capacity: int) -> None:
        if self.on_resize is not None:
            self.on_resize(self.capacity, capacity)
        events = [self._at(i) for i in range(max(self.start, self.end - capacity), self.end)]
        self.capacity = capacity
        self._ring = [None] * capacity
        self.start = self.end - len(events)
        for i, ev in zip(range(self.start, self.end), events):
            self._ring[i % capacity] = ev

    def oldest_servable_rv(self) -> int:
        """The smallest resource version a watch may start from (it then gets every later event)."""
        if not self.evicted_since_relist and self.list_rv > 0:
            return self.list_rv
        if len(self):
            return self._at(self.start).resource_version - 1
        if self.list_rv > 0:
            return self.list_rv
        raise InternalError("watch cache isn't correctly initialized")

    def can_serve(self, rv: int) -> bool:
        """True while the window still holds every event after ``rv`` (a watch from ``rv`` would
        not get 410)."""
        try:
            return rv >= self.oldest_servable_rv()
        except InternalError:
            return False

    def index_after(self, rv: int) -> int:
        """Absolute index of the first event with resource version > ``rv`` (``end`` if none): a
        cursor that costs nothing to keep. Raises ExpiredError (410) when ``rv`` is older than the
        window ("too old resource version")."""
        oldest = self.oldest_servable_rv()
        if rv < oldest:
            raise ExpiredError(f"too old resource version: {rv} ({oldest})")
        return self.start + bisect.bisect_right(_Revisions(self), rv)

    def event_at(self, index: int) -> CacheEvent | None:
        """The event at absolute ``index``, or None once it was evicted or not yet appended."""
        if self.start <= index < self.end:
            return self._at(index)
        return None

    @property
    def newest_rv(self) -> int:
        """Resource version of the newest event (the list revision when there is none)."""
        return self._at(self.end - 1).resource_version if len(self) else self.list_rv

    def events_since(self, rv: int) -> list[CacheEvent]:
        """Events with resource version > ``rv``, oldest first: references to the shared events
        (O(events in the interval) pointers, never copies of objects).

        Raises ExpiredError (410) when ``rv`` is older than the window ("too old resource version").
        """
        first = self.index_after(rv)
        return [self._at(i) for i in range(first, self.end)]


class _Revisions:
    """A read-only sequence view of the history's resource versions, so bisect needs no copy."""

    __slots__ = ("_h",)

    def __init__(self, history: EventHistory) -> None:
        self._h = history

    def __len__(self) -> int:
        return len(self._h)

    def __getitem__(self, i: int) -> int:
        return self._h._at(self._h.start + i).resource_version
