"""Measuring instruments: a Storage wrapper that counts upstream watches and events, percentiles, RSS.

``CountingStorage`` sits between the benchmark (or a Cacher) and the real storage backend, so every
watch the storage actually opens is counted, whoever opens it: with the cache that is one reflector
watch per resource; without it, one per watcher. It forwards every other call unchanged.
"""

from __future__ import annotations

import os
import resource as _resource
import time
from typing import Any, AsyncIterator

from storage.interface import EventType, ListOptions, WatchEvent


class CountingStorage:
    """Forwards to ``inner``; counts watches opened/held and the events they deliver.

    Attributes: ``opened`` (watches entered), ``active`` (open now), ``peak_active``, ``events``
    (ADDED/MODIFIED/DELETED delivered by storage watches), ``bookmarks``, ``errors`` (ERROR events),
    ``ended`` (streams that ended while their consumer still read them).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.resource = inner.resource
        self.opened = 0
        self.active = 0
        self.peak_active = 0
        self.events = 0
        self.bookmarks = 0
        self.errors = 0
        self.ended = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def __aenter__(self) -> "CountingStorage":
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inner.__aexit__(*exc)

    def watch(self, key: str, opts: ListOptions = ListOptions()) -> "CountingWatch":
        return CountingWatch(self, self.inner.watch(key, opts))


class CountingWatch:
    """A storage watch wrapped by CountingStorage (same protocol: context manager, batches, iterator)."""

    def __init__(self, owner: CountingStorage, inner: Any) -> None:
        self._owner = owner
        self._inner = inner
        self._open = False
        self._stopping = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def __aenter__(self) -> "CountingWatch":
        await self._inner.__aenter__()
        owner = self._owner
        owner.opened += 1
        owner.active += 1
        owner.peak_active = max(owner.peak_active, owner.active)
        self._open = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stopping = True
        self._close()
        await self._inner.stop()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._owner.active -= 1

    async def next_batch(self) -> list[WatchEvent]:
        batch = await self._inner.next_batch()
        owner = self._owner
        if not batch:
            if not self._stopping and self._open:
                owner.ended += 1
            self._close()
            return batch
        for ev in batch:
            t = ev.type
            if t is EventType.BOOKMARK:
                owner.bookmarks += 1
            elif t is EventType.ERROR:
                owner.errors += 1
            else:
                owner.events += 1
        return batch

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[WatchEvent]:
        while True:
            batch = await self.next_batch()
            if not batch:
                return
            for ev in batch:
                yield ev


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an already sorted list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def summarize_ms(seconds: list[float]) -> dict[str, Any]:
    """count, p50, p99, max, mean of durations given in seconds, reported in milliseconds."""
    values = sorted(seconds)
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    return {"count": len(values), "p50_ms": percentile(values, 50) * 1e3, "p99_ms": percentile(values, 99) * 1e3,
            "max_ms": values[-1] * 1e3, "mean_ms": sum(values) / len(values) * 1e3}


def peak_rss_self() -> int:
    """Peak resident set size of this process in bytes (getrusage; Linux reports KiB)."""
    peak = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


class RSSSampler:
    """Samples the RSS of this process and, optionally, another one (etcd) with psutil."""

    def __init__(self, other_pid: int | None = None) -> None:
        import psutil
        self._self = psutil.Process()
        self._other = None
        if other_pid:
            try:
                self._other = psutil.Process(other_pid)
            except psutil.Error:
                self._other = None
        self.self_peak = 0
        self.other_peak = 0
        self.other_first: int | None = None
        self.samples: list[tuple[float, int, int]] = []
        self._t0 = time.monotonic()

    def sample(self) -> None:
        import psutil
        rss = self._self.memory_info().rss
        other = 0
        if self._other is not None:
            try:
                other = self._other.memory_info().rss
            except psutil.Error:
                self._other = None
        self.self_peak = max(self.self_peak, rss)
        self.other_peak = max(self.other_peak, other)
        if other and self.other_first is None:
            self.other_first = other
        self.samples.append((round(time.monotonic() - self._t0, 2), rss, other))
