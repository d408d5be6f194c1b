"""Cacher: a Storage that wraps a Storage and serves GET, LIST and WATCH from memory.

Mirrors k8s.io/apiserver pkg/storage/cacher (cacher.go + delegator.go): writes go to the wrapped
storage (with the cached object as a hint); reads with resource version "0" or N (not older than) and
every watch are served from the watch cache, fed by ONE upstream watch per resource; reads the cache
cannot answer exactly (consistent reads with resource version unset, Exact, continue pages, the legacy
limit+N rule) are delegated to the storage, as the Kubernetes delegation table says.

    async with Cacher(storage) as cacher:
        await cacher.wait_ready()
        page = await cacher.get_list("/pods", ListOptions(resource_version="0", recursive=True))
        async with cacher.watch("/pods", ListOptions(resource_version=page.resource_version,
                                                     recursive=True)) as w:
            async for event in w: ...

Objects returned from the cache are shared with the cache and every watcher: treat them as read-only.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Awaitable, Callable

import anyio

from cacher.dispatcher import Dispatcher, TimeBudget
from cacher.consistency import DEFAULT_INTERVAL as CONSISTENCY_CHECK_INTERVAL, ConsistencyChecker
from cacher.history import EventHistory
from cacher.metrics import CacherMetrics
from cacher.progress import ProgressRequester, detect_consistent_read_support
from cacher.reflector import LIST_PAGE_SIZE, Reflector
from cacher.watch_cache import DEFAULT_FRESHNESS_TIMEOUT, WatchCache
from cacher.watcher import CacheWatcher, TerminationReason
from storage.continue_token import encode_continue
from storage.errors import (ExpiredError, NotFoundError, StorageClosedError, StorageError,
                            TooLargeResourceVersionError, TooManyRequestsError)
from storage.interface import (INITIAL_EVENTS_END_ANNOTATION, EventType, GetOptions, ListOptions,
                               ListResult, Preconditions, Resource, Stats, Storage,
                               UpdateFunc, ValidateDeletionFunc, WatchEvent, validate_list_options,
                               validate_watch_options)
from storage.versioner import parse_resource_version

PENDING, READY, STOPPED = "pending", "ready", "stopped"
_log = logging.getLogger(__name__)


class Cacher:
    """A watch cache for one resource, itself a Storage and an async context manager.

    storage: the wrapped Storage (its ``resource`` configures keys, attrs, trigger and indexes).
    freshness_timeout: seconds a read waits for the cache to reach its resource version (3).
    history_lower / history_upper / fresh_duration: history window bounds (events) and target (s).
    watcher_capacity: per-watcher buffer in events; default 100 for watchers pinned to the trigger
        value and 1000 otherwise (Kubernetes uses 10 / 1000; Python's coarser scheduling needs more).
    bookmark_frequency: seconds between bookmarks per watcher (60).
    page_size: reflector list page (10,000).
    progress_interval: seconds between progress requests while reads wait for freshness (0.1).
    stall_check_interval: seconds between checks for an upstream watch that is open but silent
        while storage moves on (3; None disables); such a watch is re-opened (case CON-1).
    catch_up_lagging: a watcher whose buffer is full is moved aside and caught up from the history
        (ended with 410 only once the history moved past it) instead of sharing the dispatch time
        budget and being terminated as too slow (True; False = Kubernetes behaviour). See dispatcher.py.
    consistent_reads_from_cache: whether the backend orders progress notifications with events (etcd
        3.4.31+ / 3.5.13+, the memory backend); None (default) detects it from the server version,
        as Kubernetes does. Only then are progress notifications trusted to advance the cache, progress
        requested while reads wait, and LISTs with resource version "" served from the cache.
    """

    def __init__(self, storage: Storage, *, freshness_timeout: float = DEFAULT_FRESHNESS_TIMEOUT,
                 history_lower: int = 100, history_upper: int = 100 * 1024, fresh_duration: float = 75.0,
                 watcher_capacity: int | None = None, bookmark_frequency: float = 60.0,
                 page_size: int = LIST_PAGE_SIZE, progress_interval: float = 0.1,
                 dispatch_budget: TimeBudget | None = None, catch_up_lagging: bool = True,
                 stall_check_interval: float | None = 3.0,
                 consistent_reads_from_cache: bool | None = None,
                 metrics_registry: Any = None, consistency_checks: bool = True,
                 consistency_check_interval: float = CONSISTENCY_CHECK_INTERVAL) -> None:
        self.storage = storage
        self.resource: Resource = storage.resource
        self.freshness_timeout = freshness_timeout
        self.watcher_capacity = watcher_capacity
        self.progress_interval = progress_interval
        self.watch_cache = WatchCache(self.resource, EventHistory(history_lower, history_upper, fresh_duration))
        self.dispatcher = Dispatcher(self.resource.trigger_field, dispatch_budget,
                                     bookmark_frequency=bookmark_frequency,
                                     history=lambda: self.watch_cache.history,
                                     catch_up_lagging=catch_up_lagging)
        self._send, self._receive = anyio.create_memory_object_stream[Any](100)
        self.reflector = Reflector(storage, self.watch_cache, self._send.send, self._on_ready,
                                   self._on_reinit, page_size=page_size)
        self.reflector.trust_progress = lambda: bool(self.consistent_reads_from_cache)
        self.reflector.on_unhealthy = self._on_unhealthy
        self.reflector.on_healthy = self._on_healthy
        self.stall_check_interval = stall_check_interval
        self.progress = ProgressRequester(storage, lambda: self.watch_cache.waiting, progress_interval,
                                          enabled=lambda: bool(self.consistent_reads_from_cache))
        self.consistent_reads_from_cache = consistent_reads_from_cache
        self.consistent_reads = {"cache": 0, "fallback": 0, "delegated": 0}
        self.state = PENDING
        self._state_since = time.monotonic()
        self._ready_event = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        # Awaited between a watch's readiness check and its registration: lets tests re-initialise
        # the cache in that gap (case RST-1). A re-initialisation there is safe because the history
        # restarts at the new list revision, so an older requested revision gets 410, never a jump.
        self._after_ready_check: Callable[[], Awaitable[None]] | None = None
        # Item 12 metrics hooks (cacher/metrics.py) and the item 11 consistency checker.
        self.metrics = CacherMetrics(self.resource, metrics_registry)
        self.metrics.capacity.set(self.watch_cache.history.capacity)
        self.watch_cache.history.on_resize = self.metrics.record_capacity_change
        self.dispatcher.on_dispatched = self.metrics.events_dispatched.inc
        self.dispatcher.on_terminated = self._on_watcher_terminated
        self.reflector.send = self._ingest
        self._init_started = time.monotonic()
        self._list_index = ""
        self.consistency_checks = consistency_checks
        self.consistency_checker = ConsistencyChecker(self, consistency_check_interval)

    # ---- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> "Cacher":
        if self.consistent_reads_from_cache is None:
            self.consistent_reads_from_cache = await detect_consistent_read_support(self.storage)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self.reflector.run)
        self._tg.start_soon(self.dispatcher.run, self._receive)
        self._tg.start_soon(self.progress.run)
        if self.stall_check_interval:
            self._tg.start_soon(self._stall_watchdog)
        if self.consistency_checks:
            self._tg.start_soon(self.consistency_checker.run)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reflector, dispatcher and timers and end every watch. Idempotent.

        The wrapped storage is not closed: it belongs to the caller.
        """
        if self.state == STOPPED:
            return
        self._set_state(STOPPED)
        self.dispatcher.terminate_all(TerminationReason.CACHE_STOPPED)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._tg = None
        self._send.close()
        self._receive.close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the first list is in the cache. Raises TimeoutError after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            await self._ready_event.wait()

    @property
    def ready(self) -> bool:
        """True while the cache is initialised and fed."""
        return self.state == READY

    def _set_state(self, state: str) -> None:
        self.state, self._state_since = state, time.monotonic()

    def _on_ready(self) -> None:
        self.metrics.initializations.inc()
        self.metrics.init_events.inc(len(self.watch_cache.store))
        self.metrics.initialization_duration.observe(time.monotonic() - self._init_started)
        self.metrics.record_resource_version(self.watch_cache.resource_version)
        self._set_state(READY)
        self._ready_event.set()

    def _on_reinit(self, error: BaseException) -> None:
        if self.state == PENDING:
            self.metrics.initialization_errors.inc()  # the (re)list itself failed
        else:
            self._init_started = time.monotonic()
        self._set_state(PENDING)
        self._renew_ready_event()
        self.dispatcher.terminate_all(TerminationReason.REINITIALIZED)

    def _renew_ready_event(self) -> None:
        # Only a set event is replaced: callers already waiting on an unset one must be woken by
        # the next transition to ready, not left on an event nobody will set.
        if self._ready_event.is_set():
            self._ready_event = anyio.Event()

    def _on_unhealthy(self, error: BaseException) -> None:
        # The upstream watch keeps failing to (re)open: stop claiming freshness (watches get 429,
        # reads are delegated) but keep the cache and its watchers, who resume once it holds again.
        if self.state == READY:
            _log.warning("cacher %s: upstream watch failing, not ready until it holds: %s",
                        self.resource.prefix, error)
            self._set_state(PENDING)
            self._renew_ready_event()

    def _on_healthy(self) -> None:
        if self.state == PENDING:
            self._set_state(READY)
            self._ready_event.set()

    async def _stall_watchdog(self) -> None:
        """Case CON-1: a stream that stays open but delivers nothing. Every ``stall_check_interval``
        seconds, if storage's revision is ahead of the cache and progress requests cannot bring the
        cache there within the freshness timeout, re-open the upstream watch from the last applied
        revision. Only where progress notifications are trusted: elsewhere a quiet resource would
        look stalled."""
        while True:
            await anyio.sleep(self.stall_check_interval)
            if self.state != READY or not self.consistent_reads_from_cache:
                continue
            try:
                current = await self.storage.get_current_resource_version()
                await self.watch_cache.wait_until_fresh(current, self.freshness_timeout)
            except TooLargeResourceVersionError:
                _log.warning("cacher %s: upstream watch stalled at %d (storage at %d): re-watching",
                            self.resource.prefix, self.watch_cache.resource_version, current)
                self.reflector.restart_watch()
            except StorageError:
                continue

    def reinitialize(self, reason: str) -> None:
        """Throw the cache away and list again (used by the consistency checker on a mismatch).

        reason: logged. Every open watch ends with TerminationReason.REINITIALIZED, the cache is
        Pending (reads are delegated or 429 as during start-up) until the reflector, whose current
        list/watch is abandoned, has listed again. No-op once stopped. Mirrors what a failed
        upstream does (cacher.go: the reflector re-lists and the watch cache is Replaced).
        """
        if self.state == STOPPED:
            return
        _log.warning("cacher %s: re-initialising: %s", self.resource.prefix, reason)
        self._on_reinit(RuntimeError(reason))
        self.reflector.relist()

    def _on_watcher_terminated(self, w: CacheWatcher) -> None:
        self.metrics.terminated_watchers.inc()

    async def _ingest(self, item: Any) -> None:
        """The reflector's send: counts events_received and the resource version, then queues the
        batch (a list of CacheEvents, or an int resource version) for the dispatcher."""
        if isinstance(item, list):
            self.metrics.events_received.inc(len(item))
        self.metrics.record_resource_version(self.watch_cache.resource_version)
        await self._send.send(item)

    def _check_open(self) -> None:
        if self.state == STOPPED:
            raise StorageClosedError("cacher")

    def _not_ready_error(self) -> TooManyRequestsError:
        # util.go calculateRetryAfterForUnreadyCache: grows with downtime, 1..30 s.
        downtime = time.monotonic() - self._state_since
        retry = int(min(30, max(1, math.exp(0.06 * downtime))))
        return TooManyRequestsError(f"storage is (re)initializing: {self.resource.prefix}", retry)

    # ---- writes: delegated -----------------------------------------------------------------------
    async def create(self, key: str, obj: dict[str, Any], ttl: int = 0) -> dict[str, Any]:
        """Delegated to storage (see Storage.create)."""
        self._check_open()
        return await self.storage.create(key, obj, ttl)

    async def guaranteed_update(self, key: str, try_update: UpdateFunc, *, ignore_not_found: bool = False,
                                preconditions: Preconditions | None = None,
                                cached_existing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Delegated to storage with the cached object as the hint (delegator.go GuaranteedUpdate)."""
        self._check_open()
        return await self.storage.guaranteed_update(
            key, try_update, ignore_not_found=ignore_not_found, preconditions=preconditions,
            cached_existing=cached_existing if cached_existing is not None else self._cached(key))

    async def delete(self, key: str, *, preconditions: Preconditions | None = None,
                     validate_deletion: ValidateDeletionFunc | None = None,
                     cached_existing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Delegated to storage with the cached object as the hint (delegator.go Delete)."""
        self._check_open()
        return await self.storage.delete(
            key, preconditions=preconditions, validate_deletion=validate_deletion,
            cached_existing=cached_existing if cached_existing is not None else self._cached(key))

    def _cached(self, key: str) -> dict[str, Any] | None:
        if self.state != READY:
            return None
        elem = self.watch_cache.store.get(self.resource.prepare_key(key))
        return elem.object if elem is not None else None

    # ---- reads -----------------------------------------------------------------------------------
    async def get(self, key: str, opts: GetOptions = GetOptions()) -> dict[str, Any] | None:
        """GET: resource version "" (a quorum read) and any read while not ready go to storage; "0"
        and N are served from the cache once it is at least at N (waits up to freshness_timeout,
        then TooLargeResourceVersionError 504). NotFoundError (404) or None with ignore_not_found."""
        self._check_open()
        key = self.resource.prepare_key(key)
        rv = parse_resource_version(opts.resource_version)
        if opts.resource_version == "" or self.state != READY:
            return await self.storage.get(key, opts)
        await self._wait_fresh(rv)
        elem = self.watch_cache.store.get(key)
        if elem is None:
            if opts.ignore_not_found:
                return None
            raise NotFoundError(key, self.watch_cache.resource_version)
        return elem.object

    async def get_list(self, key: str, opts: ListOptions = ListOptions()) -> ListResult:
        """LIST, by the Kubernetes delegation table (delegator.go ShouldDelegateList, with snapshots):

        - resource version "0" (limit ignored, as Kubernetes does), N without limit, NotOlderThan:
          served from the cache once it is at least at N;
        - "" (consistent): from the cache where progress notifications are safe, else storage;
        - Exact N, continue pages and the legacy limit+N rule: the state at exactly N, rebuilt from
          the cache while N is inside the history window (and not below storage's compaction);
          otherwise delegated, so storage answers (410 when compacted).
        While not ready: delegated when there are no selectors and a limit, else 429.
        """
        self._check_open()
        prefixed = self.resource.prepare_key(key, opts.recursive)
        # The same interpretation storage applies: with_rev > 0 means "exactly at with_rev" (Exact,
        # a continue token's revision, or the legacy limit+N rule).
        with_rev, continue_key = validate_list_options(opts, prefixed)
        if self._is_consistent_list(opts):
            return await self._consistent_list(key, prefixed, opts)
        if with_rev > 0:
            return await self._exact_list(key, prefixed, opts, with_rev, continue_key)
        if opts.continue_token:
            return await self.storage.get_list(key, opts)  # "continue at latest" after a compaction
        if self.state != READY:
            if opts.predicate.empty() and opts.limit > 0:
                return await self.storage.get_list(key, opts)
            raise self._not_ready_error()
        await self._wait_fresh(opts.revision)
        rv = self.watch_cache.resource_version
        limit = 0 if opts.resource_version == "0" else opts.limit
        return self._page(self._current_elements(prefixed, opts), prefixed, opts, rv, limit)

    @staticmethod
    def _is_consistent_list(opts: ListOptions) -> bool:
        return opts.resource_version == "" and not opts.continue_token and not opts.resource_version_match

    async def _consistent_list(self, key: str, prefixed: str, opts: ListOptions) -> ListResult:
        """KEP-2340: wait until the cache holds storage's current revision (progress requests speed
        that up), then serve from the cache; on timeout fall back to storage. Delegated outright when
        the backend's progress notifications are not trustworthy or the cache is not ready."""
        if not self.consistent_reads_from_cache or self.state != READY:
            self.consistent_reads["delegated"] += 1
            return await self.storage.get_list(key, opts)
        rv = await self.storage.get_current_resource_version()
        try:
            await self._wait_fresh(rv)
        except TooLargeResourceVersionError:
            self.consistent_reads["fallback"] += 1
            try:
                page = await self.storage.get_list(key, opts)
            except BaseException:
                self.metrics.record_consistent_read(success=False, fallback=True)
                raise
            self.metrics.record_consistent_read(success=True, fallback=True)
            return page
        self.consistent_reads["cache"] += 1
        self.metrics.record_consistent_read(success=True, fallback=False)
        return self._page(self._current_elements(prefixed, opts), prefixed, opts,
                          self.watch_cache.resource_version, opts.limit)

    async def _exact_list(self, key: str, prefixed: str, opts: ListOptions, rv: int,
                          continue_key: str) -> ListResult:
        """cacher.go shouldDelegateExactRV + waitAndListExactRV: serve the state at ``rv`` from the
        cache when it can be rebuilt there, else delegate."""
        wc = self.watch_cache
        if not opts.recursive or self.state != READY or rv < self.storage.compact_revision():
            return await self.storage.get_list(key, opts)
        if rv > wc.resource_version:
            if not self.consistent_reads_from_cache:
                return await self.storage.get_list(key, opts)
            await self._wait_fresh(rv)
        if not wc.can_serve_exact(rv):
            return await self.storage.get_list(key, opts)
        elems = wc.elements_at(rv, prefixed, continue_key)
        return self._page(elems, prefixed, opts, rv, opts.limit, continue_key)

    async def _wait_fresh(self, rv: int) -> None:
        with self.metrics.read_wait.time():  # apiserver_watch_cache_read_wait_seconds
            await self.watch_cache.wait_until_fresh(rv, self.freshness_timeout)

    def _current_elements(self, prefixed: str, opts: ListOptions):
        if not opts.recursive:
            elem = self.watch_cache.store.get(prefixed)
            return [elem] if elem is not None else []
        return self._indexed(prefixed, opts)

    def _page(self, elems, prefixed: str, opts: ListOptions, rv: int, limit: int,
              continue_key: str = "") -> ListResult:
        """Filter ``elems`` (key order) by the predicate on their precomputed attributes and cut a
        page of ``limit`` (0 = all); the continue token carries ``rv`` so the next page reads the
        same state. remainingItemCount only without selectors (storage.PrepareContinueToken)."""
        pred, elems = opts.predicate, iter(elems)
        match_all = pred.empty()
        items: list[dict[str, Any]] = []
        last_key, more, fetched = "", False, 0
        for fetched, elem in enumerate(elems, 1):
            if not match_all and not pred.matches_attrs(elem.labels, elem.fields):
                continue
            if limit and len(items) == limit:
                more = True
                break
            items.append(elem.object)
            last_key = elem.key
        index, self._list_index = self._list_index, ""  # set by _indexed for this list
        self.metrics.record_list(index, fetched, len(items))
        if not more:
            return ListResult(items, str(rv))
        token = encode_continue(last_key + "\x00", prefixed, rv)
        remaining = 1 + sum(1 for _ in elems) if match_all else None  # the extra one plus the rest
        return ListResult(items, str(rv), token, remaining)

    def _indexed(self, prefixed: str, opts: ListOptions):
        for field in self.resource.index_fields:
            value = opts.predicate.pinned_field(field)
            if value is not None:
                elems = self.watch_cache.store.by_index(field, value)
                if elems is not None:
                    self._list_index = field  # apiserver_cache_list_total{index}
                    return (e for e in elems if e.key.startswith(prefixed))
        return self.watch_cache.store.scan(prefixed)

    # ---- watch -----------------------------------------------------------------------------------
    def watch(self, key: str, opts: ListOptions = ListOptions()) -> CacheWatcher:
        """Open a watch served from the cache (always, as Kubernetes' Cacher.Watch).

        Events have resource version > opts.resource_version; "0" (or unset without
        send_initial_events) first sends the cached state as ADDED; send_initial_events=True sends the
        state at least as fresh as requested, then a BOOKMARK annotated k8s.io/initial-events-end when
        bookmarks are allowed. A version older than the history -> one ERROR event (410), then the end.
        Entering the watch raises TooManyRequestsError (429) while the cache is not ready,
        BadRequestError for invalid options, TooLargeResourceVersionError when the cache cannot reach
        the state a watch-list asks for in time.
        """
        self._check_open()
        prefixed = self.resource.prepare_key(key, opts.recursive)
        validate_watch_options(opts)
        trigger = self.resource.trigger_field
        trigger_value = opts.predicate.pinned_field(trigger) if trigger else None
        scope = (opts.predicate.matches_single_namespace() or "", opts.predicate.matches_single_name() or "")
        watcher: CacheWatcher

        async def start() -> None:
            await self._start_watch(watcher, opts)

        watcher = CacheWatcher(prefixed, opts, self._watcher_capacity(trigger_value), trigger_value=trigger_value,
                               scope=scope, on_start=start, on_stop=lambda: self.dispatcher.unregister(watcher))
        return watcher

    def _watcher_capacity(self, trigger_value: str | None) -> int:
        if self.watcher_capacity:
            return self.watcher_capacity
        return 100 if trigger_value is not None else 1000

    async def _start_watch(self, w: CacheWatcher, opts: ListOptions) -> None:
        self._check_open()
        if self.state != READY:
            raise self._not_ready_error()
        if self._after_ready_check is not None:  # test hook for case RST-1
            await self._after_ready_check()
        required = opts.revision
        if opts.resource_version == "" and opts.send_initial_events is not None:
            required = await self.storage.get_current_resource_version()
        if opts.send_initial_events:
            await self._wait_fresh(required)
        if self.state != READY:
            raise self._not_ready_error()
        # From here to register() nothing awaits, so no event can slip between the initial
        # events and the live stream (Go holds the watch cache lock for the same reason).
        try:
            self._preload(w, opts, required)
        except ExpiredError as exc:
            w.finish(exc)
            return
        self.dispatcher.register(w)

    def _preload(self, w: CacheWatcher, opts: ListOptions, required: int) -> None:
        wc = self.watch_cache
        legacy_initial = opts.send_initial_events is None and required == 0
        if opts.send_initial_events or legacy_initial:
            for elem in (wc.store.scan(w.key) if w.recursive else filter(None, [wc.store.get(w.key)])):
                if w.predicate.empty() or w.predicate.matches_attrs(elem.labels, elem.fields):
                    w.preload(WatchEvent(EventType.ADDED, elem.object))
            w.sent_rv = wc.resource_version
            if opts.send_initial_events and opts.allow_watch_bookmarks:
                w.preload(WatchEvent(EventType.BOOKMARK, {"metadata": {
                    "resourceVersion": str(wc.resource_version),
                    "annotations": {INITIAL_EVENTS_END_ANNOTATION: "true"}}}))
            return
        if required == 0:  # send_initial_events=False with "0": start at the cache's version
            w.sent_rv = wc.resource_version
            return
        w.sent_rv = required
        for event in wc.history.events_since(required):
            out = w.convert(event)
            if out is not None:
                w.preload(out)
        # The interval covered everything the cache has applied, delivered or filtered out.
        w.sent_rv = max(required, wc.resource_version)

    # ---- delegated metadata ----------------------------------------------------------------------
    async def stats(self) -> Stats:
        """Delegated to storage."""
        self._check_open()
        return await self.storage.stats()

    async def readiness_check(self) -> None:
        """Raises TooManyRequestsError (429) until the cache is initialised, StorageClosedError after close."""
        self._check_open()
        if self.state != READY:
            raise self._not_ready_error()

    async def request_watch_progress(self) -> None:
        """Delegated to storage."""
        self._check_open()
        await self.storage.request_watch_progress()

    async def get_current_resource_version(self) -> int:
        """Delegated to storage (a quorum read)."""
        self._check_open()
        return await self.storage.get_current_resource_version()

    def compact_revision(self) -> int:
        """The wrapped storage's compaction revision."""
        return self.storage.compact_revision()
