"""The periodic compactor shared by the backends: Kubernetes' etcd3 compactor over a small "kv" adapter.

Mirrors k8s.io/apiserver pkg/storage/etcd3/compact.go (``compactor`` / ``compact``), started by
kube-apiserver once per etcd endpoint set (storagebackend/factory/etcd3.go ``startCompactorOnce``) with
``--etcd-compaction-interval`` (default 5 minutes). Every ``interval`` seconds each compactor runs one
transaction on the shared key ``compact_rev_key``::

    Txn(If Version(compact_rev_key) == local_logical_time
        Then Put(compact_rev_key, current_revision)
        Else Get(compact_rev_key))

The key's *version* (number of writes since it was created) is a logical clock shared by every
compactor (every apiserver process) on one etcd:

* the winner (its logical time was current) bumps its logical time to the new version and compacts to
  the revision it recorded at its **previous** round, so history between one and two intervals old is
  always kept (in normal operation exactly one interval; after a failover between one and two);
* a loser adopts the key's version as its logical time and compacts nothing this round;
* the first round never compacts (nothing was recorded yet).

Each round also records the header revision of the transaction as the next round's compaction target
(winners and losers alike, as compact.go does); a failed transaction keeps the previous logical time and
revision. Because a put bumps the version, only one compactor per round can see a matching version, so
several processes never both compact in one round. Errors are logged and retried next interval.

Backends plug in through ``CompactorKV``: the etcd3 adapter is in storage/etcd3/compactor.py, the
in-memory one in storage/memory/compactor.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.abc import TaskGroup

log = logging.getLogger(__name__)

#: The shared coordination key (compact.go compactRevKey). kube-apiserver writes it at the root of the
#: etcd keyspace, outside --etcd-prefix, so every apiserver on one etcd shares it.
COMPACT_REV_KEY = "compact_rev_key"

#: Default seconds between rounds (storagebackend.DefaultCompactInterval, 5 minutes).
DEFAULT_COMPACT_INTERVAL = 300.0


@dataclass(frozen=True, slots=True)
class CasResult:
    """Outcome of the compare-version-and-put transaction.

    succeeded: the version matched and the put happened. revision: the transaction's header revision
    (the store's current revision). version: the key's version after the transaction (on success the
    new version; on failure the version found, 0 if the key does not exist).
    """

    succeeded: bool
    revision: int
    version: int


class CompactorKV(Protocol):
    """What a compactor needs from a backend (all async)."""

    async def compare_version_and_put(self, key: str, expected_version: int, value: bytes) -> CasResult:
        """Txn(If Version(key) == expected_version Then Put(key, value) Else Get(key))."""
        ...

    async def compact(self, revision: int) -> None:
        """Compact the store's history below ``revision``; compacting an already compacted revision
        must not raise."""
        ...


@dataclass(frozen=True, slots=True)
class RoundResult:
    """What one round did: ``won`` the transaction, and ``compacted`` to that revision (0 = none)."""

    won: bool
    compacted: int
    logical_time: int
    revision: int


class Compactor:
    """Periodic, multi-process-safe compaction of one backend (see module doc).

    kv: the backend adapter (``CompactorKV``). interval: seconds between rounds (default 300; must be
    > 0 — kube-apiserver disables compaction with 0 by not starting a compactor at all).
    key: the coordination key (default ``compact_rev_key``; tests may isolate themselves with another).

    Run it as ``async with Compactor(kv, interval=...):`` (a background task, cancelled on exit), with
    ``await compactor.start()`` / ``await compactor.stop()`` from one task, or as ``await
    compactor.run()`` inside your own task group. ``run_once()`` runs one round now (no waiting).

    Counters for observability and tests: ``rounds``, ``wins``, ``compactions``, ``errors``,
    ``last_compacted`` (latest revision this compactor compacted to), ``logical_time``, ``revision``
    (the revision recorded for the next win).
    """

    def __init__(self, kv: CompactorKV, interval: float = DEFAULT_COMPACT_INTERVAL, *,
                 key: str = COMPACT_REV_KEY) -> None:
        if not interval > 0 or math.isinf(interval):
            raise ValueError(f"compaction interval must be a positive number of seconds, got {interval!r}")
        self.kv = kv
        self.interval = float(interval)
        self.key = key
        self.logical_time = 0
        self.revision = 0
        self.rounds = 0
        self.wins = 0
        self.compactions = 0
        self.errors = 0
        self.last_compacted = 0
        self._tg: TaskGroup | None = None

    async def run_once(self) -> RoundResult:
        """One round of compact.go ``compact``: the transaction, then (winner only) the compaction.

        Raises the backend's error if the transaction fails (logical time and revision unchanged). A
        failed compaction after a won transaction still advances both (as compact.go does) and raises.
        """
        self.rounds += 1
        res = await self.kv.compare_version_and_put(self.key, self.logical_time, str(self.revision).encode())
        target = self.revision
        self.revision = res.revision
        if not res.succeeded:
            self.logical_time = res.version  # someone else won: adopt the shared logical time
            return RoundResult(False, 0, self.logical_time, self.revision)
        self.logical_time += 1
        self.wins += 1
        if target == 0:
            return RoundResult(True, 0, self.logical_time, self.revision)  # bootstrap: never compact
        await self.kv.compact(target)
        self.compactions += 1
        self.last_compacted = max(self.last_compacted, target)
        log.debug("compacted to revision %d (logical time %d)", target, self.logical_time)
        return RoundResult(True, target, self.logical_time, self.revision)

    async def run(self) -> None:
        """Run rounds every ``interval`` seconds until cancelled (compact.go ``compactor``)."""
        while True:
            await anyio.sleep(self.interval)
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001 - logged and retried next interval, as compact.go
                self.errors += 1
                log.warning("compaction round failed (key %r): %s", self.key, exc)

    async def start(self) -> "Compactor":
        """Start the background task (pair with ``stop()`` in the same task)."""
        if self._tg is not None:
            raise RuntimeError("compactor already started")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self.run)
        return self

    async def stop(self) -> None:
        """Cancel the background task and wait for it to end. Idempotent."""
        tg, self._tg = self._tg, None
        if tg is None:
            return
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)

    async def __aenter__(self) -> "Compactor":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
