"""The cache's one upstream list+watch.

Mirrors client-go tools/cache/reflector.go as the Cacher drives it (cacher.go startCaching,
lister_watcher.go): a consistent, paged LIST of the whole resource (pages of 10,000), then ONE watch
from the list revision with progress notifications; every batch of events is applied to the watch cache
and handed to the dispatcher as one item. A watch that ends cleanly is re-opened from the last applied
revision; other errors are retried from the last revision for up to 30 s; 410 Expired, or errors that
persist, re-initialise the cache: watchers are ended and the resource is listed again.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

import anyio

from cacher.history import CacheEvent
from cacher.watch_cache import WatchCache
from storage.errors import InternalError, StorageError, error_from_status, is_expired
from storage.interface import INITIAL_EVENTS_END_ANNOTATION, EventType, ListOptions, Storage

log = logging.getLogger(__name__)


def _is_initial_events_end(ev) -> bool:
    annotations = (ev.object.get("metadata") or {}).get("annotations") or {}
    return annotations.get(INITIAL_EVENTS_END_ANNOTATION) == "true"

#: Reflector page size for the cache's relists (cacher.go WatchListPageSize).
LIST_PAGE_SIZE = 10000
#: How long non-410 watch errors are retried from the last revision before re-initialising.
MAX_INTERNAL_ERROR_RETRY = 30.0


class Reflector:
    """Feeds ``watch_cache`` from ``storage`` and ``send``s batches to the dispatcher.

    on_ready(): called after each successful list (the cache is Ready);
    on_reinit(error): called when the cache must be rebuilt (it is Pending again).
    """

    def __init__(self, storage: Storage, watch_cache: WatchCache,
                 send: Callable[[list[CacheEvent] | int], Awaitable[None]],
                 on_ready: Callable[[], None], on_reinit: Callable[[BaseException], None],
                 page_size: int = LIST_PAGE_SIZE, backoff: tuple[float, float] = (0.8, 30.0)) -> None:
        self.storage = storage
        self.cache = watch_cache
        self.send = send
        self.on_ready = on_ready
        self.on_reinit = on_reinit
        self.page_size = page_size
        self.backoff = backoff
        self.prefix = storage.resource.prefix
        self.lists = 0
        self.watches_opened = 0
        self.trust_progress: Callable[[], bool] = lambda: True
        self.on_unhealthy: Callable[[BaseException], None] = lambda exc: None
        self.on_healthy: Callable[[], None] = lambda: None
        self.use_watch_list = False  # switched on when a LIST cannot keep up with compaction
        self._watch_scope: anyio.CancelScope | None = None
        self._restart_pending = False
        self.watch_restarts = 0
        self._watch_applied = 0
        self._first_watch_expired = False
        self._scope: anyio.CancelScope | None = None  # around the current list_and_watch

    async def run(self) -> None:
        """List and watch forever; each failure re-initialises after a backoff (0.8 s doubling to 30 s)."""
        delay = self.backoff[0]
        while True:
            started = time.monotonic()
            try:
                with anyio.CancelScope() as self._scope:
                    await self.list_and_watch()
            except StorageError as exc:
                log.warning("cacher %s: list/watch failed, re-initialising: %s", self.prefix, exc)
                self.on_reinit(exc)
            if self._scope.cancelled_caught:
                continue  # relist() asked for a fresh list now: no backoff
            if time.monotonic() - started > 120:
                delay = self.backoff[0]  # a long healthy run resets the backoff, as client-go does
            await anyio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    def relist(self) -> None:
        """Abandon the current list/watch so ``run`` lists again at once (the caller has already
        re-initialised the cache, e.g. Cacher.reinitialize). No-op between attempts."""
        if self._scope is not None:
            self._scope.cancel()

    async def list_and_watch(self) -> None:
        """Initialise the cache, then watch until it must be rebuilt (then raises).

        Initialisation is a paged LIST and a watch from its revision; if that revision is compacted
        before the watch opens (a LIST slower than the backend's history, case MEM-2) or the LIST
        itself runs into compaction, later attempts use one watch-list stream instead (storage
        watch with send_initial_events), which has no gap between state and events to fall into.
        """
        if self.use_watch_list:
            await self._watch_list_sync()
            return
        try:
            items, rv = await self._list()
        except StorageError as exc:
            if is_expired(exc):
                self.use_watch_list = True
            raise
        self.cache.replace(items, rv)
        self.lists += 1
        self.on_ready()
        await self.send(rv)
        try:
            await self._watch_loop(first=True)
        except StorageError as exc:
            if is_expired(exc) and self._first_watch_expired:
                self.use_watch_list = True
            raise

    async def _watch_loop(self, first: bool = False) -> None:
        """Watch from the cache's revision, re-watching after clean ends and transient errors.

        Non-410 errors are retried from the last revision with backoff (0.1 s doubling to 2 s) for up
        to 30 s, as the Cacher's reflector does; after the second failure in a row the cache reports
        itself not ready (``on_unhealthy``) until a watch holds again (case RST-5).
        """
        failing_since: float | None = None
        failures, delay = 0, 0.1
        self._first_watch_expired = False
        while True:
            try:
                await self._watch(self.cache.resource_version)
                failing_since, failures, delay = None, 0, 0.1
            except StorageError as exc:
                if is_expired(exc):
                    self._first_watch_expired = first and self._watch_applied == 0
                    raise
                now = time.monotonic()
                failing_since = failing_since or now
                failures += 1
                if failures >= 2:
                    self.on_unhealthy(exc)
                if now - failing_since > MAX_INTERNAL_ERROR_RETRY:
                    raise
                log.info("cacher %s: watch error, re-watching from %d: %s",
                         self.prefix, self.cache.resource_version, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
            first = False

    def restart_watch(self) -> None:
        """Drop the current upstream watch and re-open it from the last applied revision (used when
        the stream looks stalled, case CON-1)."""
        self.watch_restarts += 1
        if self._watch_scope is not None and not self._watch_scope.cancel_called:
            self._watch_scope.cancel()
        else:
            self._restart_pending = True

    async def _watch_list_sync(self) -> None:
        """Initialise from one storage watch-list stream: ADDED events, the end bookmark, then the
        same stream's live events (client-go reflector's watch-list mode, KEP-3157)."""
        opts = ListOptions(recursive=True, send_initial_events=True, resource_version_match="NotOlderThan",
                           allow_watch_bookmarks=True, progress_notify=True)
        self.watches_opened += 1
        items: list[dict[str, Any]] = []
        async with self.storage.watch(self.prefix, opts) as watch:
            while True:
                batch = await watch.next_batch()
                if not batch:
                    raise InternalError("watch-list stream ended before its initial events did")
                for i, ev in enumerate(batch):
                    if ev.type is EventType.ERROR:
                        raise error_from_status(ev.object)
                    if ev.type is EventType.ADDED:
                        items.append(ev.object)
                    elif ev.type is EventType.BOOKMARK and _is_initial_events_end(ev):
                        self.cache.replace(items, ev.resource_version)
                        self.lists += 1
                        self.on_ready()
                        await self.send(ev.resource_version)
                        await self._apply(batch[i + 1:])
                        await self._follow(watch)
                        await self._watch_loop()
                        return

    async def _follow(self, watch) -> None:
        while True:
            batch = await self._next(watch)
            if not batch:
                return
            await self._apply(batch)

    async def _list(self) -> tuple[list[dict[str, Any]], int]:
        items: list[dict[str, Any]] = []
        token, rv = "", 0
        while True:
            page = await self.storage.get_list(self.prefix, ListOptions(
                recursive=True, limit=self.page_size, continue_token=token))
            items.extend(page.items)
            rv = rv or page.revision
            token = page.continue_token
            if not token:
                return items, rv

    async def _watch(self, from_rv: int) -> None:
        opts = ListOptions(resource_version=str(from_rv), recursive=True, progress_notify=True,
                           allow_watch_bookmarks=True)
        self.watches_opened += 1
        self._watch_applied = 0
        async with self.storage.watch(self.prefix, opts) as watch:
            first: list | None | bool = False
            # A watch that opens and stays quiet for a second is healthy (there may be no events).
            with anyio.move_on_after(1.0):
                first = await self._next(watch)
            if first is not False:
                if not first:
                    return
                await self._apply(first)
            self.on_healthy()
            await self._follow(watch)

    async def _next(self, watch) -> list | None:
        """The next batch; None when ``restart_watch`` asked to drop this stream. Only the wait is
        cancellable: a batch is always applied to the cache and handed to the dispatcher whole."""
        if self._restart_pending:
            self._restart_pending = False
            return None
        with anyio.CancelScope() as self._watch_scope:
            return await watch.next_batch()
        self._watch_scope = None
        return None

    async def _apply(self, batch: list) -> None:
        events: list[CacheEvent] = []
        progress = 0
        for ev in batch:
            if ev.type is EventType.ERROR:
                if events:
                    await self.send(events)
                raise error_from_status(ev.object)
            if ev.type is EventType.BOOKMARK:
                rv = ev.resource_version
                # Only a backend that orders progress notifications with events may move the cache
                # forward without an event (etcd #15220, case CON-3); others could run ahead of it.
                if self.trust_progress() and self.cache.update_resource_version(rv):
                    progress = rv
                continue
            applied = self.cache.apply(ev.type, ev.object)
            if applied is not None:
                events.append(applied)
                self._watch_applied += 1
        if events:
            await self.send(events)
        if progress and progress >= self.cache.resource_version:
            await self.send(progress)
