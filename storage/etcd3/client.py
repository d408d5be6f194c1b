"""The etcd v3 connection of the etcd3 backend: gRPC channel, unary RPCs in worker threads, typed errors.

The ``etcd3`` package (python3-etcd3) provides the channel and generated stubs; we call the raw stubs
rather than the package's helpers because we need response headers (revisions), transactions that
compare mod revisions and return the current value on failure, ranges at a revision with limit / count,
and control over error handling (the helpers mark an endpoint "failed" for 5 minutes on one error).

Threads: every unary RPC is blocking, so async callers run it through ``run()``, i.e.
``anyio.to_thread.run_sync`` under a dedicated CapacityLimiter (16 threads by default), which keeps a
burst of storage calls from starving other users of anyio's default thread pool. Watch streams use their
own threads (watcher.py) and call the sync methods here directly.

Mirrors the parts of k8s.io/apiserver pkg/storage/etcd3 that talk to ``clientv3`` (``kubernetes.Interface``:
OptimisticPut / OptimisticDelete, Get/List, Lease.Grant, Compact, Status) and etcd3/errors.go.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, NamedTuple, Sequence, TypeVar
from urllib.parse import urlsplit

import anyio
import etcd3
import grpc
from etcd3 import etcdrpc

from storage.errors import (ExpiredError, InternalError, RequestEntityTooLargeError,
                            ServiceUnavailableError, StorageClosedError, StorageError, TimeoutError_,
                            TooLargeResourceVersionError, TooManyRequestsError)

T = TypeVar("T")

#: gRPC channel options. etcd batches up to 1000 revisions per watch response (tens of MB seen) and a
#: list page can be large, so the 4 MiB default receive limit would break both; Go's clientv3 uses
#: MaxInt32 too. Keepalive as kube-apiserver's etcd client (30 s / 10 s); pings only while calls are
#: active, because etcd's server rejects pings without streams by default. Reconnect backoff capped at
#: 2 s (gRPC's default grows to 120 s), so the storage recovers quickly after an etcd restart.
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

#: Metadata of clientv3.WithRequireLeader: etcd cancels the stream when its member loses the leader,
#: instead of leaving a watch silently stuck on a partitioned member.
REQUIRE_LEADER_METADATA = (("hasleader", "true"),)

#: Seconds an endpoint that answered UNAVAILABLE is skipped when others are configured.
ENDPOINT_RETRY_SECONDS = 2.0


class CompactedError(ExpiredError):
    """etcd "mvcc: required revision has been compacted" (410). Callers refine the message."""

    def __init__(self, message: str = "The resourceVersion for the provided list is too old.") -> None:
        super().__init__(message)


class FutureRevisionError(TooLargeResourceVersionError):
    """etcd "mvcc: required revision is a future revision". Callers fill in minimum/current (504)."""

    def __init__(self) -> None:
        super().__init__(0, 0, retry_after_seconds=0)


class _Stubs(NamedTuple):
    """The generated stubs bound to one channel."""

    channel: Any
    kv: Any
    lease: Any
    maintenance: Any
    watch: Any


def translate_rpc_error(exc: grpc.RpcError, closed: bool = False) -> StorageError:
    """Map a gRPC error from etcd to a typed storage error (etcd3/errors.go + HTTP mapping).

    compacted → CompactedError (410), future revision → FutureRevisionError (504), "request is too
    large" / message over the server limit → RequestEntityTooLargeError (413), UNAVAILABLE → 503,
    DEADLINE_EXCEEDED → TimeoutError_ (504), "too many requests" → 429, anything else → InternalError
    (500). ``closed``: the storage was closed meanwhile, so cancellations become StorageClosedError.
    """
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if closed:
        return StorageClosedError("etcd3 storage")
    if "required revision has been compacted" in details:
        return CompactedError()
    if "required revision is a future revision" in details:
        return FutureRevisionError()
    # etcd's own limit, or the gRPC server's receive limit (lowercase "received" is the Go server
    # refusing our request; Python's "Received ..." would be a response too large for the channel).
    if any(s in details for s in ("request is too large", "grpc: received message larger than max",
                                  "Sent message larger than max")):
        return RequestEntityTooLargeError(f"etcd refused the request as too large: {details}")
    if "too many requests" in details:
        return TooManyRequestsError(f"etcd: {details}", retry_after_seconds=1)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServiceUnavailableError(f"etcd is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError_(f"etcd request timed out: {details}")
    name = code.name if code is not None else "UNKNOWN"
    return InternalError(f"etcd request failed ({name}): {details}")


def prefix_end(prefix: bytes) -> bytes:
    """The end of the range of keys starting with ``prefix`` (clientv3.GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every byte was 0xff: etcd reads "\x00" as "to the end of the keyspace"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """"host:port" or "http://host:port" → (host, port). Raises ValueError for TLS or a bad form."""
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    parts = urlsplit(endpoint)
    if parts.scheme != "http":
        raise ValueError(f"unsupported etcd endpoint {endpoint!r}: only plain http endpoints are supported")
    if not parts.hostname or not parts.port:
        raise ValueError(f"invalid etcd endpoint {endpoint!r}: expected host:port")
    return parts.hostname, parts.port


def _make_etcd3_client(endpoints: Sequence[str]) -> etcd3.MultiEndpointEtcd3Client:
    eps = []
    for endpoint in endpoints:
        host, port = parse_endpoint(endpoint)
        eps.append(etcd3.Endpoint(host, port, secure=False, time_retry=ENDPOINT_RETRY_SECONDS,
                                  opts=GRPC_OPTIONS))
    if not eps:
        raise ValueError("at least one etcd endpoint is required")
    return etcd3.MultiEndpointEtcd3Client(endpoints=eps, failover=len(eps) > 1)


class EtcdClient:
    """One storage's connection to etcd (see module doc).

    endpoints: "host:port" strings (used when ``client`` is None; the channel is then owned and closed
        by ``release()``). client: an existing ``etcd3`` client whose channel to use (not closed here;
        give its channel GRPC_OPTIONS or >4 MiB responses fail). timeout: seconds per unary RPC.
    max_threads: worker threads for unary RPCs of this storage.
    """

    def __init__(self, endpoints: Sequence[str], client: Any = None, *, timeout: float = 30.0,
                 max_threads: int = 16) -> None:
        self._owned = client is None
        self._etcd = client if client is not None else _make_etcd3_client(endpoints)
        self.timeout = timeout
        self.max_threads = max_threads
        self._limiter: anyio.CapacityLimiter | None = None
        self._stubs: _Stubs | None = None
        self._stubs_lock = threading.Lock()
        self.closed = False  # set first on close, so new calls fail while watches wind down
        self._released = False

    # ---- lifecycle -----------------------------------------------------------------------------------
    def check_open(self) -> None:
        """Raise StorageClosedError (503) once closed."""
        if self.closed:
            raise StorageClosedError("etcd3 storage")

    def release(self) -> None:
        """Refuse further calls and close the gRPC channel (only if we created it). Idempotent."""
        self.closed = True
        if self._released:
            return
        self._released = True
        if self._owned:
            self._etcd.close()

    # ---- plumbing ------------------------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the blocking ``fn(*args)`` in a worker thread under this client's limiter."""
        self.check_open()
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.max_threads)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _current_stubs(self) -> _Stubs:
        # Stubs follow the etcd3 client's current endpoint, which moves after a failover.
        with self._stubs_lock:
            channel = self._etcd.channel
            if self._stubs is None or self._stubs.channel is not channel:
                self._stubs = _Stubs(channel, etcdrpc.KVStub(channel), etcdrpc.LeaseStub(channel),
                                     etcdrpc.MaintenanceStub(channel), etcdrpc.WatchStub(channel))
            return self._stubs

    def _call(self, pick: Callable[[_Stubs], Any], request: Any) -> Any:
        """Invoke one unary RPC (blocking) and translate its failure into a typed error."""
        self.check_open()
        try:
            method = pick(self._current_stubs())
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            self._note_failure(exc)
            raise translate_rpc_error(exc, self.closed) from None
        except etcd3.exceptions.NoServerAvailableError:
            raise ServiceUnavailableError("no etcd endpoint is available") from None
        except ValueError as exc:  # grpc: "Cannot invoke RPC on closed channel!"
            if self.closed:
                raise StorageClosedError("etcd3 storage") from None
            raise InternalError(f"etcd request failed: {exc}") from None

    def _note_failure(self, exc: grpc.RpcError) -> None:
        # With several endpoints, skip one that is unreachable for a moment; with one, keep retrying it.
        if len(getattr(self._etcd, "endpoints", {})) > 1 and exc.code() == grpc.StatusCode.UNAVAILABLE:
            try:
                self._etcd.endpoint_in_use.fail()
            except Exception:  # best effort: failover bookkeeping must never hide the real error
                pass

    def open_watch_stream(self, requests: Any) -> Any:
        """Open the bidi Watch RPC fed by the iterator ``requests``; returns the gRPC call object
        (iterate it for WatchResponses; ``cancel()`` ends it)."""
        self.check_open()
        return self._current_stubs().watch.Watch(requests, metadata=REQUIRE_LEADER_METADATA)

    # ---- unary RPCs (blocking; use from threads or through run()) --------------------------------------
    def range(self, key: bytes, range_end: bytes = b"", *, revision: int = 0, limit: int = 0,
              count_only: bool = False) -> Any:
        """Linearizable Range of ``[key, range_end)`` (only ``key`` when range_end is empty) at
        ``revision`` (0 = latest), at most ``limit`` kvs (0 = all). Returns the RangeResponse."""
        request = etcdrpc.RangeRequest(key=key, range_end=range_end, revision=revision, limit=limit,
                                       count_only=count_only)
        return self._call(lambda s: s.kv.Range, request)

    def optimistic_put(self, key: bytes, value: bytes, expected_rev: int, lease: int = 0,
                       get_on_failure: bool = True) -> tuple[bool, int, Any]:
        """Txn(If ModRevision(key) == expected_rev Then Put Else Get) — etcd client/v3/kubernetes
        OptimisticPut. expected_rev 0 means "key absent". Returns (succeeded, header revision, the
        current KeyValue or None on failure)."""
        put = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value, lease=lease))
        return self._optimistic(key, expected_rev, put, get_on_failure)

    def optimistic_delete(self, key: bytes, expected_rev: int) -> tuple[bool, int, Any]:
        """Txn(If ModRevision(key) == expected_rev Then Delete Else Get) — OptimisticDelete with
        GetOnFailure. Returns (succeeded, header revision, current KeyValue or None on failure)."""
        delete = etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))
        return self._optimistic(key, expected_rev, delete, True)

    def _optimistic(self, key: bytes, expected_rev: int, op: Any, get_on_failure: bool) -> tuple[bool, int, Any]:
        compare = etcdrpc.Compare(result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.MOD, key=key,
                                  mod_revision=expected_rev)
        failure = [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))] if get_on_failure else []
        resp = self._call(lambda s: s.kv.Txn,
                          etcdrpc.TxnRequest(compare=[compare], success=[op], failure=failure))
        current = None
        if not resp.succeeded and get_on_failure:
            kvs = resp.responses[0].response_range.kvs
            current = kvs[0] if kvs else None
        return resp.succeeded, resp.header.revision, current

    def compare_version_and_put(self, key: bytes, expected_version: int, value: bytes) -> tuple[bool, int, int]:
        """Txn(If Version(key) == expected_version Then Put(key, value) Else Get(key)) — the
        compactor's transaction (etcd3/compact.go). Returns (succeeded, header revision, the key's
        version after the txn: expected + 1 on success, the version found (0 if absent) on failure)."""
        compare = etcdrpc.Compare(result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.VERSION, key=key,
                                  version=expected_version)
        put = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value))
        get = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))
        resp = self._call(lambda s: s.kv.Txn, etcdrpc.TxnRequest(compare=[compare], success=[put], failure=[get]))
        if resp.succeeded:
            return True, resp.header.revision, expected_version + 1
        kvs = resp.responses[0].response_range.kvs
        return False, resp.header.revision, kvs[0].version if kvs else 0

    def lease_grant(self, ttl: int) -> int:
        """Grant a lease of ``ttl`` seconds; returns its id."""
        return self._call(lambda s: s.lease.LeaseGrant, etcdrpc.LeaseGrantRequest(TTL=ttl)).ID

    def compact(self, revision: int) -> int:
        """Physically compact history below ``revision``; returns the header revision."""
        request = etcdrpc.CompactionRequest(revision=revision, physical=True)
        return self._call(lambda s: s.kv.Compact, request).header.revision

    def status(self) -> Any:
        """Maintenance Status of the current endpoint (version, db size, leader, raft index)."""
        return self._call(lambda s: s.maintenance.Status, etcdrpc.StatusRequest())
