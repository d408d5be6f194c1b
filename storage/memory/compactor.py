"""The in-memory compactor: storage.compaction.Compactor over a MemoryKV.

The same algorithm as kube-apiserver's etcd compactor (etcd3/compact.go; see storage/compaction.py):
the coordination key ``compact_rev_key`` lives in the MemoryKV's keyspace, outside every resource
prefix, so several compactors over one MemoryKV (e.g. several "apiservers" in one process) coordinate
exactly as they would on one etcd.
"""

from __future__ import annotations

from storage.compaction import COMPACT_REV_KEY, DEFAULT_COMPACT_INTERVAL, CasResult, Compactor
from storage.memory.mvcc import MemoryKV


class MemoryCompactorKV:
    """CompactorKV over a MemoryKV (synchronous and atomic under cooperative scheduling)."""

    def __init__(self, kv: MemoryKV) -> None:
        self._kv = kv

    async def compare_version_and_put(self, key: str, expected_version: int, value: bytes) -> CasResult:
        """Txn(If version(key) == expected Then Put(key, value) Else Get(key)) for the Compactor."""
        ok, rev, version = self._kv.put_if_version(key, value, expected_version)
        return CasResult(ok, rev, version)

    async def compact(self, revision: int) -> None:
        """Compact the backend to ``revision``; an already compacted revision is a no-op."""
        if revision > self._kv.compacted:  # an already compacted revision is a no-op, as with etcd3
            self._kv.compact(revision)


def new_compactor(storage, interval: float = DEFAULT_COMPACT_INTERVAL, *, key: str = COMPACT_REV_KEY
                  ) -> Compactor:
    """A Compactor for the MemoryKV behind ``storage`` (a MemoryStorage)."""
    return Compactor(MemoryCompactorKV(storage.kv), interval, key=key)
