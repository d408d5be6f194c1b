"""TTL leases for the etcd3 backend, shared between objects written close together.

Mirrors k8s.io/apiserver pkg/storage/etcd3/lease_manager.go: granting one etcd lease per TTL'd object
(Events!) would flood etcd with leases, so a lease is reused for later objects as long as it still
outlives their TTL and does not outlive it by more than a reuse window, and carries at most
``max_objects`` objects. The reuse window is ``min(reuse_percent * ttl, reuse_seconds)`` (defaults 5 %
and 60 s, --lease-reuse-duration-seconds), and new leases are granted for ``ttl + window`` so that they
can be reused during that window.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable

import anyio

#: Largest number of objects attached to one lease (k8s defaultLeaseMaxObjectCount).
DEFAULT_MAX_OBJECTS = 1000


class LeaseManager:
    """Hands out lease ids for TTLs, reusing the previous lease when it fits (see module doc).

    grant: coroutine function ``grant(ttl_seconds) -> lease id`` (an etcd LeaseGrant).
    reuse_seconds / reuse_percent / max_objects: the reuse policy. clock: monotonic seconds.
    """

    def __init__(self, grant: Callable[[int], Awaitable[int]], *, reuse_seconds: int = 60,
                 reuse_percent: float = 0.05, max_objects: int = DEFAULT_MAX_OBJECTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._grant = grant
        self.reuse_seconds = reuse_seconds
        self.reuse_percent = reuse_percent
        self.max_objects = max_objects
        self._clock = clock
        self._lock: anyio.Lock | None = None
        self._lease_id = 0
        self._expires_at = 0.0
        self._attached = 0

    def reuse_window(self, ttl: int) -> int:
        """Seconds a lease for ``ttl`` may outlive it: min(percent of ttl, cap), whole seconds."""
        return min(int(self.reuse_percent * ttl), self.reuse_seconds)

    async def get_lease(self, ttl: int) -> int:
        """A lease id that expires between ``ttl`` and ``ttl + window`` seconds from now.

        Errors of the grant (typed storage errors) propagate; the previous lease stays cached.
        """
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:  # one grant at a time, so concurrent writers share the new lease
            now = self._clock()
            window = self.reuse_window(ttl)
            outlives = now + ttl < self._expires_at
            not_too_long = now + ttl + window > self._expires_at
            # Every request counts, successful write or not, as in lease_manager.go.
            self._attached += 1
            if outlives and not_too_long and self._attached <= self.max_objects:
                return self._lease_id
            lease_id = await self._grant(ttl + window)
            self._lease_id, self._expires_at, self._attached = lease_id, now + ttl + window, 1
            return lease_id
