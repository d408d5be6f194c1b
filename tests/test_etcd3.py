"""The etcd3 backend (storage/etcd3) against a real etcd server (the session ``etcd_server`` fixture).

Each test works under its own resource prefix, so tests sharing the server never see each other's keys.
Tests that compact etcd only ever read revisions written after the compaction. The project runs
pytest-asyncio in strict mode, so async tests and fixtures are marked explicitly.
"""

from __future__ import annotations

import re
import threading
import uuid
from typing import Any

import anyio
import etcd3
import orjson
import pytest
import pytest_asyncio

from storage.continue_token import decode_continue, encode_continue
from storage.errors import (AlreadyExistsError, BadRequestError, ExpiredError, InvalidError, NotFoundError,
                            PreconditionFailedError, ServiceUnavailableError, StorageClosedError,
                            TimeoutError_, TooLargeResourceVersionError)
from storage.etcd3 import Etcd3Storage
from storage.etcd3.client import prefix_end, translate_rpc_error
from storage.etcd3.leases import LeaseManager
from storage.interface import (INITIAL_EVENTS_END_ANNOTATION, EventType, GetOptions, ListOptions,
                               Preconditions, Resource, WatchEvent)
from storage.testing.etcd_server import EtcdServer, find_etcd_binary

# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def resource(request) -> Resource:
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")
    return Resource(f"/{name}-{uuid.uuid4().hex[:6]}")


@pytest_asyncio.fixture
async def store(etcd_server, resource):
    async with Etcd3Storage(resource, etcd_server.endpoint) as s:
        yield s


@pytest.fixture
def raw(etcd_server):
    """An independent etcd3 client, to look at what the backend really stored."""
    host, port = etcd_server.endpoint.split(":")
    client = etcd3.client(host=host, port=int(port))
    yield client
    client.close()


def obj(name: str, ns: str = "ns", labels: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}",
                                        "labels": labels or {}}}
    out.update(extra)
    return out


def k(res: Resource, name: str, ns: str = "ns") -> str:
    return f"{res.prefix}/{ns}/{name}"


def rv(o: dict[str, Any]) -> int:
    return int(o["metadata"]["resourceVersion"])


def names(items: list[dict[str, Any]]) -> list[str]:
    return [i["metadata"]["name"] for i in items]


def summary(events: list[WatchEvent]) -> list[tuple[str, str, int]]:
    return [(e.type.value, e.object["metadata"].get("name", ""), e.resource_version) for e in events]


async def take(watch, count: int, timeout: float = 10.0) -> list[WatchEvent]:
    """Exactly ``count`` events or whatever arrived before the stream ended (bounded wait)."""
    out: list[WatchEvent] = []
    with anyio.fail_after(timeout):
        while len(out) < count:
            batch = await watch.next_batch()
            if not batch:
                break
            out.extend(batch)
    return out


def recursive(**kw: Any) -> ListOptions:
    return ListOptions(recursive=True, **kw)


# ---------------------------------------------------------------------------------------------- create / get


@pytest.mark.asyncio
async def test_create_stores_under_path_prefix_without_resource_version(store, resource, raw):
    created = await store.create(k(resource, "a"), obj("a"))
    assert rv(created) == await store.get_current_resource_version()
    value, meta = raw.get(f"/registry{resource.prefix}/ns/a")
    assert meta.mod_revision == rv(created)
    assert "resourceVersion" not in orjson.loads(value)["metadata"]
    assert await store.get(k(resource, "a")) == created


@pytest.mark.asyncio
async def test_custom_path_prefix(etcd_server, resource, raw):
    async with Etcd3Storage(resource, [etcd_server.endpoint], path_prefix="custom/") as s:
        await s.create(k(resource, "a"), obj("a"))
    value, _ = raw.get(f"/custom{resource.prefix}/ns/a")
    assert value is not None


@pytest.mark.asyncio
async def test_create_existing_is_409_and_resource_version_on_create_is_400(store, resource):
    await store.create(k(resource, "a"), obj("a"))
    with pytest.raises(AlreadyExistsError) as err:
        await store.create(k(resource, "a"), obj("a"))
    assert err.value.status == 409
    bad = obj("b")
    bad["metadata"]["resourceVersion"] = "5"
    with pytest.raises(BadRequestError):
        await store.create(k(resource, "b"), bad)
    assert await store.get(k(resource, "b"), GetOptions(ignore_not_found=True)) is None


