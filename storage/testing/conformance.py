"""The storage conformance suite: every Kubernetes storage semantic, for any Storage.

Mirrors k8s.io/apiserver pkg/storage/testing (store_tests.go, watcher_tests.go), which every
storage.Interface implementation (etcd3 store, cacher) must pass. To run it against a backend, subclass
``StorageConformance`` in a pytest module and provide a ``target`` fixture returning a ``Target``:

    class TestMyBackend(StorageConformance):
        @pytest.fixture
        def target(self):
            return Target("mine", open=my_open)   # my_open(resource) -> async context manager

``Target.open(resource)`` yields ``(storage, raw)``: ``storage`` is the Storage under test, ``raw`` the
underlying backend with ``compact(revision)`` (the same object when not wrapped). ``cached`` marks
Cacher targets, where the differences Kubernetes documents apply (see ``CACHE_DIFFERENCES``).
"""

from __future__ import annotations

import itertools
import uuid
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Callable

import anyio
import pytest

from storage.errors import (AlreadyExistsError, BadRequestError, ExpiredError, InvalidError,
                            NotFoundError, PreconditionFailedError, RequestEntityTooLargeError,
                            StorageClosedError, TooLargeResourceVersionError)
from storage.interface import (INITIAL_EVENTS_END_ANNOTATION, EventType, GetOptions, ListOptions,
                               Preconditions, Resource, Storage, WatchEvent)

#: Where a Cacher legitimately differs from the storage it wraps (reference sections 1.3 and 3.7).
CACHE_DIFFERENCES = {
    "rv0_may_be_stale": "GET/LIST with resourceVersion \"0\" may return an older state than storage.",
    "watch_history_window": "A watch from a resourceVersion older than the cache's history (at the latest "
                            "its list revision) gets 410 even when storage still has that revision.",
    "progress_not_forwarded": "Storage progress notifications are never forwarded to cache watchers; they "
                              "get bookmarks from the cache's own timer instead.",
    "too_large_rv_waits": "A read at a resourceVersion ahead of the cache waits up to the freshness "
                          "timeout (3 s by default) before 504, with Retry-After 1 s instead of 0.",
}


@dataclass
class Target:
    """A storage under test: ``open(resource)`` is an async context manager yielding (storage, raw)."""

    name: str
    open: Callable[[Resource], AbstractAsyncContextManager[tuple[Storage, Any]]]
    cached: bool = False


_counter = itertools.count()


def fresh_resource(**kw: Any) -> Resource:
    """A pods-like Resource under a unique prefix, so tests sharing one etcd never collide."""
    prefix = f"/t{next(_counter)}x{uuid.uuid4().hex[:6]}"
    kw.setdefault("field_paths", ("spec.nodeName", "status.phase"))
    return Resource(prefix, **kw)


def pod(res: Resource, name: str, ns: str = "ns", node: str = "", labels: dict | None = None,
        **extra: Any) -> dict[str, Any]:
    """A small Pod-shaped object for ``res``."""
    obj = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": labels or {}},
           "spec": {"nodeName": node}, "status": {"phase": "Pending"}}
    obj.update(extra)
    return obj


def key(res: Resource, name: str, ns: str = "ns") -> str:
    return f"{res.prefix}/{ns}/{name}"


