"""Watch for the etcd3 backend: one raw gRPC Watch stream per watch, owned by one thread.

Mirrors k8s.io/apiserver pkg/storage/etcd3/watcher.go (watchChan): optional initial state as ADDED
events listed at one revision (plus the watch-list end BOOKMARK), then an etcd watch from the next
revision with previous values, event translation with selector transitions, progress notifications as
BOOKMARKs, and errors delivered in-band as one ERROR event followed by the end of the stream.

Why a thread and the raw stub: the gRPC client is synchronous, and the ``etcd3`` package's Watcher
drops server-side cancels (compaction!) and hides progress notifications. Each watch therefore owns a
``Watch`` bidi call fed by a request queue (create, progress requests on demand) and a thread that
iterates its responses. Each *whole* response (up to 1000 revisions) is decoded in the thread and
handed to the event loop in one hop with ``anyio.from_thread.run(watch.put, events)``; ``put`` waits
while the 100-event buffer is full, so a slow consumer blocks the thread and, through gRPC flow control,
etcd's stream — the backpressure kube-apiserver gets from its blocking channel sends.

Stopping cancels the gRPC call and unblocks the request iterator, so both the thread we start and the
gRPC thread that drains the request queue end; ``await watch.stop()`` returns after our thread ended.
"""

from __future__ import annotations

import queue
import random
import threading
from typing import Any, Callable, Iterator

import anyio
import anyio.from_thread
import anyio.lowlevel
import grpc
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from storage.errors import ExpiredError, InternalError, StorageError, TooLargeResourceVersionError
from storage.etcd3.client import EtcdClient
from storage.etcd3.lister import iter_snapshot
from storage.interface import INITIAL_EVENTS_END_ANNOTATION, EventType, ListOptions, WatchEvent
from storage.watch import BufferedWatch, filter_event

#: Events buffered per watch between the stream thread and the consumer (k8s resultChan: 100).
WATCH_CAPACITY = 100

_PUT = kv_pb2.Event.PUT
_DELETE = kv_pb2.Event.DELETE

Decode = Callable[[bytes, int], dict[str, Any]]
Matches = Callable[[dict[str, Any]], bool]


class WatchTarget:
    """What one watch needs from its storage, without reaching back into it.

    client: the EtcdClient; decode(bytes, rv) → object; matches: predicate on objects (None = all);
    current_revision_key: key for the linearizable "current revision" read; on_compacted(rev): told
    about compaction revisions seen on the stream; registry: the storage's set of open watches.
    """

    def __init__(self, client: EtcdClient, decode: Decode, matches: Matches | None,
                 current_revision_key: bytes, on_compacted: Callable[[int], None],
                 registry: set["Etcd3Watch"]) -> None:
        self.client = client
        self.decode = decode
        self.matches = matches
        self.current_revision_key = current_revision_key
        self.on_compacted = on_compacted
        self.registry = registry


def _drain(requests: "queue.Queue[Any]") -> Iterator[Any]:
    # gRPC pulls the next request from this iterator in its own thread; None ends the iterator (and
    # that thread) when the watch stops.
    while True:
        request = requests.get()
        if request is None:
            return
        yield request


def bookmark(revision: int, initial_events_end: bool = False) -> WatchEvent:
    """A BOOKMARK event at ``revision`` (optionally the watch-list "initial events end" marker)."""
    meta: dict[str, Any] = {"resourceVersion": str(revision)}
    if initial_events_end:
        meta["annotations"] = {INITIAL_EVENTS_END_ANNOTATION: "true"}
    return WatchEvent(EventType.BOOKMARK, {"metadata": meta})