@pytest.mark.asyncio
async def test_ttl_objects_expire_as_deleted_events(store, resource):
    start = await store.get_current_resource_version()
    await store.create(k(resource, "a"), obj("a"), ttl=2)
    await store.guaranteed_update(k(resource, "b"), lambda cur, meta: (obj("b"), 2), ignore_not_found=True)
    async with store.watch(resource.prefix, recursive(resource_version=str(start))) as w:
        events = await take(w, 4, timeout=20)
    kinds = sorted((e.type.value, e.object["metadata"]["name"]) for e in events)
    assert kinds == [("ADDED", "a"), ("ADDED", "b"), ("DELETED", "a"), ("DELETED", "b")]
    assert (await store.get_list(resource.prefix, recursive())).items == []


@pytest.mark.asyncio
async def test_get_not_found_and_ignore_not_found(store, resource):
    with pytest.raises(NotFoundError) as err:
        await store.get(k(resource, "nope"))
    assert err.value.status == 404
    assert await store.get(k(resource, "nope"), GetOptions(ignore_not_found=True)) is None


@pytest.mark.asyncio
async def test_get_not_older_than_and_too_large(store, resource):
    created = await store.create(k(resource, "a"), obj("a"))
    assert await store.get(k(resource, "a"), GetOptions(resource_version=str(rv(created)))) == created
    assert await store.get(k(resource, "a"), GetOptions(resource_version="0")) == created
    current = await store.get_current_resource_version()
    with pytest.raises(TooLargeResourceVersionError) as err:
        await store.get(k(resource, "a"), GetOptions(resource_version=str(current + 100)))
    assert err.value.status == 504 and err.value.retry_after_seconds == 0
    assert err.value.minimum == current + 100 and err.value.current == current


@pytest.mark.asyncio
async def test_non_json_object_is_400_and_nothing_stored(store, resource):
    before = await store.get_current_resource_version()
    with pytest.raises(BadRequestError):
        await store.create(k(resource, "a"), obj("a", spec={"when": object()}))
    with pytest.raises(BadRequestError):
        await store.guaranteed_update(k(resource, "a"), lambda cur, meta: obj("a", spec={1j: 1}),
                                      ignore_not_found=True)
    assert await store.get_current_resource_version() == before


@pytest.mark.parametrize("bad", ["/pods/../x", "", "/other/x", "PREFIX/../x", "PREFIX/./x"])
@pytest.mark.asyncio
async def test_bad_keys_are_400(store, resource, bad):
    bad = bad.replace("PREFIX", resource.prefix)
    with pytest.raises(BadRequestError):
        await store.create(bad, obj("a"))
    with pytest.raises(BadRequestError):
        await store.get(bad)
    with pytest.raises(BadRequestError):
        await store.get_list(bad, recursive())
    with pytest.raises(BadRequestError):
        await store.delete(bad)
    with pytest.raises(BadRequestError):
        store.watch(bad, recursive())


@pytest.mark.parametrize("bad_rv", ["abc", "-1", "1.5", " 5"])
@pytest.mark.asyncio
async def test_bad_resource_versions_are_422(store, resource, bad_rv):
    with pytest.raises(InvalidError) as err:
        await store.get(k(resource, "a"), GetOptions(resource_version=bad_rv))
    assert err.value.status == 422
    with pytest.raises(InvalidError):
        await store.get_list(resource.prefix, recursive(resource_version=bad_rv))
    with pytest.raises(InvalidError):
        store.watch(resource.prefix, recursive(resource_version=bad_rv))


@pytest.mark.asyncio
async def test_every_call_after_close_raises_closed(etcd_server, resource):
    s = Etcd3Storage(resource, etcd_server.endpoint)
    await s.create(k(resource, "a"), obj("a"))
    await s.close()
    await s.close()  # idempotent
    calls = [
        s.create(k(resource, "b"), obj("b")), s.get(k(resource, "a")), s.get_list(resource.prefix, recursive()),
        s.guaranteed_update(k(resource, "a"), lambda cur, meta: cur), s.delete(k(resource, "a")),
        s.stats(), s.readiness_check(), s.request_watch_progress(), s.get_current_resource_version(),
        s.server_version(), s.compact(1),
    ]
    for call in calls:
        with pytest.raises(StorageClosedError) as err:
            await call
        assert err.value.status == 503
    with pytest.raises(StorageClosedError):
        s.watch(resource.prefix, recursive())


# ---------------------------------------------------------------------------------------------- list


@pytest.mark.asyncio
async def test_list_exact_key_vs_recursive_prefix(store, resource):
    await store.create(f"{resource.prefix}/a/x", obj("x", ns="a"))
    await store.create(f"{resource.prefix}/ab/y", obj("y", ns="ab"))
    assert names((await store.get_list(f"{resource.prefix}/a", recursive())).items) == ["x"]
    single = await store.get_list(f"{resource.prefix}/a/x", ListOptions())
    assert names(single.items) == ["x"] and single.continue_token == ""
    assert (await store.get_list(f"{resource.prefix}/a", ListOptions())).items == []
    assert names((await store.get_list(resource.prefix, recursive())).items) == ["x", "y"]


