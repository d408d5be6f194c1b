"""Paged, revision-pinned reads of a key range: the engine of GetList and of a watch's initial state.

Mirrors the paging loop of k8s.io/apiserver pkg/storage/etcd3/store.go (GetList, pagedChunks) and
watcher.go (syncPaginated): the first page is read at the requested revision (or the latest), and every
later page is pinned to the first page's header revision, so the pages form one consistent snapshot. A
range is never read unbounded: without a limit it is read in pages of MAX_PAGE keys, so a prefix of
any size lists without one huge gRPC message.

These functions block (gRPC); run them in a worker thread (``EtcdClient.run``) or a watch thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from storage.errors import TooLargeResourceVersionError

#: Largest page read from etcd in one Range (k8s maxLimit / defaultWatcherMaxLimit).
MAX_PAGE = 10000

Decode = Callable[[bytes, int], dict[str, Any]]
Keep = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class ListRequest:
    """One list read.

    start: first key (the prefix, or a continue key); range_end: b"" for a single key.
    revision: read at exactly this revision (0 = latest, then pinned). limit: wanted matches (0 = all).
    min_revision: NotOlderThan bound checked against every page's header (0 = none).
    keep: predicate on decoded objects (None = keep all).
    """

    start: bytes
    range_end: bytes
    revision: int = 0
    limit: int = 0
    min_revision: int = 0
    keep: Keep | None = None


@dataclass
class ListChunk:
    """The outcome of read_list: ``items`` (decoded, filtered), the snapshot ``revision``, the
    ``last_key`` examined (None if none), ``has_more`` (keys remain after last_key) and ``count``
    (etcd's count of keys from the start of the last page read to the range end)."""

    items: list[dict[str, Any]]
    revision: int
    last_key: bytes | None
    has_more: bool
    count: int


def _check_min_revision(min_revision: int, header_revision: int) -> None:
    # store.go validateMinimumResourceVersion: etcd3 reads answer "retry after 0 s".
    if min_revision > header_revision:
        raise TooLargeResourceVersionError(min_revision, header_revision, retry_after_seconds=0)


def read_list(client: Any, req: ListRequest, decode: Decode) -> ListChunk:
    """Read up to ``req.limit`` matching objects (all when 0) as one snapshot.

    Pages that selectors thin out are followed by bigger pages (doubling up to MAX_PAGE) until the
    limit is met or the range ends. Raises the client's typed errors (CompactedError,
    FutureRevisionError, ...) and TooLargeResourceVersionError for the NotOlderThan bound.
    """
    page = req.limit if req.limit > 0 else MAX_PAGE
    start, revision = req.start, req.revision
    items: list[dict[str, Any]] = []
    last_key: bytes | None = None
    while True:
        resp = client.range(start, req.range_end, revision=revision, limit=page)
        _check_min_revision(req.min_revision, resp.header.revision)
        revision = revision or resp.header.revision
        has_more = resp.more
        for kv in resp.kvs:
            if req.limit and len(items) >= req.limit:
                has_more = True  # the bucket is full while this page still has keys
                break
            last_key = kv.key
            obj = decode(kv.value, kv.mod_revision)
            if req.keep is None or req.keep(obj):
                items.append(obj)
        if not has_more or (req.limit and len(items) >= req.limit):
            return ListChunk(items, revision, last_key, has_more, resp.count)
        if page < MAX_PAGE:
            page = min(page * 2, MAX_PAGE)  # selectors dropped objects: fetch more per round trip
        start = last_key + b"\x00"  # type: ignore[operator]


def iter_snapshot(client: Any, start: bytes, range_end: bytes,
                  should_stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[int, list[Any]]]:
    """Yield ``(revision, kvs)`` pages of ``[start, range_end)`` at one revision (the first page's).

    Stops early when ``should_stop()`` turns true between pages. Raises the client's typed errors.
    """
    revision = 0
    while not should_stop():
        resp = client.range(start, range_end, revision=revision, limit=MAX_PAGE)
        revision = revision or resp.header.revision
        yield revision, list(resp.kvs)
        if not resp.more or not resp.kvs:
            return
        start = resp.kvs[-1].key + b"\x00"
