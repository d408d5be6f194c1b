"""The periodic compactor (storage/compaction.py) beyond the conformance suite: lifecycle, errors, and
two compactors on separate etcd connections (as two apiserver processes) coordinating on one etcd."""

from __future__ import annotations

import uuid

import anyio
import pytest

from storage.compaction import CasResult, Compactor
from storage.etcd3.store import Etcd3Storage
from storage.interface import Resource
from storage.memory.store import MemoryStorage

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_interval_must_be_positive():
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            Compactor(object(), bad)  # type: ignore[arg-type]


async def test_start_stop_ends_the_task_and_is_idempotent():
    async with MemoryStorage(Resource("/pods")) as s:
        c = s.new_compactor(0.05)
        await c.start()
        with pytest.raises(RuntimeError):
            await c.start()
        await anyio.sleep(0.2)
        await c.stop()
        await c.stop()
        rounds = c.rounds
        assert rounds >= 2 and c.compactions >= 1
        await anyio.sleep(0.15)
        assert c.rounds == rounds  # the task really ended


async def test_failed_round_is_counted_and_retried_without_advancing():
    class Flaky:
        calls = 0

        async def compare_version_and_put(self, key, expected_version, value):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("etcd unavailable")
            return CasResult(True, 10 * self.calls, expected_version + 1)

        async def compact(self, revision):
            pass

    c = Compactor(Flaky(), 0.05)
    async with c:
        with anyio.fail_after(5):
            while c.compactions < 1:
                await anyio.sleep(0.01)
    assert c.errors == 1 and c.wins >= 2 and c.last_compacted == 20  # first win recorded rev 20


async def test_two_etcd_connections_coordinate(etcd_server):
    key = f"compact_rev_key/test-{uuid.uuid4().hex}"
    res = Resource(f"/c{uuid.uuid4().hex[:8]}")
    async with Etcd3Storage(res, [etcd_server.endpoint]) as a, Etcd3Storage(res, [etcd_server.endpoint]) as b:
        ca, cb = a.new_compactor(300, key=key), b.new_compactor(300, key=key)
        for _ in range(4):  # rounds alternate between processes; every round exactly one wins
            results = [await ca.run_once(), await cb.run_once()]
            assert sum(r.won for r in results) == 1
        assert ca.compactions + cb.compactions == 3  # the first round of the shared key never compacts
        assert ca.logical_time == cb.logical_time == 4
        assert a.compact_revision() == ca.last_compacted > 0