@pytest.mark.asyncio
async def test_list_exact_revision_not_older_than_and_future(store, resource):
    first = await store.create(k(resource, "a"), obj("a"))
    await store.create(k(resource, "b"), obj("b"))
    exact = await store.get_list(resource.prefix, recursive(resource_version=str(rv(first)),
                                                            resource_version_match="Exact"))
    assert names(exact.items) == ["a"] and exact.resource_version == str(rv(first))
    legacy = await store.get_list(resource.prefix, recursive(resource_version=str(rv(first)), limit=10))
    assert names(legacy.items) == ["a"]
    latest = await store.get_list(resource.prefix, recursive(resource_version=str(rv(first)),
                                                             resource_version_match="NotOlderThan"))
    assert names(latest.items) == ["a", "b"]
    current = await store.get_current_resource_version()
    for opts in (recursive(resource_version=str(current + 50), resource_version_match="Exact"),
                 recursive(resource_version=str(current + 50), resource_version_match="NotOlderThan"),
                 recursive(resource_version=str(current + 50))):
        with pytest.raises(TooLargeResourceVersionError) as err:
            await store.get_list(resource.prefix, opts)
        assert err.value.status == 504 and err.value.retry_after_seconds == 0


@pytest.mark.asyncio
async def test_list_pages_are_pinned_to_the_first_page_revision(store, resource):
    for n in "abcde":
        await store.create(k(resource, n), obj(n, spec={"v": 1}))
    page1 = await store.get_list(resource.prefix, recursive(limit=2))
    assert names(page1.items) == ["a", "b"] and page1.remaining_item_count == 3
    await store.create(k(resource, "f"), obj("f"))
    await store.guaranteed_update(k(resource, "d"), lambda cur, meta: {**cur, "spec": {"v": 2}})
    await store.delete(k(resource, "c"))
    page2 = await store.get_list(resource.prefix, recursive(limit=2, continue_token=page1.continue_token))
    assert names(page2.items) == ["c", "d"] and page2.items[1]["spec"] == {"v": 1}
    assert page2.resource_version == page1.resource_version and page2.remaining_item_count == 1
    page3 = await store.get_list(resource.prefix, recursive(limit=2, continue_token=page2.continue_token))
    assert names(page3.items) == ["e"] and page3.continue_token == "" and page3.remaining_item_count is None
    assert names((await store.get_list(resource.prefix, recursive())).items) == ["a", "b", "d", "e", "f"]


@pytest.mark.asyncio
async def test_list_pages_thinned_by_label_selector_keep_fetching(store, resource):
    for i in range(40):
        labels = {"pick": "yes"} if i % 8 == 0 else {}
        await store.create(k(resource, f"o{i:02d}"), obj(f"o{i:02d}", labels=labels))
    seen, token, pages = [], "", 0
    while True:
        page = await store.get_list(resource.prefix, recursive(limit=2, label_selector="pick=yes",
                                                               continue_token=token))
        pages += 1
        assert page.remaining_item_count is None
        assert len(page.items) <= 2
        seen += names(page.items)
        token = page.continue_token
        if not token:
            break
    assert seen == ["o00", "o08", "o16", "o24", "o32"]
    assert pages == 3
    first = await store.get_list(resource.prefix, recursive(limit=2, label_selector="pick=yes"))
    assert names(first.items) == ["o00", "o08"]  # filled despite 14 of 16 keys not matching


@pytest.mark.asyncio
async def test_continue_token_misuse_is_400(store, resource):
    for n in "abc":
        await store.create(k(resource, n), obj(n))
    page = await store.get_list(resource.prefix, recursive(limit=1))
    with pytest.raises(BadRequestError):
        await store.get_list(resource.prefix, recursive(limit=1, continue_token=page.continue_token,
                                                        resource_version=page.resource_version))
    prefix = f"/registry{resource.prefix}/"
    tampered = [page.continue_token[:-3] + "!!!", "not-a-token",
                encode_continue(prefix + "../../x", prefix, page.revision),
                page.continue_token.replace("eyJ", "eyK", 1)]
    for token in tampered:
        with pytest.raises(BadRequestError):
            await store.get_list(resource.prefix, recursive(limit=1, continue_token=token))


@pytest.mark.asyncio
async def test_continue_token_is_relative_to_the_list_prefix(store, resource):
    for n in "abc":
        await store.create(k(resource, n), obj(n))
    page = await store.get_list(resource.prefix, recursive(limit=1))
    start, token_rv = decode_continue(page.continue_token, f"{resource.prefix}/")
    assert start == f"{resource.prefix}/ns/a\x00" and token_rv == page.revision