class Etcd3Watch(BufferedWatch):
    """One watch on etcd (see module doc): a BufferedWatch fed by a dedicated stream thread.

    key / range_end: etcd key (or prefix with its range end; b"" for a single key). opts: validated
    ListOptions of the watch. The watch starts on ``start()`` / ``async with``; errors that happen
    before the stream exists (StorageClosedError, getting the current revision) raise from there, later
    ones arrive as one ERROR event.
    """

    def __init__(self, target: WatchTarget, key: bytes, range_end: bytes, opts: ListOptions,
                 capacity: int = WATCH_CAPACITY) -> None:
        super().__init__(capacity, on_start=self._open, on_stop=self._request_stop,
                         timeout_seconds=opts.timeout_seconds)
        self._target = target
        self._key = key
        self._range_end = range_end
        self._opts = opts
        self._token: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _stopping / _requests / _call between loop and thread
        self._stopping = False
        self._requests: "queue.Queue[Any] | None" = None
        self._call: Any = None

    # ---- event-loop side ---------------------------------------------------------------------------
    async def _open(self) -> None:
        client, opts = self._target.client, self._opts
        client.check_open()
        if self.stopped:  # stopped before it was started: nothing to open
            return
        self._token = anyio.lowlevel.current_token()
        rv = opts.revision
        initial = opts.send_initial_events if opts.send_initial_events is not None else rv == 0
        start_rev = 0
        if not initial:
            # Watch from rv means "events after rv"; sendInitialEvents=false with rv 0 means "from now".
            start_rev = rv + 1 if rv else (await client.run(self._current_revision)) + 1
        self._target.registry.add(self)
        self._thread = threading.Thread(target=self._run, args=(initial, start_rev), daemon=True,
                                        name=f"etcd3-watch {self._key.decode(errors='replace')}")
        self._thread.start()

    def _current_revision(self) -> int:
        return self._target.client.range(self._target.current_revision_key, count_only=True).header.revision

    def _request_stop(self) -> None:
        # on_stop runs on the event loop and must not block: the thread may be waiting for the loop.
        self._target.registry.discard(self)
        with self._lock:
            self._stopping = True
            requests, call = self._requests, self._call
        if requests is not None:
            requests.put(None)
        if call is not None:
            call.cancel()

    async def stop(self) -> None:
        """Stop the watch; returns once its stream thread has ended. Idempotent."""
        await super().stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            while thread.is_alive():
                await anyio.to_thread.run_sync(thread.join, 1.0)

    def request_progress(self) -> None:
        """Ask etcd for a progress notification on this stream (etcd RequestProgress).

        Dropped before the stream exists: a request that reached etcd before our create request would
        report a revision the initial state has not been brought up to.
        """
        with self._lock:
            if self._requests is not None and not self._stopping:
                self._requests.put(etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest()))

    # ---- stream thread -----------------------------------------------------------------------------
    def _run(self, initial: bool, start_rev: int) -> None:
        try:
            if initial:
                list_rev = self._send_initial_events()
                if list_rev is None:
                    return
                start_rev = list_rev + 1
            self._stream(start_rev)
        except StorageError as exc:
            self._finish(exc)
        except Exception as exc:  # a bug must still end the stream visibly, never hang the consumer
            self._finish(InternalError(f"etcd watch failed: {exc!r}"))

    def _send_initial_events(self) -> int | None:
        """List the current state at one revision and queue it as ADDED events. Returns the list
        revision, or None if the watch was stopped meanwhile."""
        opts, target = self._opts, self._target
        list_rev = 0
        for list_rev, kvs in iter_snapshot(target.client, self._key, self._range_end, lambda: self._stopping):
            if opts.revision > list_rev:
                # watcher.go: a watch-list from rv N needs a state at least as new as N; jittered retry.
                raise TooLargeResourceVersionError(opts.revision, list_rev,
                                                   retry_after_seconds=random.randint(1, 3))
            events = []
            for kv in kvs:
                event = filter_event(EventType.ADDED, target.decode(kv.value, kv.mod_revision), None,
                                     target.matches)
                if event is not None:
                    events.append(event)
            if events and not self._emit(events):
                return None
        if self._stopping:
            return None
        if opts.send_initial_events and opts.allow_watch_bookmarks:
            if not self._emit([bookmark(list_rev, initial_events_end=True)]):
                return None
        return list_rev

    def _stream(self, start_rev: int) -> None:
        create = etcdrpc.WatchCreateRequest(key=self._key, range_end=self._range_end,
                                            start_revision=start_rev, prev_kv=True,
                                            progress_notify=self._opts.progress_notify)
        requests: "queue.Queue[Any]" = queue.Queue()
        requests.put(etcdrpc.WatchRequest(create_request=create))
        with self._lock:
            if self._stopping:
                return
            self._call = call = self._target.client.open_watch_stream(_drain(requests))
            self._requests = requests
        try:
            self._consume(call)
        finally:
            requests.put(None)
            call.cancel()

    def _consume(self, call: Any) -> None:
        try:
            for resp in call:
                if not self._handle(resp):
                    return
        except grpc.RpcError as exc:
            if self._stopping:
                return
            raise InternalError(f"etcd watch stream failed ({exc.code().name}): {exc.details()}") from None
        if not self._stopping:
            raise InternalError("etcd closed the watch stream")

    def _handle(self, resp: Any) -> bool:
        """Process one WatchResponse; False ends the stream quietly (watch stopped)."""
        if resp.compact_revision > 0:
            self._target.on_compacted(resp.compact_revision)
            raise ExpiredError("The resourceVersion for the provided watch is too old.")
        if resp.canceled:
            if self._stopping:
                return False
            raise InternalError(f"etcd canceled the watch: {resp.cancel_reason or 'no reason given'}")
        if resp.created:
            return True
        if not resp.events:
            # A progress notification: everything up to header.revision has been sent on this stream.
            if self._opts.progress_notify:
                return self._emit([bookmark(resp.header.revision)])
            return True
        events = [e for e in map(self._convert, resp.events) if e is not None]
        return self._emit(events) if events else True

    def _convert(self, ev: Any) -> WatchEvent | None:
        """etcd event → WatchEvent (watcher.go parseEvent + transform), None when filtered out."""
        decode, matches, kv = self._target.decode, self._target.matches, ev.kv
        rev = kv.mod_revision
        created = ev.type == _PUT and kv.create_revision == rev
        if not created and not ev.HasField("prev_kv"):
            # E.g. the previous value was compacted away: we cannot tell what was deleted or changed.
            raise InternalError(f"etcd event received with PrevKv=nil (key={kv.key.decode(errors='replace')!r}, "
                                f"modRevision={rev}, type={'DELETE' if ev.type == _DELETE else 'PUT'})")
        if ev.type == _DELETE:
            # The deleted object is the previous value, stamped with the deletion revision.
            return filter_event(EventType.DELETED, decode(ev.prev_kv.value, rev), None, matches)
        obj = decode(kv.value, rev)
        if created:
            return filter_event(EventType.ADDED, obj, None, matches)
        prev = decode(ev.prev_kv.value, ev.prev_kv.mod_revision) if matches is not None else None
        return filter_event(EventType.MODIFIED, obj, prev, matches)

    def _emit(self, events: list[WatchEvent]) -> bool:
        """Hand a batch to the consumer (blocks while the buffer is full); False once stopped."""
        if self._stopping:
            return False
        try:
            return anyio.from_thread.run(self.put, events, token=self._token)
        except RuntimeError:  # the event loop is gone: nobody is left to read
            return False

    def _finish(self, error: StorageError) -> None:
        if self._stopping:
            return
        try:
            anyio.from_thread.run_sync(self.finish, error, token=self._token)
        except RuntimeError:
            pass