def rv_of(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


async def collect(watch, count: int, timeout: float = 5.0) -> list[WatchEvent]:
    """Up to ``count`` events (BOOKMARKs excluded unless asked for) within ``timeout`` seconds."""
    out: list[WatchEvent] = []
    with anyio.move_on_after(timeout):
        while len(out) < count:
            batch = await watch.next_batch()
            if not batch:
                break
            out.extend(batch)
    return out


async def collect_until_quiet(watch, quiet: float = 0.5) -> list[WatchEvent]:
    """Every event until none arrives for ``quiet`` seconds or the stream ends."""
    out: list[WatchEvent] = []
    while True:
        with anyio.move_on_after(quiet) as scope:
            batch = await watch.next_batch()
        if scope.cancel_called or not batch:
            return out
        out.extend(batch)


def summary(events: list[WatchEvent]) -> list[tuple[str, str, int]]:
    return [(e.type.value, e.object["metadata"].get("name", ""), e.resource_version)
            for e in events if e.type is not EventType.BOOKMARK]


class StorageConformance:
    """The suite. Subclasses provide the ``target`` fixture."""

    @pytest.fixture
    async def env(self, target: Target):
        res = fresh_resource()
        async with target.open(res) as (storage, raw):
            yield storage, raw, res, target

    # ---------------------------------------------------------------- create
    async def test_create_returns_object_with_resource_version(self, env):
        s, _, res, _ = env
        out = await s.create(key(res, "a"), pod(res, "a"))
        assert rv_of(out) > 0
        got = await s.get(key(res, "a"), GetOptions(resource_version=str(rv_of(out))))
        assert got["metadata"]["resourceVersion"] == out["metadata"]["resourceVersion"]
        assert got["spec"] == {"nodeName": ""}

    async def test_create_existing_key_is_409(self, env):
        s, _, res, _ = env
        first = await s.create(key(res, "a"), pod(res, "a"))
        with pytest.raises(AlreadyExistsError) as err:
            await s.create(key(res, "a"), pod(res, "a", node="other"))
        assert err.value.status == 409
        got = await s.get(key(res, "a"))
        assert got["spec"]["nodeName"] == "" and rv_of(got) == rv_of(first)

    async def test_create_with_resource_version_set_is_rejected(self, env):
        s, _, res, _ = env
        obj = pod(res, "a")
        obj["metadata"]["resourceVersion"] = "5"
        with pytest.raises(BadRequestError):
            await s.create(key(res, "a"), obj)
        assert await s.get(key(res, "a"), GetOptions(ignore_not_found=True)) is None

    async def test_create_ttl_expires_with_deleted_event(self, env):
        s, _, res, _ = env
        start = await s.get_current_resource_version()
        async with s.watch(res.prefix, ListOptions(resource_version=str(start), recursive=True)) as w:
            created = await s.create(key(res, "ttl"), pod(res, "ttl"), ttl=2)
            events = await collect(w, 2, timeout=15)
        assert summary(events)[0] == ("ADDED", "ttl", rv_of(created))
        assert [e.type for e in events] == [EventType.ADDED, EventType.DELETED]
        assert events[1].resource_version > rv_of(created)
        assert await s.get(key(res, "ttl"), GetOptions(ignore_not_found=True)) is None

    async def test_create_oversized_object_is_413_and_nothing_written(self, env):
        s, _, res, _ = env
        big = pod(res, "big", data={"blob": "x" * (1536 * 1024 + 10)})
        with pytest.raises(RequestEntityTooLargeError) as err:
            await s.create(key(res, "big"), big)
        assert err.value.status == 413
        assert await s.get(key(res, "big"), GetOptions(ignore_not_found=True)) is None

    async def test_create_non_json_object_is_400_and_nothing_written(self, env):
        s, _, res, _ = env
        with pytest.raises(BadRequestError):
            await s.create(key(res, "bad"), pod(res, "bad", data={"when": object()}))
        assert await s.get(key(res, "bad"), GetOptions(ignore_not_found=True)) is None

    # ---------------------------------------------------------------- get
    async def test_get_not_found_is_404_or_none(self, env):
        s, _, res, _ = env
        with pytest.raises(NotFoundError) as err:
            await s.get(key(res, "missing"))
        assert err.value.status == 404
        assert await s.get(key(res, "missing"), GetOptions(ignore_not_found=True)) is None

    async def test_get_resource_version_unset_zero_and_not_older_than(self, env):
        s, _, res, target = env
        v1 = await s.create(key(res, "a"), pod(res, "a"))
        v2 = await s.guaranteed_update(key(res, "a"), lambda o, m: {**o, "status": {"phase": "Running"}})
        assert rv_of(v2) > rv_of(v1)
        assert rv_of(await s.get(key(res, "a"))) == rv_of(v2)
        assert rv_of(await s.get(key(res, "a"), GetOptions(resource_version=str(rv_of(v2))))) == rv_of(v2)
        older_ok = await s.get(key(res, "a"), GetOptions(resource_version=str(rv_of(v1))))
        assert rv_of(older_ok) >= rv_of(v1)
        any_rv = await s.get(key(res, "a"), GetOptions(resource_version="0"), ) if not target.cached else None
        if any_rv is not None:
            assert rv_of(any_rv) == rv_of(v2)

    async def test_get_too_large_resource_version_is_504_with_retry_after(self, env):
        s, _, res, _ = env
        await s.create(key(res, "a"), pod(res, "a"))
        current = await s.get_current_resource_version()
        with pytest.raises(TooLargeResourceVersionError) as err:
            await s.get(key(res, "a"), GetOptions(resource_version=str(current + 1000)))
        assert err.value.status == 504 and err.value.retry_after_seconds is not None
        assert err.value.to_status()["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"

    # ---------------------------------------------------------------- list
    async def test_list_exact_key_vs_recursive_prefix(self, env):
        s, _, res, _ = env
        await s.create(key(res, "a", ns="x"), pod(res, "a", ns="x"))
        await s.create(key(res, "a", ns="xy"), pod(res, "a", ns="xy"))
        rec = await s.get_list(f"{res.prefix}/x", ListOptions(recursive=True))
        assert [o["metadata"]["namespace"] for o in rec.items] == ["x"]
        single = await s.get_list(key(res, "a", ns="x"), ListOptions())
        assert len(single.items) == 1 and single.items[0]["metadata"]["namespace"] == "x"
        none = await s.get_list(key(res, "zzz", ns="x"), ListOptions())
        assert none.items == [] and none.revision > 0

    async def test_list_resource_version_unset_zero_and_n(self, env):
        s, _, res, _ = env
        objs = [await s.create(key(res, f"p{i}"), pod(res, f"p{i}")) for i in range(3)]
        last = rv_of(objs[-1])
        unset = await s.get_list(res.prefix, ListOptions(recursive=True))
        assert len(unset.items) == 3 and unset.revision >= last
        at_n = await s.get_list(res.prefix, ListOptions(resource_version=str(last), recursive=True))
        assert len(at_n.items) == 3 and at_n.revision >= last
        zero = await s.get_list(res.prefix, ListOptions(resource_version="0", recursive=True))
        assert len(zero.items) <= 3
        assert [o["metadata"]["name"] for o in unset.items] == ["p0", "p1", "p2"]

    async def test_list_exact_and_not_older_than(self, env):
        s, _, res, _ = env
        a = await s.create(key(res, "a"), pod(res, "a"))
        await s.create(key(res, "b"), pod(res, "b"))
        exact = await s.get_list(res.prefix, ListOptions(resource_version=str(rv_of(a)),
                                                         resource_version_match="Exact", recursive=True))
        assert [o["metadata"]["name"] for o in exact.items] == ["a"] and exact.revision == rv_of(a)
        newer = await s.get_list(res.prefix, ListOptions(resource_version=str(rv_of(a)),
                                                         resource_version_match="NotOlderThan", recursive=True))
        assert {o["metadata"]["name"] for o in newer.items} >= {"a"} and newer.revision >= rv_of(a)

    async def test_list_legacy_limit_with_resource_version_is_exact(self, env):
        s, _, res, _ = env
        a = await s.create(key(res, "a"), pod(res, "a"))
        await s.create(key(res, "b"), pod(res, "b"))
        page = await s.get_list(res.prefix, ListOptions(resource_version=str(rv_of(a)), limit=10, recursive=True))
        assert [o["metadata"]["name"] for o in page.items] == ["a"] and page.revision == rv_of(a)

    async def test_list_pages_pinned_to_first_page_revision(self, env):
        s, _, res, _ = env
        for i in range(7):
            await s.create(key(res, f"p{i}"), pod(res, f"p{i}"))
        first = await s.get_list(res.prefix, ListOptions(limit=3, recursive=True))
        assert len(first.items) == 3 and first.continue_token
        assert first.remaining_item_count == 4
        await s.create(key(res, "p9"), pod(res, "p9"))  # after the snapshot: must not show up
        await s.delete(key(res, "p5"))  # ditto: p5 must still be listed
        names, token = [o["metadata"]["name"] for o in first.items], first.continue_token
        while token:
            page = await s.get_list(res.prefix, ListOptions(limit=3, continue_token=token, recursive=True))
            assert page.revision == first.revision
            names += [o["metadata"]["name"] for o in page.items]
            token = page.continue_token
        assert names == [f"p{i}" for i in range(7)]

    async def test_list_pages_thinned_out_by_selectors(self, env):
        s, _, res, _ = env
        for i in range(12):
            await s.create(key(res, f"p{i:02d}"), pod(res, f"p{i:02d}", labels={"keep": str(i % 4 == 0).lower()}))
        page = await s.get_list(res.prefix, ListOptions(limit=2, label_selector="keep=true", recursive=True))
        assert [o["metadata"]["name"] for o in page.items] == ["p00", "p04"]
        assert page.continue_token and page.remaining_item_count is None
        rest = await s.get_list(res.prefix, ListOptions(limit=2, label_selector="keep=true",
                                                        continue_token=page.continue_token, recursive=True))
        assert [o["metadata"]["name"] for o in rest.items] == ["p08"]

    async def test_list_continue_with_resource_version_is_400(self, env):
        s, _, res, _ = env
        for i in range(3):
            await s.create(key(res, f"p{i}"), pod(res, f"p{i}"))
        page = await s.get_list(res.prefix, ListOptions(limit=1, recursive=True))
        with pytest.raises(BadRequestError) as err:
            await s.get_list(res.prefix, ListOptions(limit=1, continue_token=page.continue_token,
                                                     resource_version="5", recursive=True))
        assert err.value.status == 400

    @pytest.mark.parametrize("token", ["garbage", "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6MSwic3RhcnQiOiIuLi94In0",
                                       "eyJ2IjoieCIsInJ2IjoxLCJzdGFydCI6ImEifQ", "", "%%%"])
    async def test_list_malformed_or_tampered_continue_is_400(self, env, token):
        s, _, res, _ = env
        await s.create(key(res, "a"), pod(res, "a"))
        if not token:
            token = "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6MCwic3RhcnQiOiJhIn0"  # rv 0
        with pytest.raises(BadRequestError):
            await s.get_list(res.prefix, ListOptions(limit=1, continue_token=token, recursive=True))
        assert len((await s.get_list(res.prefix, ListOptions(recursive=True))).items) == 1

    async def test_list_continue_after_compaction_is_410_with_latest_token(self, env):
        s, raw, res, _ = env
        for i in range(4):
            await s.create(key(res, f"p{i}"), pod(res, f"p{i}"))
        page = await s.get_list(res.prefix, ListOptions(limit=2, recursive=True))
        await s.guaranteed_update(key(res, "p3"), lambda o, m: {**o, "status": {"phase": "Running"}})
        await raw.compact(await s.get_current_resource_version())
        with pytest.raises(ExpiredError) as err:
            await s.get_list(res.prefix, ListOptions(limit=2, continue_token=page.continue_token, recursive=True))
        assert err.value.status == 410 and err.value.continue_token
        rest = await s.get_list(res.prefix, ListOptions(limit=2, continue_token=err.value.continue_token,
                                                        recursive=True))
        assert [o["metadata"]["name"] for o in rest.items] == ["p2", "p3"]
        assert rest.items[1]["status"]["phase"] == "Running"

    async def test_list_every_selector_operator(self, env):
        s, _, res, _ = env
        await s.create(key(res, "a"), pod(res, "a", node="n1", labels={"app": "web", "tier": "fe"}))
        await s.create(key(res, "b"), pod(res, "b", node="n2", labels={"app": "db"}))
        await s.create(key(res, "c"), pod(res, "c", node="n1", labels={"app": "cache", "tier": "be"}))
        cases = {("app=web", ""): ["a"], ("app==db", ""): ["b"], ("app!=web", ""): ["b", "c"],
                 ("app in (web,db)", ""): ["a", "b"], ("app notin (web)", ""): ["b", "c"],
                 ("tier", ""): ["a", "c"], ("!tier", ""): ["b"], ("tier,app!=cache", ""): ["a"],
                 ("", "spec.nodeName=n1"): ["a", "c"], ("", "spec.nodeName!=n1"): ["b"],
                 ("", "metadata.name==b"): ["b"], ("tier=fe", "spec.nodeName=n1"): ["a"]}
        for (labels, fields), want in cases.items():
            got = await s.get_list(res.prefix, ListOptions(label_selector=labels, field_selector=fields,
                                                           recursive=True))
            assert [o["metadata"]["name"] for o in got.items] == want, (labels, fields)

    async def test_list_larger_than_4mib_and_default_page(self, env):
        s, _, res, _ = env
        blob = "y" * (140 * 1024)
        for i in range(32):  # ~4.5 MiB in total
            await s.create(key(res, f"big{i:02d}"), pod(res, f"big{i:02d}", data={"blob": blob}))
        whole = await s.get_list(res.prefix, ListOptions(recursive=True))
        assert len(whole.items) == 32 and whole.items[5]["data"]["blob"] == blob
        paged = await s.get_list(res.prefix, ListOptions(limit=30, recursive=True))
        assert len(paged.items) == 30 and paged.remaining_item_count == 2

    # ---------------------------------------------------------------- guaranteed_update
    async def test_update_concurrent_increments_are_all_applied(self, env):
        s, _, res, _ = env
        await s.create(key(res, "ctr"), pod(res, "ctr", count=0))
        revisions: list[int] = []

        def inc(obj, meta):
            obj["count"] += 1
            return obj

        async def worker():
            revisions.append(rv_of(await s.guaranteed_update(key(res, "ctr"), inc)))

        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(worker)
        final = await s.get(key(res, "ctr"))
        assert final["count"] == 12
        assert len(set(revisions)) == 12 and max(revisions) == rv_of(final)

    async def test_update_noop_writes_nothing_and_keeps_resource_version(self, env):
        s, _, res, _ = env
        obj = await s.create(key(res, "a"), pod(res, "a"))
        before = await s.get_current_resource_version()
        out = await s.guaranteed_update(key(res, "a"), lambda o, m: o)
        assert rv_of(out) == rv_of(obj)
        assert await s.get_current_resource_version() == before

    async def test_update_preconditions(self, env):
        s, _, res, _ = env
        obj = await s.create(key(res, "a"), pod(res, "a"))
        with pytest.raises(PreconditionFailedError) as err:
            await s.guaranteed_update(key(res, "a"), lambda o, m: {**o, "x": 1},
                                      preconditions=Preconditions(uid="other"))
        assert err.value.status == 409
        with pytest.raises(PreconditionFailedError):
            await s.guaranteed_update(key(res, "a"), lambda o, m: {**o, "x": 1},
                                      preconditions=Preconditions(resource_version="1"))
        ok = await s.guaranteed_update(key(res, "a"), lambda o, m: {**o, "x": 1},
                                       preconditions=Preconditions(uid="uid-a",
                                                                   resource_version=obj["metadata"]["resourceVersion"]))
        assert ok["x"] == 1

    async def test_update_with_stale_cached_existing_hint(self, env):
        s, _, res, _ = env
        stale = await s.create(key(res, "a"), pod(res, "a", count=0))
        await s.guaranteed_update(key(res, "a"), lambda o, m: {**o, "count": 5})
        out = await s.guaranteed_update(key(res, "a"), lambda o, m: {**o, "count": o["count"] + 1},
                                        cached_existing=stale)
        assert out["count"] == 6
        assert stale["count"] == 0  # the hint is never mutated

    async def test_update_function_error_aborts_with_nothing_written(self, env):
        s, _, res, _ = env
        obj = await s.create(key(res, "a"), pod(res, "a"))

        def boom(o, m):
            raise ValueError("refused")

        with pytest.raises(ValueError):
            await s.guaranteed_update(key(res, "a"), boom)
        assert rv_of(await s.get(key(res, "a"))) == rv_of(obj)

    async def test_update_missing_key_404_or_created_with_ignore_not_found(self, env):
        s, _, res, _ = env
        with pytest.raises(NotFoundError):
            await s.guaranteed_update(key(res, "n"), lambda o, m: pod(res, "n"))
        made = await s.guaranteed_update(key(res, "n"), lambda o, m: pod(res, "n"), ignore_not_found=True)
        assert rv_of(made) > 0 and (await s.get(key(res, "n")))["metadata"]["name"] == "n"

    # ---------------------------------------------------------------- delete
    async def test_delete_returns_last_object_at_deletion_revision(self, env):
        s, _, res, _ = env
        obj = await s.create(key(res, "a"), pod(res, "a"))
        gone = await s.delete(key(res, "a"))
        assert gone["metadata"]["name"] == "a" and rv_of(gone) > rv_of(obj)
        assert rv_of(gone) == await s.get_current_resource_version()
        with pytest.raises(NotFoundError):
            await s.delete(key(res, "a"))

    async def test_delete_preconditions_and_validate_deletion(self, env):
        s, _, res, _ = env
        await s.create(key(res, "a"), pod(res, "a"))
        with pytest.raises(PreconditionFailedError):
            await s.delete(key(res, "a"), preconditions=Preconditions(uid="nope"))

        def refuse(obj):
            raise PreconditionFailedError("not deletable")

        with pytest.raises(PreconditionFailedError):
            await s.delete(key(res, "a"), validate_deletion=refuse)
        assert await s.get(key(res, "a")) is not None
        await s.delete(key(res, "a"), preconditions=Preconditions(uid="uid-a"))
        assert await s.get(key(res, "a"), GetOptions(ignore_not_found=True)) is None

    async def test_delete_with_stale_cached_hint(self, env):
        s, _, res, _ = env
        stale = await s.create(key(res, "a"), pod(res, "a"))
        newer = await s.guaranteed_update(key(res, "a"), lambda o, m: {**o, "v": 2})
        gone = await s.delete(key(res, "a"), cached_existing=stale)
        assert gone.get("v") == 2 and rv_of(gone) > rv_of(newer)

    # ---------------------------------------------------------------- watch
    async def test_watch_from_n_excludes_n(self, env):
        s, _, res, _ = env
        a = await s.create(key(res, "a"), pod(res, "a"))
        async with s.watch(res.prefix, ListOptions(resource_version=str(rv_of(a)), recursive=True)) as w:
            b = await s.guaranteed_update(key(res, "a"), lambda o, m: {**o, "v": 1})
            events = await collect(w, 1)
        assert summary(events) == [("MODIFIED", "a", rv_of(b))]

    async def test_watch_zero_and_unset_send_state_as_added_first(self, env):
        s, _, res, _ = env
        await s.create(key(res, "a"), pod(res, "a"))
        await s.create(key(res, "b"), pod(res, "b"))
        for rv in ("0", ""):
            async with s.watch(res.prefix, ListOptions(resource_version=rv, recursive=True)) as w:
                events = await collect(w, 2)
            assert sorted((e.type.value, e.object["metadata"]["name"]) for e in events) == [
                ("ADDED", "a"), ("ADDED", "b")]

    async def test_watch_single_key_vs_recursive(self, env):
        s, _, res, _ = env
        start = await s.get_current_resource_version()
        async with s.watch(key(res, "a"), ListOptions(resource_version=str(start))) as single, \
                s.watch(res.prefix, ListOptions(resource_version=str(start), recursive=True)) as rec:
            await s.create(key(res, "a"), pod(res, "a"))
            await s.create(key(res, "ab"), pod(res, "ab"))
            await s.create(key(res, "b"), pod(res, "b"))
            got_rec = await collect(rec, 3)
            got_single = await collect_until_quiet(single)
        assert [n for _, n, _ in summary(got_rec)] == ["a", "ab", "b"]
        assert [n for _, n, _ in summary(got_single)] == ["a"]

    async def test_watch_selector_transitions(self, env):
        s, _, res, _ = env
        await s.create(key(res, "p"), pod(res, "p", labels={"app": "x"}))
        start = await s.get_current_resource_version()
        async with s.watch(res.prefix, ListOptions(resource_version=str(start), label_selector="app=web",
                                                   recursive=True)) as w:
            on = await s.guaranteed_update(key(res, "p"), lambda o, m: {**o, "metadata": {**o["metadata"], "labels": {"app": "web"}}})
            mod = await s.guaranteed_update(key(res, "p"), lambda o, m: {**o, "v": 1})
            off = await s.guaranteed_update(key(res, "p"), lambda o, m: {**o, "metadata": {**o["metadata"], "labels": {}}})
            events = await collect(w, 3)
        assert summary(events) == [("ADDED", "p", rv_of(on)), ("MODIFIED", "p", rv_of(mod)),
                                   ("DELETED", "p", rv_of(off))]
        assert events[2].object["metadata"]["labels"] == {"app": "web"}  # the last object it saw

    async def test_watch_deleted_carries_deletion_revision(self, env):
        s, _, res, _ = env
        a = await s.create(key(res, "a"), pod(res, "a"))
        async with s.watch(res.prefix, ListOptions(resource_version=str(rv_of(a)), recursive=True)) as w:
            gone = await s.delete(key(res, "a"))
            events = await collect(w, 1)
        assert summary(events) == [("DELETED", "a", rv_of(gone))]

    async def test_watch_progress_notifications_only_when_asked(self, env):
        s, _, res, target = env
        start = await s.get_current_resource_version()
        async with s.watch(res.prefix, ListOptions(resource_version=str(start), recursive=True,
                                                   progress_notify=True)) as asked, \
                s.watch(res.prefix, ListOptions(resource_version=str(start), recursive=True)) as plain:
            await anyio.sleep(0.2)
            await s.request_watch_progress()
            marks = await collect(asked, 1, timeout=1 if target.cached else 5)
            await s.request_watch_progress()
            quiet = await collect_until_quiet(plain, 0.5)
        assert quiet == []
        if target.cached:
            assert marks == [], CACHE_DIFFERENCES["progress_not_forwarded"]
            return
        assert marks and marks[0].type is EventType.BOOKMARK and marks[0].resource_version >= start

    async def test_watch_from_compacted_revision_is_one_410_error_then_end(self, env):
        s, raw, res, target = env
        start = rv_of(await s.create(key(res, "p0"), pod(res, "p0")))
        for i in (1, 2):
            last = await s.create(key(res, f"p{i}"), pod(res, f"p{i}"))
        # A cache whose upstream watch still lags would itself be compacted away (and relist);
        # Kubernetes compacts 5 minutes behind, so let it catch up first, as it would have.
        await s.get(key(res, "p2"), GetOptions(resource_version=str(rv_of(last))))
        await raw.compact(await s.get_current_resource_version())
        async with s.watch(res.prefix, ListOptions(resource_version=str(start), recursive=True)) as w:
            events = await collect(w, 2 if target.cached else 5, timeout=3)
            if not target.cached:
                assert await w.next_batch() == []
        if target.cached:
            # CACHE_DIFFERENCES["watch_history_window"]: the cache's own history still holds them.
            assert [n for _, n, _ in summary(events)] == ["p1", "p2"]
            return
        assert [e.type for e in events] == [EventType.ERROR]
        assert events[0].object["code"] == 410 and events[0].object["reason"] == "Expired"

    async def test_watch_list_sends_initial_events_end_bookmark(self, env):
        s, _, res, _ = env
        a = await s.create(key(res, "a"), pod(res, "a"))
        async with s.watch(res.prefix, ListOptions(send_initial_events=True, allow_watch_bookmarks=True,
                                                   resource_version_match="NotOlderThan",
                                                   resource_version=str(rv_of(a)), recursive=True)) as w:
            events = await collect(w, 2)
        assert [e.type for e in events] == [EventType.ADDED, EventType.BOOKMARK]
        assert events[1].object["metadata"]["annotations"][INITIAL_EVENTS_END_ANNOTATION] == "true"

    async def test_watch_timeout_seconds_ends_the_stream_normally(self, env):
        s, _, res, _ = env
        await s.create(key(res, "a"), pod(res, "a"))
        async with s.watch(res.prefix, ListOptions(resource_version="0", recursive=True,
                                                   timeout_seconds=0.5)) as w:
            with anyio.fail_after(10):
                events = []
                while batch := await w.next_batch():
                    events.extend(batch)
        assert [e.type for e in events] == [EventType.ADDED]  # no ERROR: a timeout is a normal end

    async def test_watch_stop_is_idempotent(self, env):
        s, _, res, _ = env
        w = s.watch(res.prefix, ListOptions(resource_version="0", recursive=True))
        await w.start()
        await w.stop()
        await w.stop()
        assert await w.next_batch() == []

    async def test_watch_stop_and_cancel_free_stream_and_thread(self, env):
        s, raw, res, target = env
        streams, threads = _stream_resources(raw), _live_threads(target)
        watches = [s.watch(res.prefix, ListOptions(resource_version="0", recursive=True)) for _ in range(3)]
        for w in watches:
            await w.start()
        await s.create(key(res, "a"), pod(res, "a"))
        for w in watches:
            assert summary(await collect(w, 1)) [0][:2] == ("ADDED", "a")
        with anyio.move_on_after(0.2):  # a consumer cancelled while waiting inside the watch block
            async with s.watch(res.prefix, ListOptions(resource_version="0", recursive=True)) as w4:
                await collect(w4, 1)
                await w4.next_batch()  # nothing more comes: cancelled here
        for w in watches:
            await w.stop()
        await _assert_released(raw, target, streams, threads)

    # ---------------------------------------------------------------- cancellation
    async def test_cancelled_update_leaves_no_partial_write_or_leak(self, env):
        s, raw, res, target = env
        created = await s.create(key(res, "c"), pod(res, "c", spec={"count": 0, "copy": 0}))
        streams, threads = _stream_resources(raw), _live_threads(target)

        def inc(obj, meta):
            n = obj["spec"]["count"] + 1
            obj["spec"] = {"count": n, "copy": n}
            return obj

        returned = 0
        for i in range(20):
            with anyio.move_on_after(0.002 * (i % 5)):  # from "before it starts" to "while in flight"
                await s.guaranteed_update(key(res, "c"), inc)
                returned += 1
        final = await s.get(key(res, "c"))
        n = final["spec"]["count"]
        assert final["spec"]["copy"] == n and returned <= n <= 20
        async with raw.watch(key(res, "c"), ListOptions(resource_version=str(rv_of(created)))) as w:
            events = await collect(w, n)
        # Every write that happened is whole and in order: counts 1..n, one revision each.
        assert [(e.type, e.object["spec"]["count"], e.object["spec"]["copy"]) for e in events] == [
            (EventType.MODIFIED, i, i) for i in range(1, n + 1)]
        assert (await s.guaranteed_update(key(res, "c"), inc))["spec"]["count"] == n + 1
        await _assert_released(raw, target, streams, threads)

    async def test_cancelled_list_leaves_no_leak_and_storage_usable(self, env):
        s, raw, res, target = env
        for i in range(30):
            await s.create(key(res, f"p{i:02}"), pod(res, f"p{i:02}"))
        streams, threads = _stream_resources(raw), _live_threads(target)
        for i in range(10):
            with anyio.move_on_after(0.001 * i):
                await s.get_list(res.prefix, ListOptions(limit=7, recursive=True))
            with anyio.move_on_after(0.001 * i):
                await s.get_list(res.prefix, ListOptions(recursive=True))
        assert len((await s.get_list(res.prefix, ListOptions(recursive=True))).items) == 30
        assert (await s.stats()).object_count == 30
        await _assert_released(raw, target, streams, threads)

    # ---------------------------------------------------------------- TTL leases
    async def test_ttl_objects_share_one_lease_within_reuse_window(self, env):
        s, raw, res, _ = env
        # ttl 100 s: reuse window min(5% of 100, 60) = 5 s, so writes within it share the lease.
        for i in range(5):
            await s.create(key(res, f"t{i}"), pod(res, f"t{i}"), ttl=100)
        leases = {await raw.lease_of(key(res, f"t{i}")) for i in range(5)}
        assert len(leases) == 1 and 0 not in leases
        await s.create(key(res, "forever"), pod(res, "forever"))
        assert await raw.lease_of(key(res, "forever")) == 0
        # A longer TTL would outlive the shared lease: it gets its own.
        await s.create(key(res, "long"), pod(res, "long"), ttl=300)
        assert await raw.lease_of(key(res, "long")) not in leases | {0}
        await s.guaranteed_update(key(res, "t0"), lambda o, m: ({**o, "status": {"phase": "Running"}}, 100))
        assert await raw.lease_of(key(res, "t0")) not in (0,)

    # ---------------------------------------------------------------- compaction
    async def test_compactor_rounds_coordinate_through_compact_rev_key(self, env):
        s, raw, res, _ = env
        ckey = f"compact_rev_key{res.prefix}"
        c1, c2 = raw.new_compactor(300, key=ckey), raw.new_compactor(300, key=ckey)
        old = await s.create(key(res, "a"), pod(res, "a"))
        first = await c1.run_once()
        assert first.won and first.compacted == 0  # the first round never compacts
        assert not (await c2.run_once()).won and c2.logical_time == c1.logical_time == 1
        await s.guaranteed_update(key(res, "a"), lambda o, m: {**o, "status": {"phase": "Running"}})
        second = await c1.run_once()
        assert second.won and second.compacted == first.revision > rv_of(old)
        lost = await c2.run_once()
        assert not lost.won and lost.compacted == 0 and c2.logical_time == c1.logical_time == 2
        assert c1.compactions == 1 and c2.compactions == 0
        # c1 misses a round: c2's logical time is current, so c2 wins and compacts to what it saw.
        third = await c2.run_once()
        assert third.won and third.compacted == lost.revision and c1.compactions + c2.compactions == 2
        assert raw.compact_revision() >= lost.revision
        await _assert_compacted_below(s, raw, res, rv_of(old), lost.revision)

    async def test_compactor_every_interval_compacts_to_revision_one_interval_earlier(self, env):
        s, raw, res, target = env
        ckey = f"compact_rev_key{res.prefix}"
        old = await s.create(key(res, "a"), pod(res, "a"))
        log: list[tuple[str, str, int, int]] = []
        compactors = [raw.new_compactor(0.3, key=ckey) for _ in range(2)]
        for name, c in zip("AB", compactors):
            c.kv = _RecordingKV(c.kv, name, log)
        async with compactors[0], compactors[1]:
            with anyio.fail_after(15):
                i = 0
                while sum(c.compactions for c in compactors) < 2:
                    await s.create(key(res, f"w{i}"), pod(res, f"w{i}"))
                    i += 1
                    await anyio.sleep(0.05)
        cas_revs: dict[str, list[int]] = {"A": [], "B": []}
        compacted_at: dict[int, str] = {}
        targets = []
        for kind, name, rev, version in log:
            if kind == "cas":
                cas_revs[name].append(rev)
                continue
            # A compaction, right after this compactor's winning transaction: it compacts to the
            # revision it saw at its previous round, and no other compaction has this logical time.
            assert rev == cas_revs[name][-2]
            assert version not in compacted_at, "two compactors compacted in one round"
            compacted_at[version] = name
            targets.append(rev)
        assert targets == sorted(targets) and len(targets) >= 2
        assert sum(c.compactions for c in compactors) == len(targets)
        assert targets[-1] > rv_of(old)
        await _assert_compacted_below(s, raw, res, rv_of(old), targets[-1])

    # ---------------------------------------------------------------- metadata
    async def test_stats_current_revision_readiness(self, env):
        s, _, res, _ = env
        for i in range(3):
            last = await s.create(key(res, f"p{i}"), pod(res, f"p{i}"))
        assert (await s.stats()).object_count == 3
        assert await s.get_current_resource_version() >= rv_of(last)
        await s.readiness_check()

    # ---------------------------------------------------------------- bad input
    @pytest.mark.parametrize("bad", ["", "/", "relative", "/other/ns/a", "/PFX/../x", "/PFX/ns/./a", "/PFXy/a"])
    async def test_bad_keys_are_400_and_nothing_written(self, env, bad):
        s, _, res, _ = env
        bad = bad.replace("/PFX", res.prefix)
        with pytest.raises(BadRequestError):
            await s.create(bad, pod(res, "a"))
        with pytest.raises(BadRequestError):
            await s.get(bad)
        with pytest.raises(BadRequestError):
            await s.get_list(bad, ListOptions(recursive=True))
        assert (await s.stats()).object_count == 0

    @pytest.mark.parametrize("bad_rv", ["abc", "-1", "1.5", " 5", "5 ", "+5", "1e3", "99999999999999999999"])
    async def test_bad_resource_versions_are_invalid(self, env, bad_rv):
        s, _, res, _ = env
        await s.create(key(res, "a"), pod(res, "a"))
        with pytest.raises(InvalidError) as err:
            await s.get(key(res, "a"), GetOptions(resource_version=bad_rv))
        assert err.value.status == 422
        with pytest.raises(InvalidError):
            await s.get_list(res.prefix, ListOptions(resource_version=bad_rv, recursive=True))
        with pytest.raises(InvalidError):
            async with s.watch(res.prefix, ListOptions(resource_version=bad_rv, recursive=True)):
                pass
        assert len((await s.get_list(res.prefix, ListOptions(recursive=True))).items) == 1

    async def test_malformed_metadata_or_a_key_mismatch_is_400_and_nothing_written(self, env):
        s, _, res, _ = env
        good = await s.create(key(res, "a"), pod(res, "a"))
        bad_objects = [
            {"metadata": "x"},
            pod(res, "b", labels=["x"]),
            pod(res, "b", labels={"x": 1}),
            {**pod(res, "b"), "metadata": {"name": 5, "namespace": "ns"}},
            {**pod(res, "b"), "metadata": {"name": "", "namespace": "ns"}},
            pod(res, "other"),  # its name gives another key
            pod(res, "b", ns="elsewhere"),
        ]
        for obj in bad_objects:
            with pytest.raises(BadRequestError):
                await s.create(key(res, "b"), obj)
        with pytest.raises(BadRequestError):  # an update may not rename the object
            await s.guaranteed_update(key(res, "a"), lambda o, m: {**o, "metadata": {**o["metadata"], "name": "z"}})
        with pytest.raises(BadRequestError):
            await s.guaranteed_update(key(res, "a"), lambda o, m: {**o, "metadata": {**o["metadata"], "labels": [1]}})
        listed = await s.get_list(res.prefix, ListOptions(recursive=True))
        assert [(o["metadata"]["name"], rv_of(o)) for o in listed.items] == [("a", rv_of(good))]
        for bad in (dict(limit=True), dict(limit=2**70), dict(label_selector=5), dict(continue_token=5)):
            with pytest.raises(BadRequestError):
                ListOptions(recursive=True, **bad)

    async def test_unknown_resource_version_match_and_bad_selectors_are_400(self, env):
        s, _, res, _ = env
        with pytest.raises(BadRequestError):
            await s.get_list(res.prefix, ListOptions(resource_version="1", resource_version_match="Newest",
                                                     recursive=True))
        for sel in ("a in (x", "=b", "a b"):
            with pytest.raises(BadRequestError):
                await s.get_list(res.prefix, ListOptions(label_selector=sel, recursive=True))
        with pytest.raises(BadRequestError):
            await s.get_list(res.prefix, ListOptions(field_selector="spec.nodeName in (a)", recursive=True))


class ClosedStorageConformance:
    """Calls on a closed storage raise StorageClosedError (503) and never touch the backend."""

    async def test_calls_after_close_raise_closed(self, target: Target):
        res = fresh_resource()
        async with target.open(res) as (s, _):
            await s.create(key(res, "a"), pod(res, "a"))
            await s.close()
            for call in (lambda: s.get(key(res, "a")), lambda: s.create(key(res, "b"), pod(res, "b")),
                         lambda: s.get_list(res.prefix, ListOptions(recursive=True)),
                         lambda: s.delete(key(res, "a")), lambda: s.stats()):
                with pytest.raises(StorageClosedError) as err:
                    await call()
                assert err.value.status == 503
            with pytest.raises(StorageClosedError):
                async with s.watch(res.prefix, ListOptions(recursive=True)):
                    pass


class _RecordingKV:
    """A CompactorKV wrapper recording ("cas", name, revision, version) for each won or lost
    transaction and ("compact", name, revision, logical time) for each compaction, in call order."""

    def __init__(self, inner: Any, name: str, log: list) -> None:
        self.inner, self.name, self.log = inner, name, log
        self.version = 0

    async def compare_version_and_put(self, key: str, expected_version: int, value: bytes):
        res = await self.inner.compare_version_and_put(key, expected_version, value)
        self.version = res.version
        self.log.append(("cas", self.name, res.revision, res.version))
        return res

    async def compact(self, revision: int) -> None:
        self.log.append(("compact", self.name, revision, self.version))
        await self.inner.compact(revision)


async def _assert_compacted_below(s: Storage, raw: Any, res: Resource, below: int, compacted: int) -> None:
    """Reads and watches of the raw backend at ``below`` (< ``compacted``) get 410; at ``compacted`` work."""
    assert below < compacted
    with pytest.raises(ExpiredError) as err:
        await raw.get_list(res.prefix, ListOptions(resource_version=str(below), resource_version_match="Exact",
                                                   recursive=True))
    assert err.value.status == 410
    await raw.get_list(res.prefix, ListOptions(resource_version=str(compacted), resource_version_match="Exact",
                                               recursive=True))
    async with raw.watch(res.prefix, ListOptions(resource_version=str(below), recursive=True)) as w:
        events = await collect(w, 5, timeout=3)
    assert [e.type for e in events] == [EventType.ERROR] and events[0].object["code"] == 410
    assert (await s.get(key(res, "a")))["metadata"]["name"] == "a"  # the latest state is intact


def _stream_resources(raw: Any) -> int:
    """Open watch streams of a raw backend: its registry of watches, plus the MemoryKV's sinks."""
    count = len(getattr(raw, "_watches", ()))
    kv = getattr(raw, "kv", None)
    if kv is not None:
        count += len(kv._sinks)
    return count


def _live_threads(target: Target) -> set[int]:
    """Live threads other than the pooled worker threads of anyio (asyncio) and trio (reused, idle
    ones linger by design: they are not leaks).

    Cached targets return an empty set: the Cacher's one upstream watch (and the gRPC threads of its
    stream) may be (re)opened by the reflector at any time, so only its stream count is compared.
    """
    import threading
    if target.cached:
        return set()
    return {t.ident for t in threading.enumerate()  # type: ignore[misc]
            if t.is_alive() and not t.name.startswith(("AnyIO worker", "Trio thread"))}


async def _assert_released(raw: Any, target: Target, streams: int, threads: set[int],
                           timeout: float = 5.0) -> None:
    """Wait until the raw backend holds no more streams than ``streams`` and no thread outside
    ``threads`` is alive (watch threads end shortly after stop)."""
    with anyio.move_on_after(timeout):
        while _stream_resources(raw) > streams or _live_threads(target) - threads:
            await anyio.sleep(0.02)
    assert _stream_resources(raw) <= streams
    import threading
    extra = _live_threads(target) - threads
    assert not extra, [t.name for t in threading.enumerate() if t.ident in extra]