@pytest.mark.asyncio
async def test_continue_after_compaction_is_410_with_a_latest_token(store, resource):
    for n in "abcd":
        await store.create(k(resource, n), obj(n))
    page1 = await store.get_list(resource.prefix, recursive(limit=2))
    await store.create(k(resource, "e"), obj("e"))
    await store.compact(await store.get_current_resource_version())
    assert store.compact_revision() >= page1.revision + 1
    with pytest.raises(ExpiredError) as err:
        await store.get_list(resource.prefix, recursive(limit=2, continue_token=page1.continue_token))
    assert err.value.status == 410 and "continue parameter is too old" in err.value.message
    start, token_rv = decode_continue(err.value.continue_token, "/")
    assert token_rv == -1 and start == decode_continue(page1.continue_token, "/")[0]
    rest = await store.get_list(resource.prefix, recursive(limit=10, continue_token=err.value.continue_token))
    assert names(rest.items) == ["c", "d", "e"] and rest.revision > page1.revision
    with pytest.raises(ExpiredError) as plain:
        await store.get_list(resource.prefix, recursive(resource_version=str(page1.revision),
                                                        resource_version_match="Exact"))
    assert plain.value.continue_token == "" and "too old" in plain.value.message


@pytest.mark.asyncio
async def test_list_more_than_4mib_with_and_without_limit(store, resource):
    blob = "x" * 150_000
    for i in range(40):
        await store.create(k(resource, f"big{i:02d}"), obj(f"big{i:02d}", spec={"blob": blob}))
    everything = await store.get_list(resource.prefix, recursive())
    assert len(everything.items) == 40 and everything.continue_token == ""
    page = await store.get_list(resource.prefix, recursive(limit=35))
    assert len(page.items) == 35 and page.remaining_item_count == 5
    rest = await store.get_list(resource.prefix, recursive(limit=35, continue_token=page.continue_token))
    assert names(rest.items) == [f"big{i}" for i in range(35, 40)]


@pytest.mark.asyncio
async def test_stats_current_revision_readiness_version(store, resource, etcd_server):
    for n in "ab":
        await store.create(k(resource, n), obj(n))
    await store.create(f"{resource.prefix}/other/c", obj("c", ns="other"))
    assert (await store.stats()).object_count == 3
    assert await store.get_current_resource_version() >= 3
    assert await store.readiness_check() is None
    assert await store.server_version() == etcd_server.version


# ---------------------------------------------------------------------------------------------- update


@pytest.mark.asyncio
async def test_concurrent_increments_all_apply_one_revision_each(store, resource):
    start = await store.create(k(resource, "c"), obj("c", spec={"n": 0}))

    def inc(cur, meta):
        assert meta.resource_version == rv(cur)
        cur["spec"]["n"] += 1
        return cur

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(store.guaranteed_update, k(resource, "c"), inc)
    final = await store.get(k(resource, "c"))
    assert final["spec"]["n"] == 20
    async with store.watch(k(resource, "c"), ListOptions(resource_version=str(rv(start)))) as w:
        events = await take(w, 20)
    assert [e.object["spec"]["n"] for e in events] == list(range(1, 21))
    assert all(e.type is EventType.MODIFIED for e in events) and events[-1].resource_version == rv(final)


@pytest.mark.asyncio
async def test_noop_update_writes_nothing_and_keeps_resource_version(store, resource):
    created = await store.create(k(resource, "a"), obj("a"))
    before = await store.get_current_resource_version()
    same = await store.guaranteed_update(k(resource, "a"), lambda cur, meta: cur)
    assert same == created and await store.get_current_resource_version() == before
    stale_hint = dict(created)
    same = await store.guaranteed_update(k(resource, "a"), lambda cur, meta: cur, cached_existing=stale_hint)
    assert same == created and await store.get_current_resource_version() == before


@pytest.mark.asyncio
async def test_update_preconditions(store, resource):
    created = await store.create(k(resource, "a"), obj("a"))
    for pre in (Preconditions(uid="other"), Preconditions(resource_version="1")):
        with pytest.raises(PreconditionFailedError) as err:
            await store.guaranteed_update(k(resource, "a"), lambda cur, meta: {**cur, "spec": 1}, preconditions=pre)
        assert err.value.status == 409
    ok = Preconditions(uid="uid-a", resource_version=str(rv(created)))
    updated = await store.guaranteed_update(k(resource, "a"), lambda cur, meta: {**cur, "spec": 1}, preconditions=ok)
    assert updated["spec"] == 1 and rv(updated) > rv(created)


