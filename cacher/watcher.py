"""One consumer's watch on the cache.

Mirrors k8s.io/apiserver pkg/storage/cacher/cache_watcher.go: the watcher filters each CacheEvent by
key and predicate on the precomputed attributes (both current and previous, so an object that starts or
stops matching becomes ADDED or DELETED for this watcher), drops events it already covered with its
initial state (resource version <= the last one it sent), and buffers a bounded number of events.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Mapping

from cacher.history import CacheEvent
from storage.interface import EventType, ListOptions, WatchEvent
from storage.watch import BufferedWatch


class TerminationReason(str, enum.Enum):
    """Why a cache watcher ended; a client tells a normal end from a forced one by this."""

    NONE = ""
    STOPPED = "stopped"  # the consumer stopped it
    TOO_SLOW = "too slow"  # its buffer stayed full past the dispatch budget
    REINITIALIZED = "cache re-initialized"  # the upstream failed and the cache relisted
    CACHE_STOPPED = "cacher stopped"  # the Cacher was closed
    EXPIRED = "too old resource version"  # lagging, and the history moved past its next event (410)


class CacheWatcher(BufferedWatch):
    """A BufferedWatch fed by the dispatcher.

    key: the watched key (a prefix ending in "/" when recursive); opts: the watch options (predicate,
    bookmarks); capacity: buffer size in events; trigger_value: the value of the resource's trigger
    field this watcher is pinned to (None = not pinned); scope: (namespace, name) it is pinned to.
    """

    def __init__(self, key: str, opts: ListOptions, capacity: int, *, trigger_value: str | None,
                 scope: tuple[str, str], on_start: Callable[[], Any], on_stop: Callable[[], Any]) -> None:
        super().__init__(capacity, on_start=on_start, on_stop=on_stop, timeout_seconds=opts.timeout_seconds)
        self.key = key
        self.recursive = opts.recursive
        self.opts = opts
        self.predicate = opts.predicate
        self._match_all = self.predicate.empty()
        self.trigger_value = trigger_value
        self.scope = scope
        self.sent_rv = 0  # highest resource version this watcher's stream has covered
        self.bookmark_after_rv = 0
        self.next_bookmark_time = float("inf")
        self.termination = TerminationReason.NONE
        # Lagging path (dispatcher.py): True while the watcher is off the fast path and fed from
        # the history; ``catch_up`` (set by the dispatcher) refills it when the consumer drains.
        self.lagging = False
        self.catch_up: Callable[["CacheWatcher"], None] | None = None

    def next_bookmark_after(self, now: float, frequency: float) -> float:
        """When this watcher's next periodic bookmark is due: ``frequency`` seconds from ``now``, but
        2 s before its deadline so a client can resume from it (cache_watcher.go nextBookmarkTime);
        infinity once that moment has passed."""
        due = now + frequency
        if self.deadline is not None:
            due = min(due, self.deadline - 2.0)
        return due if due > now else float("inf")

    def _key_matches(self, key: str) -> bool:
        return key.startswith(self.key) if self.recursive else key == self.key

    def _passes(self, key: str, labels: Mapping[str, str] | None, fields: Mapping[str, str] | None) -> bool:
        if not self._key_matches(key):
            return False
        return self._match_all or self.predicate.matches_attrs(labels or {}, fields or {})

    def convert(self, event: CacheEvent) -> WatchEvent | None:
        """The event this watcher should see for ``event``, or None (cache_watcher convertToWatchEvent)."""
        if event.resource_version <= self.sent_rv:
            return None
        cur = event.type is not EventType.DELETED and self._passes(event.key, event.labels, event.fields)
        if event.type is EventType.DELETED:
            return event.watch_event(EventType.DELETED) if self._passes(
                event.key, event.labels, event.fields) else None
        prev = event.prev_object is not None and self._passes(event.key, event.prev_labels, event.prev_fields)
        if cur:
            return event.watch_event(EventType.MODIFIED if prev else EventType.ADDED)
        if prev:
            return event.watch_event(EventType.DELETED)
        return None

    def try_add(self, event: CacheEvent) -> bool:
        """Offer ``event`` without blocking. False only when it is relevant and the buffer is full."""
        out = self.convert(event)
        if out is None:
            return True
        if not self.offer(out):
            return False
        self.sent_rv = event.resource_version
        return True

    async def add_waiting(self, event: CacheEvent) -> bool:
        """Add ``event``, waiting for room (the caller bounds the wait). False if the watch ended."""
        out = self.convert(event)
        if out is None:
            return True
        if await self.put([out]):
            self.sent_rv = event.resource_version
            return True
        return False

    async def next_batch(self) -> list[WatchEvent]:
        """As BufferedWatch.next_batch; a lagging watcher is refilled from the history first when
        its buffer is empty, and again right after the consumer drained it (so catching up runs at
        the consumer's pace, without waiting for the dispatcher's resync tick)."""
        if self.lagging and not self._buf and self.catch_up is not None:
            self.catch_up(self)
        batch = await super().next_batch()
        if self.lagging and self.catch_up is not None:
            self.catch_up(self)
        return batch

    def expire(self, error: Exception) -> None:
        """End a lagging stream whose next event has left the history: the events already buffered
        (contiguous, nothing skipped), then ONE ERROR event (410 Expired), then the end."""
        if self.termination is TerminationReason.NONE:
            self.termination = TerminationReason.EXPIRED
        self.lagging = False
        self.finish(error)  # type: ignore[arg-type]

    def terminate(self, reason: TerminationReason) -> None:
        """End the stream from the cache side without an ERROR event (as Kubernetes closes it); the
        consumer sees the end, and ``termination`` says why."""
        if self.termination is TerminationReason.NONE:
            self.termination = reason
        self.finish()
