"""Watch stream plumbing shared by every backend and the cache.

``BufferedWatch`` is one consumer's stream: a bounded buffer of WatchEvents filled by a producer (a
backend's watch thread, the memory store, the cache's dispatcher) and drained by the consumer in
batches. It mirrors the result channel of k8s etcd3 ``watchChan`` and cacher ``cacheWatcher``:
bounded, stoppable from either side, and ending with at most one ERROR event carrying a Status.

Batch hand-off matters for speed: waking the consumer once per batch costs one event-loop round trip,
per event it would cost one per event (see reference python-etcd-and-peers.md 5.1).
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, Iterable

import anyio

from storage.errors import StorageError
from storage.interface import EventType, WatchEvent


class BufferedWatch:
    """A watch stream backed by a bounded buffer.

    capacity: events the buffer holds before ``offer`` fails / ``put`` waits (>= 1).
    timeout_seconds: the watch ends normally this long after ``start()`` (None = never).
    on_start: awaited by ``start()`` (e.g. to open the upstream stream); its typed errors propagate.
    on_stop: called once when the watch stops, from whichever side stops it (frees resources).

    Producer side: ``offer(events)`` (never blocks; False if they do not fit), ``put(events)`` (waits
    for room; False once stopped), ``finish(error)`` (ends the stream; an error becomes one ERROR event).
    Consumer side: ``async for event in watch``, ``next_batch()``, ``stop()`` (idempotent).
    """

    def __init__(self, capacity: int = 100, *, on_start: Callable[[], Awaitable[None]] | None = None,
                 on_stop: Callable[[], Any] | None = None, timeout_seconds: float | None = None) -> None:
        self.capacity = max(1, capacity)
        # Lists, not deques: an idle watch then costs tens of bytes, not ~700 per empty deque, and a
        # batch is handed over by swapping the list instead of copying it.
        self._buf: list[WatchEvent] = []
        self._readable: anyio.Event | None = None
        self._writable: anyio.Event | None = None
        self._finished = False
        self._stopped = False
        self._on_start = on_start
        self._on_stop = on_stop
        self._pending: list[WatchEvent] = []
        self._pos = 0  # next index in _pending for per-event iteration
        self.error: StorageError | None = None
        self.timeout_seconds = timeout_seconds
        self._started = False
        self.deadline: float | None = None  # time.monotonic() at which the watch ends normally

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> "BufferedWatch":
        """Start the producer; raises what ``on_start`` raises (the watch is stopped then).
        Idempotent; ``next_batch`` on a watch nobody started starts it."""
        if self._started:
            return self
        self._started = True
        if self.timeout_seconds:
            self.deadline = time.monotonic() + self.timeout_seconds
        if self._on_start is not None:
            try:
                await self._on_start()
            except BaseException:
                await self.stop()
                raise
        return self

    async def __aenter__(self) -> "BufferedWatch":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop the watch (consumer side). Idempotent; pending events are dropped."""
        self._stop_now()

    def _stop_now(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._finished = True
        self._buf = []
        self._pending, self._pos = [], 0
        self._wake_reader()
        self._wake_writer()
        if self._on_stop is not None:
            self._on_stop()

    @property
    def stopped(self) -> bool:
        """True once the consumer stopped the watch."""
        return self._stopped

    @property
    def finished(self) -> bool:
        """True once the producer ended the stream or the consumer stopped it."""
        return self._finished

    # ---- producer side ---------------------------------------------------------------------------
    def free(self) -> int:
        """Room left in the buffer, in events."""
        return self.capacity - len(self._buf)

    def offer(self, events: Iterable[WatchEvent] | WatchEvent) -> bool:
        """Append events if all fit; never blocks. Returns False (nothing appended) if they don't fit
        or the stream has ended."""
        if self._finished:
            return False
        if isinstance(events, WatchEvent):
            if len(self._buf) >= self.capacity:
                return False
            self._buf.append(events)
        else:
            events = list(events)
            if len(self._buf) + len(events) > self.capacity:
                return False
            self._buf.extend(events)
        self._wake_reader()
        return True

    def preload(self, event: WatchEvent) -> None:
        """Append an event regardless of capacity: for the initial state of a watch, which is already
        materialised and must be queued before the consumer starts reading."""
        if not self._finished:
            self._buf.append(event)
            self._wake_reader()

    async def put(self, events: Iterable[WatchEvent]) -> bool:
        """Append events, waiting for room as needed (backpressure). False if the watch ended first."""
        for event in events:
            while len(self._buf) >= self.capacity:
                if self._finished:
                    return False
                self._writable = self._writable or anyio.Event()
                await self._writable.wait()
            if self._finished:
                return False
            self._buf.append(event)
            self._wake_reader()
        return not self._finished

    def finish(self, error: StorageError | None = None) -> None:
        """End the stream (producer side). With ``error``, the consumer gets one ERROR event with its
        Status after the buffered events, then the end. Idempotent."""
        if self._finished:
            return
        if error is not None:
            self.error = error
            self._buf.append(WatchEvent(EventType.ERROR, error.to_status()))
        self._finished = True
        self._wake_reader()
        self._wake_writer()

    # ---- consumer side ---------------------------------------------------------------------------
    async def next_batch(self) -> list[WatchEvent]:
        """Wait for and return all buffered events (non-empty), or [] once the watch has ended."""
        if not self._started:
            await self.start()
        while not self._buf:
            if self._finished:
                if not self._stopped:
                    self._stop_now()
                return []
            self._readable = self._readable or anyio.Event()
            if self.deadline is None:
                await self._readable.wait()
                continue
            with anyio.move_on_after(self.deadline - time.monotonic()):
                await self._readable.wait()
            if not self._buf and time.monotonic() >= self.deadline:
                self.finish()  # the watch's timeout: a normal end, as timeoutSeconds is in Kubernetes
        batch, self._buf = self._buf, []
        self._wake_writer()
        return batch

    def __aiter__(self) -> "BufferedWatch":
        return self

    async def __anext__(self) -> WatchEvent:
        if self._pos >= len(self._pending):
            batch = await self.next_batch()
            if not batch:
                raise StopAsyncIteration
            self._pending, self._pos = batch, 0
        self._pos += 1
        return self._pending[self._pos - 1]

    def _wake_reader(self) -> None:
        if self._readable is not None:
            self._readable.set()
            self._readable = None

    def _wake_writer(self) -> None:
        if self._writable is not None:
            self._writable.set()
            self._writable = None


def filter_event(kind: EventType, obj: dict[str, Any], prev: dict[str, Any] | None,
                 matches: Callable[[dict[str, Any]], bool] | None) -> WatchEvent | None:
    """Turn one storage change into the event a watcher with predicate ``matches`` should see.

    ``kind`` is ADDED/MODIFIED/DELETED; ``obj`` is the new object (for DELETED: the previous object
    already stamped with the deletion revision); ``prev`` is the object before the change (None on
    create). ``matches`` None means "everything". Mirrors etcd3 watcher.go transform and cacher
    cache_watcher.go convertToWatchEvent: cur&prev -> MODIFIED, cur&!prev -> ADDED, !cur&prev ->
    DELETED carrying the previous object at the event's revision, neither -> None.
    """
    if matches is None:
        return WatchEvent(kind, obj)
    if kind is EventType.DELETED:
        return WatchEvent(kind, obj) if matches(obj) else None
    cur_ok = matches(obj)
    prev_ok = prev is not None and matches(prev)
    if cur_ok:
        return WatchEvent(EventType.MODIFIED if prev_ok else EventType.ADDED, obj)
    if prev_ok:
        from storage.versioner import with_resource_version
        rv = int(obj["metadata"]["resourceVersion"])
        return WatchEvent(EventType.DELETED, with_resource_version(prev, rv))
    return None