@pytest.mark.asyncio
async def test_update_with_stale_cached_existing(store, resource):
    old = await store.create(k(resource, "a"), obj("a", spec={"n": 0}))
    await store.guaranteed_update(k(resource, "a"), lambda cur, meta: {**cur, "spec": {"n": 5}})
    seen: list[int] = []

    def inc(cur, meta):
        seen.append(meta.resource_version)
        return {**cur, "spec": {"n": cur["spec"]["n"] + 1}}

    result = await store.guaranteed_update(k(resource, "a"), inc, cached_existing=old)
    assert result["spec"] == {"n": 6} and seen[0] == rv(old) and len(seen) == 2
    assert old["spec"] == {"n": 0}  # the hint is never mutated
    # A precondition that fails only on the stale hint succeeds on fresh data.
    current = await store.get(k(resource, "a"))
    again = await store.guaranteed_update(k(resource, "a"), inc, cached_existing=old,
                                          preconditions=Preconditions(resource_version=str(rv(current))))
    assert again["spec"] == {"n": 7}


@pytest.mark.asyncio
async def test_update_function_error_writes_nothing(store, resource):
    created = await store.create(k(resource, "a"), obj("a"))
    before = await store.get_current_resource_version()

    def boom(cur, meta):
        raise ValueError("refused")

    with pytest.raises(ValueError):
        await store.guaranteed_update(k(resource, "a"), boom)
    with pytest.raises(ValueError):
        await store.guaranteed_update(k(resource, "a"), boom, cached_existing=created)
    assert await store.get_current_resource_version() == before
    calls: list[int] = []

    def refuse_stale(cur, meta):  # fails on the stale hint only: the fresh round succeeds
        calls.append(meta.resource_version)
        if meta.resource_version == rv(created):
            raise ValueError("stale")
        return {**cur, "spec": "ok"}

    await store.guaranteed_update(k(resource, "a"), lambda cur, meta: {**cur, "spec": "v2"})
    result = await store.guaranteed_update(k(resource, "a"), refuse_stale, cached_existing=created)
    assert result["spec"] == "ok" and len(calls) == 2


@pytest.mark.asyncio
async def test_update_missing_key(store, resource):
    with pytest.raises(NotFoundError):
        await store.guaranteed_update(k(resource, "a"), lambda cur, meta: cur)
    got: list[tuple[dict, int]] = []

    def make(cur, meta):
        got.append((cur, meta.resource_version))
        return obj("a")

    created = await store.guaranteed_update(k(resource, "a"), make, ignore_not_found=True)
    assert got == [({}, 0)] and rv(created) == await store.get_current_resource_version()
    assert await store.get(k(resource, "a")) == created


# ---------------------------------------------------------------------------------------------- delete


@pytest.mark.asyncio
async def test_delete_returns_object_at_deletion_revision(store, resource):
    created = await store.create(k(resource, "a"), obj("a", spec={"v": 1}))
    gone = await store.delete(k(resource, "a"))
    assert rv(gone) > rv(created) and rv(gone) == await store.get_current_resource_version()
    assert gone["spec"] == {"v": 1}
    with pytest.raises(NotFoundError):
        await store.delete(k(resource, "a"))


@pytest.mark.asyncio
async def test_delete_preconditions_and_validation(store, resource):
    created = await store.create(k(resource, "a"), obj("a"))
    with pytest.raises(PreconditionFailedError):
        await store.delete(k(resource, "a"), preconditions=Preconditions(uid="someone-else"))

    def refuse(current):
        raise PreconditionFailedError("not now")

    with pytest.raises(PreconditionFailedError):
        await store.delete(k(resource, "a"), validate_deletion=refuse)
    assert await store.get(k(resource, "a")) == created
    gone = await store.delete(k(resource, "a"), preconditions=Preconditions(uid="uid-a"),
                              validate_deletion=lambda current: None)
    assert gone["metadata"]["uid"] == "uid-a"


@pytest.mark.asyncio
async def test_delete_with_stale_hint(store, resource):
    old = await store.create(k(resource, "a"), obj("a", spec={"v": 1}))
    newer = await store.guaranteed_update(k(resource, "a"), lambda cur, meta: {**cur, "spec": {"v": 2}})
    gone = await store.delete(k(resource, "a"), cached_existing=old,
                              preconditions=Preconditions(resource_version=str(rv(newer))))
    assert gone["spec"] == {"v": 2} and rv(gone) > rv(newer)
    await store.create(k(resource, "b"), obj("b"))
    hint = await store.get(k(resource, "b"))
    await store.delete(k(resource, "b"))
    with pytest.raises(NotFoundError):
        await store.delete(k(resource, "b"), cached_existing=hint)


