"""The watch cache: store + event history + the cache's resource version + bounded freshness waits.

Mirrors k8s.io/apiserver pkg/storage/cacher/watch_cache.go. One writer (the reflector) applies events
and bookmarks in revision order; readers wait (bounded, 3 s by default) until the cache has reached a
requested resource version.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import anyio

from cacher.history import CacheEvent, EventHistory
from cacher.store import CacheStore, Element
from storage.errors import StorageError, TooLargeResourceVersionError
from storage.interface import EventType, Resource
from storage.versioner import object_resource_version

_log = logging.getLogger(__name__)

#: kube-apiserver's blockTimeout: how long a read waits for the cache to become fresh enough.
DEFAULT_FRESHNESS_TIMEOUT = 3.0


class WatchCache:
    """State of one resource's cache.

    resource: supplies key_for and attrs; history: the EventHistory (default bounds);
    clock: seconds source stamped on events as their record time.
    """

    def __init__(self, resource: Resource, history: EventHistory | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resource = resource
        self.store = CacheStore(resource.index_fields)
        self.history = history if history is not None else EventHistory(clock=clock)
        self.clock = clock
        self.resource_version = 0
        self._waiters: list[tuple[int, anyio.Event]] = []

    # ---- writer side (the reflector) -------------------------------------------------------------
    def replace(self, objects: list[dict[str, Any]], list_rv: int) -> None:
        """Replace the content with a fresh list taken at ``list_rv`` and reset the history."""
        elems = []
        for obj in objects:
            try:
                elems.append(self._element(obj))
            except StorageError as exc:  # see apply(): unusable objects are skipped, not fatal
                _log.warning("watch cache %s: skipping listed object: %s", self.resource.prefix, exc)
        self.store.replace(elems)
        self.history.reset(list_rv)
        self._advance(list_rv, force=True)

    def apply(self, kind: EventType, obj: dict[str, Any]) -> CacheEvent | None:
        """Apply one upstream ADDED/MODIFIED/DELETED event; returns the CacheEvent (None if stale).

        Events at or below the cache's resource version are ignored: the upstream stream never
        legitimately repeats a revision, and a duplicate must not move the cache backwards.
        """
        rv = object_resource_version(obj)
        if rv <= self.resource_version:
            return None
        try:
            key = self.resource.key_for(obj)
        except StorageError as exc:
            # Written around this library (straight into etcd) without a usable name: it cannot be
            # filed by key, and failing the whole upstream watch over it would take the cache down.
            _log.warning("watch cache %s: skipping object at revision %d: %s", self.resource.prefix, rv, exc)
            return None
        labels, fields = self.resource.attrs(obj)
        prev = self.store.get(key)
        if kind is EventType.DELETED:
            self.store.delete(key)
        else:
            self.store.upsert(Element(key, obj, labels, fields, rv))
            if prev is None:
                kind = EventType.ADDED  # the cache had no object: whatever upstream says, it's new
        event = CacheEvent(kind, key, obj, labels, fields,
                           prev.object if prev else None, prev.labels if prev else None,
                           prev.fields if prev else None, rv, self.clock())
        self.history.append(event)
        self._advance(rv)
        return event

    def update_resource_version(self, rv: int) -> bool:
        """Advance to ``rv`` on a progress notification; never moves backwards. True if it advanced."""
        if rv <= self.resource_version:
            return False
        self._advance(rv)
        return True

    def _advance(self, rv: int, force: bool = False) -> None:
        if rv > self.resource_version or force:
            self.resource_version = rv
        if self._waiters:
            still = []
            for want, ev in self._waiters:
                if want <= self.resource_version:
                    ev.set()
                else:
                    still.append((want, ev))
            self._waiters = still

    def _element(self, obj: dict[str, Any]) -> Element:
        labels, fields = self.resource.attrs(obj)
        return Element(self.resource.key_for(obj), obj, labels, fields, object_resource_version(obj))

    # ---- reader side -----------------------------------------------------------------------------
    async def wait_until_fresh(self, rv: int, timeout: float = DEFAULT_FRESHNESS_TIMEOUT,
                               on_wait: Callable[[], Any] | None = None) -> None:
        """Return once the cache's resource version is >= ``rv`` (immediately for rv 0).

        Raises TooLargeResourceVersionError (504, retry after 1 s) after ``timeout`` seconds, like
        watchCache.waitUntilFreshAndBlock. ``on_wait`` is called when a wait actually starts.
        """
        if rv <= self.resource_version:
            return
        ev = anyio.Event()
        self._waiters.append((rv, ev))
        if on_wait is not None:
            on_wait()
        with anyio.move_on_after(timeout):
            await ev.wait()
        if rv > self.resource_version:
            self._waiters = [(w, e) for w, e in self._waiters if e is not ev]
            raise TooLargeResourceVersionError(rv, self.resource_version, retry_after_seconds=1)

    def can_serve_exact(self, rv: int) -> bool:
        """True if the state at revision ``rv`` can be rebuilt from the store and the history:
        ``rv`` is neither ahead of the cache nor older than the history window."""
        if rv > self.resource_version:
            return False
        try:
            return rv >= self.history.oldest_servable_rv()
        except StorageError:
            return False

    def elements_at(self, rv: int, prefix: str, start: str = "") -> Iterator[Element]:
        """Elements under ``prefix`` (from key ``start`` on) as they were at revision ``rv``, in key
        order, by rolling the current store back through the events after ``rv`` (KEP-4988 serves
        the same reads from B-tree snapshots; this needs no copy per event).

        The first event after ``rv`` for a key carries the key's state at ``rv`` as its previous
        object (None: the key did not exist). Raises ExpiredError (410) if ``rv`` is older than the
        history window; callers check ``can_serve_exact`` first.
        """
        overrides: dict[str, Element | None] = {}
        for ev in self.history.events_since(rv):
            if ev.key in overrides or not ev.key.startswith(prefix) or ev.key < start:
                continue
            overrides[ev.key] = (None if ev.prev_object is None else Element(
                ev.key, ev.prev_object, ev.prev_labels or {}, ev.prev_fields or {},
                object_resource_version(ev.prev_object)))
        pending = sorted(k for k, e in overrides.items() if e is not None and self.store.get(k) is None)
        i = 0
        for elem in self.store.scan(prefix, start):
            while i < len(pending) and pending[i] < elem.key:
                yield overrides[pending[i]]  # type: ignore[misc]
                i += 1
            if elem.key in overrides:
                old = overrides[elem.key]
                if old is not None:
                    yield old
            else:
                yield elem
        for k in pending[i:]:
            yield overrides[k]  # type: ignore[misc]

    @property
    def waiting(self) -> int:
        """How many reads are waiting for freshness."""
        return len(self._waiters)
