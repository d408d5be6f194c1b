"""An in-process MVCC key-value store with etcd's revision model.

One global revision counter shared by every resource stored in it; each key keeps its versions
(mod revision, create revision, value or tombstone) so reads at a past revision work until compaction;
an event log feeds watches from any revision after the compacted one; leases give keys a TTL.
It is the embedded default backend and the test double for fault injection (``stall_watches``,
``stall_current_watches``, ``resume_watches``, ``break_watches``, ``drop_progress``, ``inject_progress``,
``strip_prev_kv``, ``cancel_watch_creates``), modelled on etcd's mvcc package.

All methods are synchronous and never await, so each is atomic under cooperative scheduling: the
store is safe for any number of tasks on one event loop (it is not meant to be shared across threads).
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from sortedcontainers import SortedDict

from storage.errors import ExpiredError, InternalError, TooLargeResourceVersionError


@dataclass(slots=True)
class KeyValue:
    """One version of a key: ``value`` None marks a deletion (tombstone). ``version`` counts the
    writes since the key was (re)created, 1 for the first (etcd's KeyValue.version)."""

    key: str
    value: bytes | None
    mod_revision: int
    create_revision: int
    lease: int = 0
    version: int = 1


@dataclass(slots=True)
class Change:
    """One entry of the event log: ``kv`` after the change, ``prev`` before it (None on create)."""

    revision: int
    kv: KeyValue
    prev: KeyValue | None


@dataclass(slots=True)
class _Lease:
    ttl: float
    expires_at: float
    keys: set[str] = field(default_factory=set)


class WatchSink:
    """What the store pushes watch traffic into (implemented by the memory backend's watch).

    ``deliver(changes) -> bool`` returns False when it cannot take them now (buffer full): the store then
    stops pushing and the sink later pulls with ``MemoryKV.changes_since``, like etcd's unsynced watchers.
    """

    key_lo: str
    key_hi: str | None
    next_revision: int
    synced: bool

    def deliver(self, changes: list[Change]) -> bool:  # pragma: no cover - interface
        """Take ``changes`` (in revision order) now; False if they do not fit (the sink is unsynced)."""
        raise NotImplementedError

    def progress(self, revision: int) -> None:  # pragma: no cover - interface
        """A progress notification: every change up to ``revision`` has been delivered."""
        raise NotImplementedError

    def fail(self, error: Exception) -> None:  # pragma: no cover - interface
        """End the stream with ``error`` (e.g. ExpiredError when its revision was compacted)."""
        raise NotImplementedError


class MemoryKV:
    """The MVCC store. ``revision`` starts at 1 (like a fresh etcd) and grows by one per write.

    clock: monotonic seconds source for lease expiry (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.revision = 1
        self.compacted = 0
        self._clock = clock
        self._keys: SortedDict[str, list[KeyValue]] = SortedDict()
        self._log: list[Change] = []
        self._log_revs: list[int] = []
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self._sinks: set[WatchSink] = set()
        self.watch_stalled = False
        self.drop_progress = False
        # Fault hooks (tests): see the "fault hooks" section.
        self._stalled_sinks: set[WatchSink] = set()
        self.strip_prev_kv: set[str] = set()
        self.cancel_watch_creates = 0
        self.cancel_reason = "etcdserver: invalid auth token"

    # ---- reads -----------------------------------------------------------------------------------
    def check_revision(self, rev: int) -> None:
        """Raise ExpiredError below the compacted revision, TooLargeResourceVersionError above now."""
        if rev > self.revision:
            raise TooLargeResourceVersionError(rev, self.revision, retry_after_seconds=0)
        if 0 < rev < self.compacted:
            raise ExpiredError("The resourceVersion for the provided list is too old.")

    def get(self, key: str, rev: int = 0) -> KeyValue | None:
        """The live version of ``key`` at ``rev`` (0 = now), or None."""
        self.expire_leases()
        return self._at(key, rev or self.revision)

    def range(self, lo: str, hi: str | None, rev: int = 0, limit: int = 0) -> tuple[list[KeyValue], bool]:
        """Live versions of keys in ``[lo, hi)`` (hi None = only ``lo``) at ``rev`` (0 = now).

        Returns ``(kvs in key order, more)``; ``limit`` 0 = no limit. Raises like ``check_revision``.
        """
        self.expire_leases()
        self.check_revision(rev)
        at = rev or self.revision
        out: list[KeyValue] = []
        for key in self._iter_keys(lo, hi):
            kv = self._at(key, at)
            if kv is None:
                continue
            if limit and len(out) == limit:
                return out, True
            out.append(kv)
        return out, False

    def count(self, lo: str, hi: str | None) -> int:
        """Number of live keys in ``[lo, hi)`` now."""
        self.expire_leases()
        return sum(1 for key in self._iter_keys(lo, hi) if self._keys[key][-1].value is not None)

    def _iter_keys(self, lo: str, hi: str | None) -> Iterator[str]:
        if hi is None:
            return iter([lo] if lo in self._keys else [])
        return self._keys.irange(lo, hi, inclusive=(True, False))

    def _at(self, key: str, rev: int) -> KeyValue | None:
        versions = self._keys.get(key)
        if not versions:
            return None
        if versions[-1].mod_revision <= rev:
            kv = versions[-1]
        else:
            i = bisect.bisect_right([v.mod_revision for v in versions], rev) - 1
            if i < 0:
                return None
            kv = versions[i]
        return kv if kv.value is not None else None

    # ---- writes ----------------------------------------------------------------------------------
    def put_if(self, key: str, value: bytes, expected_mod_revision: int, lease: int = 0
               ) -> tuple[bool, int, KeyValue | None]:
        """Txn(If mod_revision(key) == expected Then Put Else Get).

        Returns ``(succeeded, header revision, kv)``: on success the written kv, else the current kv
        (None if missing). expected 0 means "key must not exist".
        """
        self.expire_leases()
        cur = self._at(key, self.revision)
        if (cur.mod_revision if cur else 0) != expected_mod_revision:
            return False, self.revision, cur
        if lease and lease not in self._leases:
            lease = 0
        self.revision += 1
        kv = KeyValue(key, value, self.revision, cur.create_revision if cur else self.revision, lease,
                      cur.version + 1 if cur else 1)
        self._write(kv, cur)
        return True, self.revision, kv

    def put_if_version(self, key: str, value: bytes, expected_version: int) -> tuple[bool, int, int]:
        """Txn(If Version(key) == expected Then Put Else Get) — the compactor's transaction.

        Returns ``(succeeded, header revision, the key's version after the txn)`` (0 if absent).
        """
        self.expire_leases()
        cur = self._at(key, self.revision)
        version = cur.version if cur else 0
        if version != expected_version:
            return False, self.revision, version
        ok, rev, kv = self.put_if(key, value, cur.mod_revision if cur else 0)
        assert ok and kv is not None
        return True, rev, kv.version

    def delete_if(self, key: str, expected_mod_revision: int) -> tuple[bool, int, KeyValue | None]:
        """Txn(If mod_revision(key) == expected Then Delete Else Get); on success kv is the previous one."""
        self.expire_leases()
        cur = self._at(key, self.revision)
        if cur is None or cur.mod_revision != expected_mod_revision:
            return False, self.revision, cur
        self.revision += 1
        self._write(KeyValue(key, None, self.revision, 0), cur)
        return True, self.revision, cur

    def _write(self, kv: KeyValue, prev: KeyValue | None) -> None:
        self._keys.setdefault(kv.key, []).append(kv)
        if prev is not None and prev.lease and prev.lease in self._leases and prev.lease != kv.lease:
            self._leases[prev.lease].keys.discard(kv.key)
        if kv.lease:
            self._leases[kv.lease].keys.add(kv.key)
        change = Change(self.revision, kv, prev)
        self._log.append(change)
        self._log_revs.append(self.revision)
        self._push([change])

    # ---- leases ----------------------------------------------------------------------------------
    def grant_lease(self, ttl: float) -> int:
        """Create a lease of ``ttl`` seconds; returns its id."""
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(ttl, self._clock() + ttl)
        return lease_id

    def lease_of(self, key: str) -> int:
        """Test hook: the lease id attached to the live ``key`` (0 if none or absent)."""
        kv = self._at(key, self.revision)
        return kv.lease if kv is not None else 0

    def lease_remaining(self, lease_id: int) -> float | None:
        """Seconds until the lease expires, or None if it no longer exists."""
        lease = self._leases.get(lease_id)
        return None if lease is None else lease.expires_at - self._clock()

    def expire_leases(self) -> None:
        """Delete the keys of every expired lease, one revision per key (etcd revokes the same way)."""
        if not self._leases:
            return
        now = self._clock()
        for lease_id in [i for i, lease in self._leases.items() if lease.expires_at <= now]:
            for key in sorted(self._leases.pop(lease_id).keys):
                cur = self._at(key, self.revision)
                if cur is not None and cur.lease == lease_id:
                    self.revision += 1
                    self._write(KeyValue(key, None, self.revision, 0), cur)

    # ---- compaction ------------------------------------------------------------------------------
    def compact(self, rev: int) -> None:
        """Drop history below ``rev``: reads and watches from ``rev`` on still work (etcd semantics).

        Raises ExpiredError if ``rev`` is already compacted, TooLargeResourceVersionError if in the future.
        """
        if rev <= self.compacted:
            raise ExpiredError(f"mvcc: required revision {rev} has been compacted")
        if rev > self.revision:
            raise TooLargeResourceVersionError(rev, self.revision, retry_after_seconds=0)
        for key in list(self._keys):
            versions = self._keys[key]
            keep_from = bisect.bisect_right([v.mod_revision for v in versions], rev) - 1
            kept = versions[max(keep_from, 0):]
            if kept and kept[0].value is None and kept[0].mod_revision <= rev:
                kept = kept[1:]
            if kept:
                self._keys[key] = kept
            else:
                del self._keys[key]
        cut = bisect.bisect_left(self._log_revs, rev)
        del self._log[:cut], self._log_revs[:cut]
        self.compacted = rev

    # ---- watches ---------------------------------------------------------------------------------
    def add_sink(self, sink: WatchSink) -> None:
        """Register a watch. Raises ExpiredError if its next revision is already compacted."""
        if sink.next_revision < self.compacted:
            raise ExpiredError("The resourceVersion for the provided watch is too old.")
        if self.cancel_watch_creates > 0:
            # Fault: etcd answers the create with created=true AND canceled=true (e.g. an expired auth
            # token); an adapter must treat that as an error, never as a healthy silent stream.
            self.cancel_watch_creates -= 1
            sink.fail(InternalError(f"etcd canceled the watch: {self.cancel_reason}"))
            return
        self._sinks.add(sink)
        sink.synced = False
        self.sync_sink(sink)

    def remove_sink(self, sink: WatchSink) -> None:
        """Unregister a watch (idempotent)."""
        self._sinks.discard(sink)
        self._stalled_sinks.discard(sink)

    def changes_since(self, sink: WatchSink, max_changes: int) -> list[Change]:
        """Up to ``max_changes`` log entries in the sink's range from its next revision on.

        Raises ExpiredError if that revision has been compacted away.
        """
        if sink.next_revision < self.compacted:
            raise ExpiredError("The resourceVersion for the provided watch is too old.")
        start = bisect.bisect_left(self._log_revs, sink.next_revision)
        out: list[Change] = []
        for change in itertools.islice(self._log, start, None):
            if _in_range(change.kv.key, sink.key_lo, sink.key_hi):
                out.append(change)
                if len(out) >= max_changes:
                    break
        return out

    def sync_sink(self, sink: WatchSink, batch: int = 1000) -> None:
        """Push pending history into an unsynced sink until it is caught up or its buffer is full."""
        if self.watch_stalled or sink not in self._sinks or sink in self._stalled_sinks:
            return
        while not sink.synced:
            try:
                changes = self.changes_since(sink, batch)
            except ExpiredError as exc:
                self._sinks.discard(sink)
                sink.fail(exc)
                return
            if not changes:
                sink.next_revision = self.revision + 1
                sink.synced = True
            elif not sink.deliver(self._apply_faults(changes)):
                return

    def _push(self, changes: list[Change]) -> None:
        if self.watch_stalled:
            return
        for sink in list(self._sinks):
            if not sink.synced:
                continue
            mine = [c for c in changes if _in_range(c.kv.key, sink.key_lo, sink.key_hi)]
            if mine and not sink.deliver(self._apply_faults(mine)):
                sink.synced = False
            else:
                sink.next_revision = self.revision + 1

    def request_progress(self) -> None:
        """Send a progress notification (current revision) to every synced watch (etcd RequestProgress)."""
        if self.watch_stalled or self.drop_progress:
            return
        for sink in list(self._sinks):
            if sink.synced and sink not in self._stalled_sinks:
                sink.progress(self.revision)

    # ---- fault hooks -----------------------------------------------------------------------------
    def stall_watches(self) -> None:
        """Fault: keep every watch stream open but deliver nothing (no events, no progress)."""
        self.watch_stalled = True
        for sink in self._sinks:
            sink.synced = False

    def resume_watches(self) -> None:
        """End a stall: every watch catches up from the log."""
        self.watch_stalled = False
        self._stalled_sinks.clear()
        for sink in list(self._sinks):
            self.sync_sink(sink)

    def stall_current_watches(self) -> None:
        """Fault: the watch streams open *now* stay open but deliver nothing (no events, no progress),
        while storage stays healthy and watches opened later work normally (a client attached to a
        member that cannot serve, kubernetes#97294). ``resume_watches`` ends it."""
        for sink in self._sinks:
            self._stalled_sinks.add(sink)
            sink.synced = False

    def inject_progress(self, revision: int) -> None:
        """Fault: send a progress notification with ``revision`` to every open watch now, ignoring
        whether it has been sent the events up to there (etcd#15220: progress ahead of or behind the
        event stream). Reaches stalled watches too."""
        for sink in list(self._sinks):
            sink.progress(revision)

    def _apply_faults(self, changes: list[Change]) -> list[Change]:
        if not self.strip_prev_kv:
            return changes
        out = []
        for c in changes:
            if c.kv.value is None and c.kv.key in self.strip_prev_kv:
                # Fault (one-shot per key): a DELETE delivered without its previous value (no prev_kv).
                self.strip_prev_kv.discard(c.kv.key)
                c = Change(c.revision, c.kv, None)
            out.append(c)
        return out

    def break_watches(self, error: Exception) -> None:
        """Fault: end every open watch stream with ``error`` (a dropped connection or server cancel)."""
        sinks, self._sinks = list(self._sinks), set()
        for sink in sinks:
            sink.fail(error)


def _in_range(key: str, lo: str, hi: str | None) -> bool:
    return key == lo if hi is None else lo <= key < hi


def prefix_end(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix`` (clientv3 GetPrefixRangeEnd)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