# ---------------------------------------------------------------------------------------------- watch


@pytest.mark.asyncio
async def test_watch_from_n_excludes_n(store, resource):
    a = await store.create(k(resource, "a"), obj("a"))
    b = await store.create(k(resource, "b"), obj("b"))
    async with store.watch(resource.prefix, recursive(resource_version=str(rv(a)))) as w:
        events = await take(w, 1)
        c = await store.create(k(resource, "c"), obj("c"))
        events += await take(w, 1)
    assert summary(events) == [("ADDED", "b", rv(b)), ("ADDED", "c", rv(c))]


@pytest.mark.parametrize("start", ["0", ""])
@pytest.mark.asyncio
async def test_watch_zero_or_unset_sends_state_as_added_first(store, resource, start):
    a = await store.create(k(resource, "a"), obj("a"))
    b = await store.guaranteed_update(k(resource, "b"), lambda cur, meta: obj("b"), ignore_not_found=True)
    async with store.watch(resource.prefix, recursive(resource_version=start)) as w:
        initial = await take(w, 2)
        gone = await store.delete(k(resource, "a"))
        live = await take(w, 1)
    assert summary(initial) == [("ADDED", "a", rv(a)), ("ADDED", "b", rv(b))]
    assert summary(live) == [("DELETED", "a", rv(gone))], [e.object for e in live]


@pytest.mark.asyncio
async def test_watch_list_and_send_initial_events_false(store, resource):
    a = await store.create(k(resource, "a"), obj("a"))
    opts = recursive(send_initial_events=True, allow_watch_bookmarks=True,
                     resource_version_match="NotOlderThan", resource_version="")
    async with store.watch(resource.prefix, opts) as w:
        events = await take(w, 2)
    assert summary(events)[0] == ("ADDED", "a", rv(a))
    assert events[1].type is EventType.BOOKMARK and events[1].resource_version >= rv(a)
    assert events[1].object["metadata"]["annotations"] == {INITIAL_EVENTS_END_ANNOTATION: "true"}
    later = recursive(send_initial_events=False, resource_version_match="NotOlderThan", resource_version="")
    async with store.watch(resource.prefix, later) as w:
        b = await store.create(k(resource, "b"), obj("b"))
        assert summary(await take(w, 1)) == [("ADDED", "b", rv(b))]


@pytest.mark.asyncio
async def test_watch_list_from_future_revision_is_504_event(store, resource):
    current = await store.get_current_resource_version()
    opts = recursive(send_initial_events=True, resource_version_match="NotOlderThan",
                     resource_version=str(current + 100))
    async with store.watch(resource.prefix, opts) as w:
        events = await take(w, 2)
    assert [e.type for e in events] == [EventType.ERROR] and events[0].object["code"] == 504
    assert 1 <= events[0].object["details"]["retryAfterSeconds"] <= 3


@pytest.mark.asyncio
async def test_watch_single_key_vs_recursive_prefix(store, resource):
    start = await store.get_current_resource_version()
    x = await store.create(f"{resource.prefix}/a/x", obj("x", ns="a"))
    await store.create(f"{resource.prefix}/ab/y", obj("y", ns="ab"))
    await store.create(f"{resource.prefix}/a/z", obj("z", ns="a"))
    async with store.watch(f"{resource.prefix}/a/x", ListOptions(resource_version=str(start))) as single, \
            store.watch(f"{resource.prefix}/a", recursive(resource_version=str(start))) as prefix:
        x2 = await store.guaranteed_update(f"{resource.prefix}/a/x", lambda cur, meta: {**cur, "spec": 1})
        single_events = await take(single, 2)
        prefix_events = await take(prefix, 3)
    assert summary(single_events) == [("ADDED", "x", rv(x)), ("MODIFIED", "x", rv(x2))]
    assert [n for _, n, _ in summary(prefix_events)] == ["x", "z", "x"]


@pytest.mark.asyncio
async def test_watch_selector_transitions(store, resource):
    start = await store.get_current_resource_version()
    key = k(resource, "a")
    await store.create(key, obj("a"))
    r1 = await store.guaranteed_update(key, lambda cur, meta: obj("a", labels={"app": "web"}))
    r2 = await store.guaranteed_update(key, lambda cur, meta: obj("a", labels={"app": "web"}, spec=1))
    r3 = await store.guaranteed_update(key, lambda cur, meta: obj("a", labels={"app": "db"}))
    await store.delete(key)
    r5 = await store.create(key, obj("a", labels={"app": "web"}))
    opts = recursive(resource_version=str(start), label_selector="app=web")
    async with store.watch(resource.prefix, opts) as w:
        events = await take(w, 4)
    assert summary(events) == [("ADDED", "a", rv(r1)), ("MODIFIED", "a", rv(r2)), ("DELETED", "a", rv(r3)),
                               ("ADDED", "a", rv(r5))]
    assert events[2].object["metadata"]["labels"] == {"app": "web"}  # the last matching state


