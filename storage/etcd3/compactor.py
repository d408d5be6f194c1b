"""The etcd3 compactor: storage.compaction.Compactor over an etcd v3 client.

Mirrors k8s.io/apiserver pkg/storage/etcd3/compact.go: the coordination transaction compares the
*version* of the etcd key ``compact_rev_key`` (at the root of the keyspace, outside the path prefix, so
every apiserver process on one etcd shares it) and the winner calls etcd's Compact RPC. See
storage/compaction.py for the algorithm.

    async with new_compactor(storage, interval=300):   # storage: an Etcd3Storage
        ...
"""

from __future__ import annotations

from typing import Callable

from storage.compaction import COMPACT_REV_KEY, DEFAULT_COMPACT_INTERVAL, CasResult, Compactor
from storage.etcd3.client import CompactedError, EtcdClient


class Etcd3CompactorKV:
    """CompactorKV over an EtcdClient: unary RPCs in worker threads under the client's limiter.

    on_compacted(revision): told after each successful compaction (the storage's compact_revision()).
    """

    def __init__(self, client: EtcdClient, on_compacted: Callable[[int], None] | None = None) -> None:
        self._client = client
        self._on_compacted = on_compacted

    async def compare_version_and_put(self, key: str, expected_version: int, value: bytes) -> CasResult:
        """Txn(If version(key) == expected Then Put(key, value) Else Get(key)) for the Compactor."""
        ok, rev, version = await self._client.run(self._client.compare_version_and_put, key.encode(),
                                                  expected_version, value)
        return CasResult(ok, rev, version)

    async def compact(self, revision: int) -> None:
        """Compact the backend to ``revision``; an already compacted revision is a no-op."""
        try:
            await self._client.run(self._client.compact, revision)
        except CompactedError:
            pass  # someone compacted further already: the history below ``revision`` is gone anyway
        if self._on_compacted is not None:
            self._on_compacted(revision)


def new_compactor(storage, interval: float = DEFAULT_COMPACT_INTERVAL, *, key: str = COMPACT_REV_KEY
                  ) -> Compactor:
    """A Compactor for the etcd behind ``storage`` (an Etcd3Storage), sharing its connection.

    kube-apiserver runs one per etcd endpoint set per process (StartCompactorPerEndpoint); start it
    with ``async with`` and stop it before closing the storage.
    """
    return Compactor(Etcd3CompactorKV(storage._client, storage._observe_compaction), interval, key=key)
