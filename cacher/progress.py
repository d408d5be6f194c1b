"""Progress requests for consistent reads from cache.

Mirrors k8s.io/apiserver pkg/storage/cacher/progress/watch_progress.go (ConditionalProgressRequester)
and pkg/storage/feature/feature_support_checker.go: while any read waits for the cache to reach a
revision, ask storage for a progress notification every 100 ms; and serve consistent reads from the
cache only when the backend delivers progress notifications safely (etcd 3.4.31+ or 3.5.13+, where
etcd bugs #15220 and #17507 are fixed; the in-memory backend always does).
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import anyio

from storage.errors import StorageError
from storage.interface import Storage

log = logging.getLogger(__name__)


def progress_notify_is_safe(version: str) -> bool:
    """True if a backend of this version may serve consistent reads from cache.

    ``version`` is what ``server_version()`` returns: "memory" for the in-memory backend, or an etcd
    version like "3.5.13". etcd 3.4.31+ and 3.5.13+ (and any later minor or major) are safe; anything
    unparsable is not.
    """
    if version == "memory":
        return True
    m = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", version or "")
    if not m:
        return False
    major, minor, patch = (int(x) for x in m.groups())
    if (major, minor) == (3, 4):
        return patch >= 31
    if (major, minor) == (3, 5):
        return patch >= 13
    return (major, minor) > (3, 5)


async def detect_consistent_read_support(storage: Storage) -> bool:
    """Ask ``storage`` for its server version and apply ``progress_notify_is_safe``; False if the
    storage cannot tell (no ``server_version``) or the call fails."""
    probe = getattr(storage, "server_version", None)
    if probe is None:
        return False
    try:
        version = await probe()
    except StorageError as exc:
        log.warning("cannot detect storage version, consistent reads will be delegated: %s", exc)
        return False
    return progress_notify_is_safe(version)


class ProgressRequester:
    """Calls ``storage.request_watch_progress()`` every ``interval`` seconds while ``waiting()`` > 0
    and ``enabled()``: only where progress notifications are safe, since an early one (etcd #15220)
    would let the cache claim a revision whose events it has not applied yet."""

    def __init__(self, storage: Storage, waiting: Callable[[], int], interval: float = 0.1,
                 enabled: Callable[[], bool] = lambda: True) -> None:
        self.storage, self.waiting, self.interval, self.enabled = storage, waiting, interval, enabled
        self.requests = 0

    async def run(self) -> None:
        """Loop until cancelled."""
        while True:
            await anyio.sleep(self.interval)
            if self.waiting() and self.enabled():
                self.requests += 1
                try:
                    await self.storage.request_watch_progress()
                except StorageError as exc:
                    log.debug("progress request failed: %s", exc)