@pytest.mark.asyncio
async def test_watch_deleted_carries_previous_object_at_deletion_revision(store, resource):
    created = await store.create(k(resource, "a"), obj("a", spec={"v": 1}))
    async with store.watch(resource.prefix, recursive(resource_version=str(rv(created)))) as w:
        gone = await store.delete(k(resource, "a"))
        events = await take(w, 1)
    assert summary(events) == [("DELETED", "a", rv(gone))]
    assert events[0].object == gone and events[0].object["spec"] == {"v": 1}


@pytest.mark.asyncio
async def test_progress_notification_is_a_bookmark_only_with_progress_notify(store, resource):
    start = await store.get_current_resource_version()
    async with store.watch(resource.prefix, recursive(resource_version=str(start), progress_notify=True)) as asked, \
            store.watch(resource.prefix, recursive(resource_version=str(start))) as plain:
        await store.request_watch_progress()
        marks = await take(asked, 1)
        await store.request_watch_progress()
        await store.request_watch_progress()
        a = await store.create(k(resource, "a"), obj("a"))
        plain_events = await take(plain, 1)
    assert marks[0].type is EventType.BOOKMARK and marks[0].resource_version >= start
    assert marks[0].object == {"metadata": {"resourceVersion": str(marks[0].resource_version)}}
    assert summary(plain_events) == [("ADDED", "a", rv(a))]


@pytest.mark.asyncio
async def test_watch_from_compacted_revision_is_one_410_error_then_end(store, resource):
    start = await store.get_current_resource_version()
    for n in "abc":
        await store.create(k(resource, n), obj(n))
    await store.compact(await store.get_current_resource_version())
    async with store.watch(resource.prefix, recursive(resource_version=str(start))) as w:
        events = await take(w, 5)
        assert await w.next_batch() == []
    assert [e.type for e in events] == [EventType.ERROR]
    assert events[0].object["code"] == 410 and events[0].object["reason"] == "Expired"
    assert events[0].object["message"] == "The resourceVersion for the provided watch is too old."
    assert store.compact_revision() >= start + 3


@pytest.mark.asyncio
async def test_watch_backlog_larger_than_4mib(store, resource):
    start = await store.get_current_resource_version()
    blob = "y" * 150_000
    await store.create(k(resource, "big"), obj("big", spec={"n": 0, "blob": blob}))
    for i in range(1, 70):  # ~10 MB of history, delivered by etcd in one response
        await store.guaranteed_update(k(resource, "big"),
                                      lambda cur, meta, i=i: {**cur, "spec": {"n": i, "blob": blob}})
    async with store.watch(resource.prefix, recursive(resource_version=str(start))) as w:
        events = await take(w, 70, timeout=30)
    assert [e.object["spec"]["n"] for e in events] == list(range(70))


@pytest.mark.asyncio
async def test_slow_consumer_gets_every_event_through_backpressure(store, resource):
    start = await store.get_current_resource_version()
    for i in range(250):
        await store.create(k(resource, f"o{i:03d}"), obj(f"o{i:03d}"))
    async with store.watch(resource.prefix, recursive(resource_version=str(start))) as w:
        got: list[WatchEvent] = []
        while len(got) < 250:
            batch = await w.next_batch()
            assert 0 < len(batch) <= 100  # never more than the buffer holds
            got += batch
            await anyio.sleep(0.01)
    assert names([e.object for e in got]) == [f"o{i:03d}" for i in range(250)]


@pytest.mark.asyncio
async def test_stop_ends_the_stream_thread(store, resource):
    baseline = {t.ident for t in threading.enumerate()}
    w = store.watch(resource.prefix, recursive(progress_notify=True))
    await w.start()
    await store.request_watch_progress()
    a = await store.create(k(resource, "a"), obj("a"))
    assert any(e.resource_version == rv(a) for e in await take(w, 1))
    own = w._thread
    assert own is not None and own.is_alive()
    await w.stop()
    await w.stop()
    assert not own.is_alive() and await w.next_batch() == []
    # gRPC's helper thread that feeds the request stream ends once its iterator is released.
    with anyio.fail_after(10):
        while {t.ident for t in threading.enumerate() if t.is_alive()} - baseline - _anyio_workers():
            await anyio.sleep(0.02)


