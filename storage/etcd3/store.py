"""Etcd3Storage: the Storage contract over a real etcd v3 cluster.

Mirrors k8s.io/apiserver pkg/storage/etcd3/store.go (store): registry keys map to etcd keys under a
path prefix (``/pods/ns/a`` → ``/registry/pods/ns/a``); an object's resourceVersion is its etcd mod
revision; a list's is the snapshot revision; writes are transactions that compare mod revisions
(optimistic concurrency, no locks); TTLs are etcd leases; watches are etcd watches (watcher.py).

Every blocking gRPC call runs in a worker thread under the storage's own limiter (client.py); paged
reads run entirely in one worker thread per call (lister.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

from storage.codec import Codec, JSONCodec
from storage.continue_token import encode_continue
from storage.errors import (AlreadyExistsError, BadRequestError, ExpiredError, NotFoundError,
                            StorageClosedError, TooLargeResourceVersionError)
from storage.etcd3.client import CompactedError, EtcdClient, FutureRevisionError, prefix_end
from storage.etcd3.leases import LeaseManager
from storage.etcd3.lister import ListChunk, ListRequest, read_list
from storage.etcd3.watcher import WATCH_CAPACITY, Etcd3Watch, WatchTarget
from storage.interface import (GetOptions, ListOptions, ListResult, Preconditions, Resource,
                               ResponseMeta, Stats, UpdateFunc, ValidateDeletionFunc,
                               validate_list_options, validate_watch_options)
from storage.versioner import parse_resource_version

LIST_TOO_OLD = "The resourceVersion for the provided list is too old."
CONTINUE_TOO_OLD = (
    "The provided continue parameter is too old to display a consistent list result. You can start a "
    "new list without the continue parameter, or use the continue token in this response to retrieve "
    "the remainder of the results. Continuing with the provided token results in an inconsistent list "
    "- objects that were created, modified, or deleted between the time the first chunk was returned "
    "and now may show up in the list.")


@dataclass
class _State:
    """What a read-modify-write loop knows about the stored object (store.go objState).

    obj: decoded object ({} when absent); data: its stored bytes (b"" when absent); rev: mod revision
    (0 when absent)."""

    obj: dict[str, Any]
    data: bytes
    rev: int


class Etcd3Storage:
    """Storage for one resource on etcd v3 (see module doc).

    resource: the Resource (key prefix, selector attributes).
    endpoints: etcd client endpoints, "host:port" or a list of them (ignored when ``client`` is given).
    path_prefix: etcd key prefix (kube-apiserver --etcd-prefix, default "/registry").
    codec: object <-> bytes (JSONCodec by default).
    client: an existing ``etcd3`` client to use (its channel is not closed by close()).
    request_timeout: seconds per unary etcd call (DEADLINE → TimeoutError_ 504).
    max_threads: worker threads for unary calls; watch_capacity: events buffered per watch (100).
    lease_reuse_seconds: TTL lease reuse cap (--lease-reuse-duration-seconds, 60).

    Use as ``async with Etcd3Storage(...) as storage:``; ``close()`` stops every watch (and its thread)
    and releases the gRPC channel; later calls raise StorageClosedError (503).
    """

    def __init__(self, resource: Resource, endpoints: Sequence[str] | str = "127.0.0.1:2379",
                 path_prefix: str = "/registry", codec: Codec | None = None, client: Any = None, *,
                 request_timeout: float = 30.0, max_threads: int = 16,
                 watch_capacity: int = WATCH_CAPACITY, lease_reuse_seconds: int = 60) -> None:
        self.resource = resource
        self.codec = codec if codec is not None else JSONCodec()
        # path.Join("/", prefix) + "/": "/registry", "registry/" and "//registry" all give "/registry/".
        self.path_prefix = "/" + "".join(part + "/" for part in path_prefix.split("/") if part)
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        self._client = EtcdClient(list(endpoints), client, timeout=request_timeout, max_threads=max_threads)
        self._leases = LeaseManager(self._grant_lease, reuse_seconds=lease_reuse_seconds)
        self.watch_capacity = watch_capacity
        self._watches: set[Etcd3Watch] = set()
        self._compacted = 0

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def __aenter__(self) -> "Etcd3Storage":
        self._client.check_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every open watch (joining its thread) and release the channel. Idempotent."""
        self._client.closed = True  # refuse new calls while the watches wind down
        try:
            for watch in list(self._watches):
                await watch.stop()
        finally:
            self._client.release()

    def _check_open(self) -> None:
        if self._client.closed:
            raise StorageClosedError("etcd3 storage")

    # ---- keys ----------------------------------------------------------------------------------------
    def _etcd_key(self, key: str, recursive: bool = False) -> str:
        """Validate a registry key (Resource.prepare_key, 400 on bad keys) and map it into etcd."""
        return self.path_prefix + self.resource.prepare_key(key, recursive)[1:]

    def _decode(self, data: bytes, rev: int) -> dict[str, Any]:
        return self.codec.decode(data, rev)

    # ---- create / get --------------------------------------------------------------------------------
    async def create(self, key: str, obj: dict[str, Any], ttl: int = 0) -> dict[str, Any]:
        """Store ``obj`` at ``key`` unless the key exists (store.go Create).

        ttl: seconds (0 = forever), attached as an etcd lease. Returns the stored object stamped with
        the write revision. Raises BadRequestError (400: resourceVersion set, bad key, bad ttl,
        unencodable object), AlreadyExistsError (409), RequestEntityTooLargeError (413).
        """
        self._check_open()
        ekey = self._etcd_key(key).encode()
        self.resource.validate_object(self.resource.prepare_key(key), obj)
        if (obj.get("metadata") or {}).get("resourceVersion") not in (None, "", "0"):
            raise BadRequestError("resourceVersion should not be set on objects to be created")
        data = self.codec.encode(obj)
        lease = await self._lease_for(ttl)
        ok, rev, _ = await self._client.run(self._client.optimistic_put, ekey, data, 0, lease, False)
        if not ok:
            raise AlreadyExistsError(key)
        return self._decode(data, rev)

    async def get(self, key: str, opts: GetOptions = GetOptions()) -> dict[str, Any] | None:
        """The object at ``key`` from a linearizable read (store.go Get).

        opts.resource_version is a NotOlderThan bound. Raises NotFoundError (404; None with
        ignore_not_found), TooLargeResourceVersionError (504, retry after 0 s) when etcd is behind it.
        """
        self._check_open()
        ekey = self._etcd_key(key).encode()
        min_rv = parse_resource_version(opts.resource_version)
        resp = await self._client.run(self._client.range, ekey)
        if min_rv > resp.header.revision:
            raise TooLargeResourceVersionError(min_rv, resp.header.revision, retry_after_seconds=0)
        if not resp.kvs:
            if opts.ignore_not_found:
                return None
            raise NotFoundError(key, resp.header.revision)
        return self._decode(resp.kvs[0].value, resp.kvs[0].mod_revision)

    # ---- list ----------------------------------------------------------------------------------------
    async def get_list(self, key: str, opts: ListOptions = ListOptions()) -> ListResult:
        """List ``key`` (a prefix when opts.recursive; else 0 or 1 item) (store.go GetList).

        Resource versions follow storage.ValidateListOptions (reference 1.2/1.3): latest, Exact
        (with_rev) or NotOlderThan (read latest, then bound-check). Pages are pinned to the first
        page's revision; selector-thinned pages trigger bigger reads until ``limit`` matches.
        ``continue_token`` is prefix-relative (portable with the cache); ``remaining_item_count`` only
        without selectors. Raises BadRequestError (400: token misuse/tampering), InvalidError (422),
        ExpiredError (410; with a rv=-1 ``continue_token`` when continuing), TooLargeResourceVersionError
        (504).
        """
        self._check_open()
        prefix = self._etcd_key(key, opts.recursive)
        with_rev, continue_key = validate_list_options(opts, prefix)
        pred = opts.predicate
        req = ListRequest(
            start=(continue_key or prefix).encode(),
            range_end=prefix_end(prefix.encode()) if opts.recursive else b"",
            revision=with_rev, limit=opts.limit if opts.recursive else 0,
            min_revision=opts.revision if opts.resource_version else 0,
            keep=None if pred.empty() else self._matcher(pred))
        try:
            chunk = await self._client.run(read_list, self._client, req, self._decode)
        except CompactedError:
            self._observe_compaction(with_rev + 1)
            if opts.continue_token:
                raise ExpiredError(CONTINUE_TOO_OLD,
                                   continue_token=encode_continue(continue_key, prefix, -1)) from None
            raise ExpiredError(LIST_TOO_OLD) from None
        except FutureRevisionError:
            raise await self._too_large(with_rev) from None
        return self._list_result(chunk, prefix, opts)

    def _list_result(self, chunk: ListChunk, prefix: str, opts: ListOptions) -> ListResult:
        token, remaining = "", None
        if chunk.has_more and chunk.last_key is not None:
            token = encode_continue(chunk.last_key.decode() + "\x00", prefix, chunk.revision)
            if opts.predicate.empty():
                # Only one page is read without selectors; its count spans from its start to the end.
                remaining = chunk.count - len(chunk.items)
        return ListResult(chunk.items, str(chunk.revision), token, remaining)

    def _matcher(self, pred: Any) -> Any:
        attrs = self.resource.attrs
        return lambda obj: pred.matches_attrs(*attrs(obj))

    async def _too_large(self, minimum: int) -> TooLargeResourceVersionError:
        current = await self.get_current_resource_version()
        return TooLargeResourceVersionError(minimum, current, retry_after_seconds=0)

    # ---- read-modify-write ---------------------------------------------------------------------------
    async def guaranteed_update(self, key: str, try_update: UpdateFunc, *, ignore_not_found: bool = False,
                                preconditions: Preconditions | None = None,
                                cached_existing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Optimistic read-modify-write until it commits (store.go GuaranteedUpdate).

        Starts from ``cached_existing`` (a hint: deep-copied, may be stale) or a fresh read. Each round
        checks ``preconditions``, calls ``try_update(private copy, ResponseMeta(rev))`` (returning the new
        object or ``(object, ttl seconds or None)``), encodes, and writes with a transaction on the mod
        revision; a lost race retries on the value the transaction returned. If the new bytes equal the
        stored ones nothing is written and the current object (unchanged RV) is returned. A missing key
        raises NotFoundError (404) unless ``ignore_not_found``: then try_update gets ``{}`` and the write
        is a race-safe create. Precondition (409) and try_update errors are raised only when seen on
        fresh data; encode errors (400/413) are raised at once. Nothing is written when it raises.
        """
        self._check_open()
        ekey = self._etcd_key(key).encode()
        if cached_existing is not None:
            state, fresh = self._state_from_object(cached_existing), False
        else:
            state, fresh = await self._current_state(ekey, key, ignore_not_found), True
        while True:
            try:
                new_obj, ttl = self._apply_update(key, state, try_update, preconditions)
            except Exception:
                if fresh:
                    raise
                stale_rev = state.rev
                state, fresh = await self._current_state(ekey, key, ignore_not_found), True
                if state.rev == stale_rev:
                    raise  # the hint was not stale after all: the error stands
                continue
            self.resource.validate_object(self.resource.prepare_key(key), new_obj)
            data = self.codec.encode(new_obj)
            if data == state.data:
                if not fresh:  # a hint alone must not decide that nothing changed
                    state, fresh = await self._current_state(ekey, key, ignore_not_found), True
                    if data != state.data:
                        continue
                return self._decode(state.data, state.rev)
            lease = await self._lease_for(ttl)
            ok, rev, kv = await self._client.run(self._client.optimistic_put, ekey, data, state.rev, lease)
            if ok:
                return self._decode(data, rev)
            state, fresh = self._state_from_kv(kv, key, ignore_not_found, rev), True

    @staticmethod
    def _apply_update(key: str, state: _State, try_update: UpdateFunc,
                      preconditions: Preconditions | None) -> tuple[dict[str, Any], int]:
        if preconditions is not None:
            preconditions.check(key, state.obj)
        result = try_update(copy.deepcopy(state.obj), ResponseMeta(resource_version=state.rev))
        new_obj, ttl = result if isinstance(result, tuple) else (result, None)
        return new_obj, ttl or 0

    # ---- delete --------------------------------------------------------------------------------------
    async def delete(self, key: str, *, preconditions: Preconditions | None = None,
                     validate_deletion: ValidateDeletionFunc | None = None,
                     cached_existing: dict[str, Any] | None = None) -> dict[str, Any]:
        """Delete ``key`` if it still is what we checked (store.go conditionalDelete).

        Starts from ``cached_existing`` (a hint) or a fresh read; checks ``preconditions`` and
        ``validate_deletion(copy)`` (errors raised only when seen on fresh data); deletes with a
        transaction on the mod revision, retrying on the value it returns. Returns the deleted object
        stamped with the deletion revision. Raises NotFoundError (404), PreconditionFailedError (409),
        whatever validate_deletion raises (nothing deleted).
        """
        self._check_open()
        ekey = self._etcd_key(key).encode()
        if cached_existing is not None:
            state, fresh = self._state_from_object(cached_existing), False
        else:
            state, fresh = await self._current_state(ekey, key, False), True
        while True:
            try:
                if preconditions is not None:
                    preconditions.check(key, state.obj)
                if validate_deletion is not None:
                    validate_deletion(copy.deepcopy(state.obj))
            except Exception:
                if fresh:
                    raise
                stale_rev = state.rev
                state, fresh = await self._current_state(ekey, key, False), True
                if state.rev == stale_rev:
                    raise
                continue
            ok, rev, kv = await self._client.run(self._client.optimistic_delete, ekey, state.rev)
            if ok:
                return self._decode(state.data, rev)
            state, fresh = self._state_from_kv(kv, key, False, rev), True

    # ---- object state helpers ------------------------------------------------------------------------
    async def _current_state(self, ekey: bytes, key: str, ignore_not_found: bool) -> _State:
        resp = await self._client.run(self._client.range, ekey)
        return self._state_from_kv(resp.kvs[0] if resp.kvs else None, key, ignore_not_found,
                                   resp.header.revision)

    def _state_from_kv(self, kv: Any, key: str, ignore_not_found: bool, revision: int) -> _State:
        if kv is None:
            if not ignore_not_found:
                raise NotFoundError(key, revision)
            return _State({}, b"", 0)
        return _State(self._decode(kv.value, kv.mod_revision), kv.value, kv.mod_revision)

    def _state_from_object(self, obj: dict[str, Any]) -> _State:
        # Re-encode the hint so that "unchanged" can be decided by comparing bytes (getStateFromObject).
        obj = copy.deepcopy(obj)
        rev = parse_resource_version((obj.get("metadata") or {}).get("resourceVersion"))
        return _State(obj, self.codec.encode(obj), rev)

    # ---- leases --------------------------------------------------------------------------------------
    async def _lease_for(self, ttl: Any) -> int:
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
            raise BadRequestError(f"ttl must be a non-negative integer of seconds, got {ttl!r}")
        return await self._leases.get_lease(ttl) if ttl else 0

    async def _grant_lease(self, ttl: int) -> int:
        return await self._client.run(self._client.lease_grant, ttl)

    # ---- watch ---------------------------------------------------------------------------------------
    def watch(self, key: str, opts: ListOptions = ListOptions()) -> Etcd3Watch:
        """Open a watch on ``key`` (a prefix when recursive) (etcd3/watcher.go Watch).

        Returns a BufferedWatch (capacity 100) that starts on ``async with`` / ``start()``. rv N>0:
        events with revision > N (no initial state; 410 ERROR event if N is compacted). rv 0 with
        send_initial_events None/True: the current state as ADDED events at one revision first (for a
        watch-list with bookmarks, then a BOOKMARK annotated k8s.io/initial-events-end); rv 0 with
        send_initial_events False: events after the current revision. DELETED events carry the previous
        object stamped with the deletion revision; selectors turn transitions into ADDED/DELETED.
        progress_notify: etcd progress notifications become BOOKMARKs. Raises BadRequestError /
        InvalidError for bad keys or options, StorageClosedError (503) when closed.
        """
        self._check_open()
        ekey = self._etcd_key(key, opts.recursive)
        validate_watch_options(opts)
        pred = opts.predicate
        target = WatchTarget(self._client, self._decode, None if pred.empty() else self._matcher(pred),
                             self._resource_key().encode(), self._observe_compaction, self._watches)
        range_end = prefix_end(ekey.encode()) if opts.recursive else b""
        return Etcd3Watch(target, ekey.encode(), range_end, opts, self.watch_capacity)

    async def request_watch_progress(self) -> None:
        """Ask etcd for a progress notification on every open watch stream of this storage
        (store.go RequestWatchProgress); they surface as BOOKMARKs on watches with progress_notify."""
        self._check_open()
        for watch in list(self._watches):
            watch.request_progress()

    # ---- misc ----------------------------------------------------------------------------------------
    def _resource_key(self) -> str:
        return self.path_prefix + self.resource.prefix[1:]

    async def stats(self) -> Stats:
        """Object count under the resource prefix (count-only range; etcd3/stats.go)."""
        self._check_open()
        prefix = (self._resource_key() + "/").encode()
        resp = await self._client.run(lambda: self._client.range(prefix, prefix_end(prefix), count_only=True))
        return Stats(object_count=resp.count)

    async def get_current_resource_version(self) -> int:
        """etcd's current revision, from a linearizable read of the (absent) key path_prefix+resource
        prefix (store.go GetCurrentResourceVersion)."""
        self._check_open()
        key = self._resource_key().encode()
        resp = await self._client.run(lambda: self._client.range(key, count_only=True))
        return resp.header.revision

    async def readiness_check(self) -> None:
        """Always ready while open (etcd health is probed separately); StorageClosedError after close."""
        self._check_open()

    def compact_revision(self) -> int:
        """Highest compaction revision this storage has observed (0 if none): from its own compact()
        calls, compacted watch streams, and lists that hit compaction (there etcd does not say the
        revision, so the read revision + 1 is recorded as a lower bound)."""
        return self._compacted

    def _observe_compaction(self, revision: int) -> None:
        # Called from watch threads too; a lost update could only keep a smaller lower bound.
        self._compacted = max(self._compacted, revision)

    async def lease_of(self, key: str) -> int:
        """Test hook: the id of the etcd lease attached to ``key`` (0 if none or the key is absent)."""
        self._check_open()
        resp = await self._client.run(self._client.range, self._etcd_key(key).encode())
        return resp.kvs[0].lease if resp.kvs else 0

    def new_compactor(self, interval: float = 300.0, *, key: str = "compact_rev_key"):
        """A periodic Compactor (storage/etcd3/compactor.py) sharing this storage's etcd connection;
        not started. Stop it before closing the storage."""
        from storage.etcd3.compactor import new_compactor
        return new_compactor(self, interval, key=key)

    async def compact(self, revision: int) -> None:
        """Physically compact etcd's history below ``revision`` (all resources: the keyspace is shared).

        Compacting to an already compacted revision is a no-op. Raises TooLargeResourceVersionError
        (504) for a future revision.
        """
        self._check_open()
        try:
            await self._client.run(self._client.compact, revision)
        except CompactedError:
            pass
        except FutureRevisionError:
            raise await self._too_large(revision) from None
        self._observe_compaction(revision)

    async def server_version(self) -> str:
        """The etcd server version (Status RPC), e.g. "3.5.1" — decides whether progress
        notifications are safe for consistent reads (reference 2.10)."""
        self._check_open()
        return (await self._client.run(self._client.status)).version
