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
from storage.errors import StorageError, error_from_status, is_expired
from storage.interface import EventType, ListOptions, Storage

log = logging.getLogger(__name__)

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
        """One list followed by watches until the cache must be rebuilt (then raises)."""
        items, rv = await self._list()
        self.cache.replace(items, rv)
        self.lists += 1
        self.on_ready()
        await self.send(rv)
        failing_since: float | None = None
        while True:
            try:
                await self._watch(self.cache.resource_version)
                failing_since = None
            except StorageError as exc:
                if is_expired(exc):
                    raise
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > MAX_INTERNAL_ERROR_RETRY:
                    raise
                log.info("cacher %s: watch error, re-watching from %d: %s",
                         self.prefix, self.cache.resource_version, exc)
                await anyio.sleep(0.1)

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
        async with self.storage.watch(self.prefix, opts) as watch:
            while True:
                batch = await watch.next_batch()
                if not batch:
                    return
                await self._apply(batch)

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
        if events:
            await self.send(events)
        if progress and progress >= self.cache.resource_version:
            await self.send(progress)