def _anyio_workers() -> set[int | None]:
    return {t.ident for t in threading.enumerate() if t.name.startswith("AnyIO worker")}


@pytest.mark.asyncio
async def test_close_stops_every_watch(etcd_server, resource):
    s = Etcd3Storage(resource, etcd_server.endpoint)
    w1 = s.watch(resource.prefix, recursive())
    w2 = s.watch(k(resource, "a"), ListOptions(resource_version="1"))
    await w1.start()
    await w2.start()
    threads = [w1._thread, w2._thread]
    await s.close()
    assert await w1.next_batch() == [] and await w2.next_batch() == []
    assert not any(t.is_alive() for t in threads)


# ---------------------------------------------------------------------------------------------- faults


@pytest.mark.asyncio
async def test_pause_kill_and_restart_of_a_private_server(resource):
    with EtcdServer() as server:
        port = server.client_port
        async with Etcd3Storage(resource, server.endpoint, request_timeout=1.0) as s:
            a = await s.create(k(resource, "a"), obj("a"))
            server.pause()
            with pytest.raises(TimeoutError_) as err:
                await s.get(k(resource, "a"))
            assert err.value.status == 504
            server.resume()
            assert await s.get(k(resource, "a")) == a
            async with s.watch(resource.prefix, recursive(resource_version=str(rv(a)))) as w:
                server.kill()
                events = await take(w, 2)
                assert [e.type for e in events] == [EventType.ERROR] and events[0].object["code"] == 500
                assert await w.next_batch() == []
            with pytest.raises((ServiceUnavailableError, TimeoutError_)):
                await s.get(k(resource, "a"))
            server.start()
            assert server.client_port == port
            with anyio.fail_after(15):  # the channel reconnects on its own (backoff capped at 2 s)
                while True:
                    try:
                        assert await s.get(k(resource, "a")) == a
                        break
                    except ServiceUnavailableError:
                        await anyio.sleep(0.1)


def test_etcd_binary_lookup(monkeypatch, tmp_path):
    monkeypatch.setenv("ETCD_BIN", str(tmp_path / "missing-etcd"))
    with pytest.raises(RuntimeError, match="ETCD_BIN"):
        find_etcd_binary()
    monkeypatch.delenv("ETCD_BIN")
    assert find_etcd_binary().endswith("etcd")


# ---------------------------------------------------------------------------------------------- units


def test_run_under_trio(etcd_server, resource):
    async def main():
        async with Etcd3Storage(resource, etcd_server.endpoint) as s:
            async with s.watch(resource.prefix, recursive()) as w:
                a = await s.create(k(resource, "a"), obj("a"))
                events = await take(w, 1)
        return a, events

    a, events = anyio.run(main, backend="trio")
    assert summary(events) == [("ADDED", "a", rv(a))]


@pytest.mark.asyncio
async def test_lease_manager_reuses_within_window_and_caps_objects():
    now = [1000.0]
    granted: list[int] = []

    async def grant(ttl: int) -> int:
        granted.append(ttl)
        return len(granted)

    leases = LeaseManager(grant, max_objects=3, clock=lambda: now[0])
    assert leases.reuse_window(100) == 5 and leases.reuse_window(10_000) == 60 and leases.reuse_window(2) == 0
    assert await leases.get_lease(100) == 1 and granted == [105]
    now[0] += 3
    assert await leases.get_lease(100) == 1  # still outlives the ttl, by less than the window
    assert await leases.get_lease(100) == 1
    assert await leases.get_lease(100) == 2  # 4th object: over the cap
    now[0] += 6
    assert await leases.get_lease(100) == 3  # lease 2 would expire before now + ttl
    assert await leases.get_lease(10) == 4  # much shorter ttl: lease 3 would outlive it too long
    assert await leases.get_lease(2) == 5 and await leases.get_lease(2) == 6  # no window: never reused


def test_prefix_end_and_error_translation():
    assert prefix_end(b"/registry/pods/") == b"/registry/pods0"
    assert prefix_end(b"a\xff") == b"b" and prefix_end(b"\xff\xff") == b"\x00"

    class FakeError(Exception):
        def __init__(self, code, details):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

    import grpc
    cases = {
        (grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted"): 410,
        (grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision is a future revision"): 504,
        (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large"): 413,
        (grpc.StatusCode.UNAVAILABLE, "connection refused"): 503,
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"): 504,
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests"): 429,
        (grpc.StatusCode.INTERNAL, "boom"): 500,
    }
    for (code, details), status in cases.items():
        assert translate_rpc_error(FakeError(code, details)).status == status
    assert isinstance(translate_rpc_error(FakeError(grpc.StatusCode.CANCELLED, ""), closed=True),
                      StorageClosedError)
