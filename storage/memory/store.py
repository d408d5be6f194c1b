"""The in-memory backend: storage.Interface semantics over MemoryKV.

Behaves like kube-apiserver's etcd3 store (pkg/storage/etcd3/store.go) against an etcd that lives in
the process: same key validation, resource version rules, paging pinned to the first page's revision,
optimistic update loop, conditional delete, watch from a revision with previous values, progress
notifications on request, compaction and TTL. Several MemoryStorage objects (one per resource) can share
one MemoryKV, and then share its revision counter as resources share etcd's.
"""

from __future__ import annotations

import copy
from typing import Any

import anyio

from storage.codec import Codec, JSONCodec
from storage.continue_token import encode_continue
from storage.errors import (AlreadyExistsError, BadRequestError, ExpiredError, InternalError,
                            NotFoundError, StorageClosedError, StorageError, TooLargeResourceVersionError)
from storage.interface import (INITIAL_EVENTS_END_ANNOTATION, EventType, GetOptions, ListOptions,
                               ListResult, Preconditions, Resource, ResponseMeta, Stats, UpdateFunc,
                               ValidateDeletionFunc, WatchEvent, validate_list_options,
                               validate_watch_options)
from storage.memory.mvcc import Change, KeyValue, MemoryKV, WatchSink, prefix_end
from storage.versioner import parse_resource_version, with_resource_version
from storage.watch import BufferedWatch, filter_event

#: Largest page read from the store in one step while filling a LIST (etcd3 store's maxLimit).
MAX_PAGE = 10000


