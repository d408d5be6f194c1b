"""The cache's key-ordered store with secondary indexes.

Mirrors k8s.io/apiserver pkg/storage/cacher/store (threadedStoreIndexer): elements ordered by key for
prefix scans and pagination (a SortedDict stands in for the B-tree), plus indexes
``field -> value -> {key: element}`` for LISTs whose selector pins an indexed field (pods by
``spec.nodeName``). Each element keeps the labels and fields computed once at ingest, so selectors never
recompute them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from sortedcontainers import SortedDict


@dataclass(slots=True)
class Element:
    """One cached object: ``key``, the shared read-only ``object``, its precomputed ``labels`` and
    ``fields``, and its ``resource_version`` (int)."""

    key: str
    object: dict[str, Any]
    labels: Mapping[str, str]
    fields: Mapping[str, str]
    resource_version: int


class CacheStore:
    """Key-ordered elements plus exact-value indexes on ``index_fields``.

    Single writer (the reflector); readers run on the same event loop, so no locking is needed.
    """

    def __init__(self, index_fields: tuple[str, ...] = ()) -> None:
        self._items: SortedDict[str, Element] = SortedDict()
        self._index_fields = index_fields
        self._indexes: dict[str, dict[str, dict[str, Element]]] = {f: {} for f in index_fields}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Element | None:
        """The element at ``key`` or None."""
        return self._items.get(key)

    def upsert(self, elem: Element) -> Element | None:
        """Insert or replace ``elem``; returns the element it replaced (or None)."""
        old = self._items.get(elem.key)
        self._items[elem.key] = elem
        if self._index_fields:
            if old is not None:
                self._unindex(old)
            self._index(elem)
        return old

    def delete(self, key: str) -> Element | None:
        """Remove ``key``; returns the removed element (or None)."""
        old = self._items.pop(key, None)
        if old is not None and self._index_fields:
            self._unindex(old)
        return old

    def replace(self, elems: list[Element]) -> None:
        """Replace the whole content (after a relist)."""
        self._items = SortedDict((e.key, e) for e in elems)
        self._indexes = {f: {} for f in self._index_fields}
        for e in elems:
            self._index(e)

    def scan(self, prefix: str, start: str = "") -> Iterator[Element]:
        """Elements whose key starts with ``prefix``, in key order, from ``start`` (inclusive) on."""
        lo = max(prefix, start) if start else prefix
        for key in self._items.irange(lo):
            if not key.startswith(prefix):
                return
            yield self._items[key]

    def by_index(self, field: str, value: str) -> list[Element] | None:
        """Elements whose indexed ``field`` equals ``value``, in key order; None if not indexed."""
        index = self._indexes.get(field)
        if index is None:
            return None
        bucket = index.get(value)
        return [bucket[k] for k in sorted(bucket)] if bucket else []

    def keys(self) -> list[str]:
        """All keys in order."""
        return list(self._items)

    def _index(self, elem: Element) -> None:
        for f in self._index_fields:
            self._indexes[f].setdefault(elem.fields.get(f, ""), {})[elem.key] = elem

    def _unindex(self, elem: Element) -> None:
        for f in self._index_fields:
            value = elem.fields.get(f, "")
            bucket = self._indexes[f].get(value)
            if bucket is not None:
                bucket.pop(elem.key, None)
                if not bucket:  # empty buckets would leak one dict per value ever seen
                    del self._indexes[f][value]