class MemoryStorage:
    """Storage for one resource over a MemoryKV (see module doc).

    resource: the Resource (prefix, attrs); kv: a shared MemoryKV (a new one when None);
    codec: object <-> bytes (JSONCodec); watch_capacity: events buffered per watch (100, like etcd3's
    result channel); lease_reuse_seconds: TTL lease reuse window cap (k8s --lease-reuse-duration-seconds).
    """

    def __init__(self, resource: Resource, kv: MemoryKV | None = None, codec: Codec | None = None,
                 watch_capacity: int = 100, lease_reuse_seconds: float = 60.0) -> None:
        self.resource = resource
        self.kv = kv if kv is not None else MemoryKV()
        self.codec = codec or JSONCodec()
        self.watch_capacity = watch_capacity
        self.lease_reuse_seconds = lease_reuse_seconds
        self._lease: int | None = None  # the lease being reused for TTL'd objects
        self._lease_objects = 0
        self._watches: set[_MemoryWatch] = set()
        self._closed = False
        self._tg: anyio.abc.TaskGroup | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> "MemoryStorage":
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._expire_loop)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every watch and the lease sweeper. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for watch in list(self._watches):
            watch.finish()
            await watch.stop()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._tg = None

    async def _expire_loop(self) -> None:
        # Expiry must happen even when nobody reads, so TTL'd keys produce their DELETED events.
        while True:
            await anyio.sleep(0.2)
            self.kv.expire_leases()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosedError("memory storage")

    def _decode(self, kv: KeyValue, rv: int | None = None) -> dict[str, Any]:
        return self.codec.decode(kv.value, rv or kv.mod_revision)  # type: ignore[arg-type]

    # ---- create / get ----------------------------------------------------------------------------
    async def create(self, key: str, obj: dict[str, Any], ttl: int = 0) -> dict[str, Any]:
        """Create ``obj`` at ``key``; see Storage.create. Mirrors etcd3 store.Create."""
        self._check_open()
        key = self.resource.prepare_key(key)
        self.resource.validate_object(key, obj)
        if (obj.get("metadata") or {}).get("resourceVersion"):
            raise BadRequestError("resourceVersion should not be set on objects to be created")
        data = self.codec.encode(obj)
        ok, rev, kv = self.kv.put_if(key, data, 0, self._lease_for(ttl))
        if not ok:
            raise AlreadyExistsError(key)
        return self._decode(kv)

    async def get(self, key: str, opts: GetOptions = GetOptions()) -> dict[str, Any] | None:
        """Read ``key`` at the latest revision; see Storage.get. Mirrors etcd3 store.Get."""
        self._check_open()
        key = self.resource.prepare_key(key)
        min_rv = parse_resource_version(opts.resource_version)
        if min_rv > self.kv.revision:
            raise TooLargeResourceVersionError(min_rv, self.kv.revision, retry_after_seconds=0)
        kv = self.kv.get(key)
        if kv is None:
            if opts.ignore_not_found:
                return None
            raise NotFoundError(key, self.kv.revision)
        return self._decode(kv)

    # ---- list ------------------------------------------------------------------------------------
    async def get_list(self, key: str, opts: ListOptions = ListOptions()) -> ListResult:
        """List ``key`` (a prefix when recursive); see Storage.get_list. Mirrors etcd3 store.GetList."""
        self._check_open()
        key = self.resource.prepare_key(key, opts.recursive)
        with_rev, continue_key = validate_list_options(opts, key)
        pred = opts.predicate
        if not opts.recursive:
            return self._list_single(key, with_rev, opts)
        try:
            self.kv.check_revision(with_rev)
        except ExpiredError:
            if opts.continue_token:
                raise self._compacted_continue(continue_key, key) from None
            raise
        rev = with_rev or self.kv.revision
        self._check_not_older_than(opts, with_rev, rev)
        start, end = continue_key or key, prefix_end(key)
        items: list[dict[str, Any]] = []
        more, last_key = False, ""
        matches = None if pred.empty() else pred.matches_attrs
        for kv in self._scan(start, end, rev):
            if opts.limit and len(items) == opts.limit:
                more = True
                break
            obj = self._decode(kv)
            if matches is None or matches(*self.resource.attrs(obj)):
                items.append(obj)
                last_key = kv.key
        token, remaining = "", None
        if more:
            token = encode_continue(last_key + "\x00", key, rev)
            if pred.empty():
                remaining = self._count_at(last_key + "\x00", end, rev)
        return ListResult(items, str(rev), token, remaining)

    def _scan(self, start: str, end: str, rev: int):
        page = MAX_PAGE
        while True:
            kvs, more = self.kv.range(start, end, rev, page)
            yield from kvs
            if not more:
                return
            start = kvs[-1].key + "\x00"

    def _count_at(self, start: str, end: str, rev: int) -> int:
        return sum(1 for _ in self._scan(start, end, rev))

    def _list_single(self, key: str, with_rev: int, opts: ListOptions) -> ListResult:
        self.kv.check_revision(with_rev)
        rev = with_rev or self.kv.revision
        self._check_not_older_than(opts, with_rev, rev)
        kvs, _ = self.kv.range(key, None, rev)
        items = [self._decode(kv) for kv in kvs]
        pred = opts.predicate
        if not pred.empty():
            items = [o for o in items if pred.matches_attrs(*self.resource.attrs(o))]
        return ListResult(items, str(rev))

    def _check_not_older_than(self, opts: ListOptions, with_rev: int, rev: int) -> None:
        if with_rev == 0 and not opts.continue_token and opts.revision > rev:
            raise TooLargeResourceVersionError(opts.revision, rev, retry_after_seconds=0)

    def _compacted_continue(self, continue_key: str, key_prefix: str) -> ExpiredError:
        token = encode_continue(continue_key, key_prefix, -1)
        return ExpiredError(
            "The provided continue parameter is too old to display a consistent list result. You can "
            "start a new list without the continue parameter, or use the continue token in this "
            "response to retrieve the remainder of the results. Continuing with the provided token "
            "results in an inconsistent list - objects that were created, modified, or deleted between "
            "the time the first chunk was returned and now may show up in the list.",
            continue_token=token)

    # ---- update / delete -------------------------------------------------------------------------
    async def guaranteed_update(self, key: str, try_update: UpdateFunc, *, ignore_not_found: bool = False,
                                preconditions: Preconditions | None = None,
                                cached_existing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Optimistic read-modify-write; see Storage.guaranteed_update. Mirrors etcd3 GuaranteedUpdate.

        Raises NotFoundError (404) unless ignore_not_found, PreconditionFailedError (409), whatever
        try_update raises (nothing written), BadRequestError / RequestEntityTooLargeError on encode.
        """
        self._check_open()
        key = self.resource.prepare_key(key)
        cur = self.kv.get(key)
        while True:
            await anyio.lowlevel.checkpoint()
            self._check_open()
            if cur is None and not ignore_not_found:
                raise NotFoundError(key, self.kv.revision)
            current = self._decode(cur) if cur is not None else {}
            if preconditions is not None and cur is not None:
                preconditions.check(key, current)
            result = try_update(copy.deepcopy(current), ResponseMeta(cur.mod_revision if cur else 0))
            new_obj, ttl = result if isinstance(result, tuple) else (result, None)
            self.resource.validate_object(key, new_obj)
            data = self.codec.encode(new_obj)
            if cur is not None and data == cur.value and not ttl:
                return current  # no-op: nothing written, resourceVersion unchanged
            ok, _, kv = self.kv.put_if(key, data, cur.mod_revision if cur else 0, self._lease_for(ttl or 0))
            if ok:
                return self._decode(kv)
            cur = kv  # lost the race: retry on the state the txn returned

    async def delete(self, key: str, *, preconditions: Preconditions | None = None,
                     validate_deletion: ValidateDeletionFunc | None = None,
                     cached_existing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Conditional delete; returns the last object stamped with the deletion revision.

        Mirrors etcd3 store.conditionalDelete. Raises NotFoundError (404), PreconditionFailedError
        (409), whatever validate_deletion raises (nothing deleted).
        """
        self._check_open()
        key = self.resource.prepare_key(key)
        while True:
            cur = self.kv.get(key)
            if cur is None:
                raise NotFoundError(key, self.kv.revision)
            current = self._decode(cur)
            if preconditions is not None:
                preconditions.check(key, current)
            if validate_deletion is not None:
                validate_deletion(copy.deepcopy(current))
            ok, rev, _ = self.kv.delete_if(key, cur.mod_revision)
            if ok:
                return with_resource_version(current, rev)
            await anyio.lowlevel.checkpoint()

    def _lease_for(self, ttl: int) -> int:
        """A lease id for ``ttl`` seconds (0 = none), reusing the previous lease while it would expire
        between ttl and ttl + reuse from now (k8s lease_manager.go: reuse = min(5% of ttl, cap),
        at most 1000 objects per lease). Raises BadRequestError for a negative or non-int ttl."""
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
            raise BadRequestError(f"ttl must be a non-negative integer of seconds, got {ttl!r}")
        if not ttl:
            return 0
        reuse = min(0.05 * ttl, self.lease_reuse_seconds)
        if self._lease is not None and self._lease_objects < 1000:
            remaining = self.kv.lease_remaining(self._lease)
            if remaining is not None and ttl <= remaining <= ttl + reuse:
                self._lease_objects += 1
                return self._lease
        self._lease, self._lease_objects = self.kv.grant_lease(ttl + reuse), 1
        return self._lease

    # ---- watch -----------------------------------------------------------------------------------
    def watch(self, key: str, opts: ListOptions = ListOptions()) -> BufferedWatch:
        """Watch ``key``; events with revision > opts.resource_version. Mirrors etcd3 watcher.Watch.

        rv 0 with send_initial_events None/True first sends the current state as ADDED (and, for a
        watch-list with bookmarks, a BOOKMARK annotated k8s.io/initial-events-end). A compacted start
        ends the stream with one ERROR event (410). Raises BadRequestError / InvalidError for bad keys
        or options, StorageClosedError when closed.
        """
        self._check_open()
        key = self.resource.prepare_key(key, opts.recursive)
        validate_watch_options(opts)
        return _MemoryWatch(self, key, opts)

    # ---- misc ------------------------------------------------------------------------------------
    async def stats(self) -> Stats:
        """Number of objects under the resource prefix."""
        self._check_open()
        prefix = self.resource.prefix + "/"
        return Stats(self.kv.count(prefix, prefix_end(prefix)))

    async def readiness_check(self) -> None:
        """Ready whenever open; raises StorageClosedError after close."""
        self._check_open()

    async def request_watch_progress(self) -> None:
        """Ask for a progress notification on every watch (etcd RequestProgress)."""
        self._check_open()
        self.kv.request_progress()

    async def get_current_resource_version(self) -> int:
        """The store's current revision."""
        self._check_open()
        return self.kv.revision

    def compact_revision(self) -> int:
        """The latest compacted revision (0 if never compacted)."""
        return self.kv.compacted

    async def lease_of(self, key: str) -> int:
        """Test hook: the id of the lease attached to ``key`` (0 if none or the key is absent)."""
        self._check_open()
        return self.kv.lease_of(self.resource.prepare_key(key))

    def new_compactor(self, interval: float = 300.0, *, key: str = "compact_rev_key"):
        """A periodic Compactor (storage/compaction.py) over this storage's MemoryKV; not started."""
        from storage.memory.compactor import new_compactor
        return new_compactor(self, interval, key=key)

    async def compact(self, revision: int) -> None:
        """Compact the store's history below ``revision``."""
        self._check_open()
        self.kv.compact(revision)

    async def server_version(self) -> str:
        """Version string of the backend (for feature detection): progress notifications are exact."""
        return "memory"


class _MemoryWatch(BufferedWatch, WatchSink):
    """One watch on a MemoryStorage: a BufferedWatch that the MemoryKV pushes changes into."""

    def __init__(self, storage: MemoryStorage, key: str, opts: ListOptions) -> None:
        BufferedWatch.__init__(self, storage.watch_capacity, on_start=self._open, on_stop=self._close,
                               timeout_seconds=opts.timeout_seconds)
        self._storage = storage
        self._opts = opts
        self.key_lo, self.key_hi = (key, prefix_end(key)) if opts.recursive else (key, None)
        self.next_revision = 0
        self.synced = False
        pred = opts.predicate
        attrs = storage.resource.attrs
        self._matches = None if pred.empty() else (lambda obj: pred.matches_attrs(*attrs(obj)))

    async def _open(self) -> None:
        storage, opts = self._storage, self._opts
        storage._check_open()
        rv = opts.revision
        initial = opts.send_initial_events if opts.send_initial_events is not None else rv == 0
        if initial:
            start = await self._send_initial_state(rv)
        elif rv == 0:
            start = storage.kv.revision
        else:
            start = rv
        self.next_revision = start + 1
        storage._watches.add(self)
        try:
            storage.kv.add_sink(self)
        except ExpiredError as exc:
            self.finish(exc)

    async def _send_initial_state(self, min_rv: int) -> int:
        storage, kv = self._storage, self._storage.kv
        if min_rv > kv.revision:
            raise TooLargeResourceVersionError(min_rv, kv.revision, retry_after_seconds=1)
        rev = kv.revision
        kvs, _ = kv.range(self.key_lo, self.key_hi, rev)
        for item in kvs:
            event = filter_event(EventType.ADDED, storage._decode(item), None, self._matches)
            if event is not None:
                self.preload(event)
        if self._opts.send_initial_events and self._opts.allow_watch_bookmarks:
            self.preload(WatchEvent(EventType.BOOKMARK, {"metadata": {
                "resourceVersion": str(rev), "annotations": {INITIAL_EVENTS_END_ANNOTATION: "true"}}}))
        return rev

    def _close(self) -> None:
        self._storage.kv.remove_sink(self)
        self._storage._watches.discard(self)

    # ---- WatchSink -------------------------------------------------------------------------------
    def deliver(self, changes: list[Change]) -> bool:
        for change in changes:
            if change.kv.value is None and change.prev is None:
                # Like the etcd3 watcher: a DELETE without its previous value cannot be turned into a
                # DELETED event (the object is unknown), so the stream fails instead of dropping it.
                self.fail(InternalError(
                    f"etcd event received with PrevKv=nil (key={change.kv.key!r}, "
                    f"modRevision={change.revision}, type=DELETE)"))
                return False  # the sink is gone: the store stops pushing to it
            event = self._convert(change)
            if event is not None and not self.offer(event):
                return False  # full: the store stops pushing; next_batch catches up from here
            self.next_revision = change.revision + 1
        return True

    def _convert(self, change: Change) -> WatchEvent | None:
        decode = self._storage.codec.decode
        prev = decode(change.prev.value, change.prev.mod_revision) if change.prev is not None else None
        if change.kv.value is None:
            if prev is None:
                return None
            return filter_event(EventType.DELETED, with_resource_version(prev, change.revision), None,
                                self._matches)
        obj = decode(change.kv.value, change.revision)
        kind = EventType.MODIFIED if prev is not None else EventType.ADDED
        return filter_event(kind, obj, prev, self._matches)

    def progress(self, revision: int) -> None:
        if self._opts.progress_notify:
            self.offer(WatchEvent(EventType.BOOKMARK, {"metadata": {"resourceVersion": str(revision)}}))

    def fail(self, error: Exception) -> None:
        self._storage.kv.remove_sink(self)
        err = error if isinstance(error, StorageError) else InternalError(str(error))
        self.finish(err)

    async def next_batch(self) -> list[WatchEvent]:
        if not self.synced and not self.finished and self.free() == self.capacity:
            self._storage.kv.sync_sink(self)  # catch up from history after the buffer was full
        return await BufferedWatch.next_batch(self)
