"""One mode of the cluster benchmark: the simulated cluster's actors against one API (cache or direct).

Runs in its own process (see ``cluster.py``), against a fresh key prefix or a fresh MemoryKV:

1. populate: node Leases and ``nodes x pods_per_node`` Running pods, written straight to storage;
2. (cache mode) one Cacher per resource over the storage, ready;
3. start the watchers: each LISTs at resourceVersion "0" and watches from the list's resourceVersion
   (node agents: ``spec.nodeName=<node>``; scheduler and controllers: cluster-wide; the node lifecycle
   controller: all Leases);
4. steady state for ``duration`` seconds: pod churn (create -> bind -> Running -> delete) at ``churn``
   writes/s, Lease renewals every 10 s per node (guaranteed_update), controllers' periodic LISTs;
5. stop the writers (in-flight writes finish and are logged), drain the watchers (bounded wait until
   each has what the write log says it must get), stop everything, check and measure.

Every write, watch and list goes through ``api`` = the Cacher (cache mode) or the storage (direct
mode); the storage is wrapped in a CountingStorage either way, so upstream watches are counted where
they are really opened.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict, deque
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import anyio

from benchmarks.instrument import CountingStorage, RSSSampler, peak_rss_self, summarize_ms
from benchmarks.objects import (LEASE_NAMESPACE, LEASES, PODS, ObjectFactory, build_layout, lease_key,
                                now_rfc3339, pod_key)
from benchmarks.verify import (CREATE, DELETE, UPDATE, LogEntry, compare_stream, expected_events,
                               is_prefix_in_order)
from storage.interface import EventType, ListOptions

perf = time.perf_counter

#: Controllers' periodic LISTs: kind -> seconds between two lists of that kind.
DEFAULT_LIST_INTERVALS = {"pods by label (namespace)": 2.0, "pods by node (field)": 2.0,
                          "pods all": 5.0, "leases all": 5.0}
#: Share of new pods created already bound to a node (DaemonSet-like); the rest go through the scheduler.
DIRECTLY_BOUND_SHARE = 0.2
LEASE_RENEW_SECONDS = 10.0


@dataclass
class ModeConfig:
    """Everything one mode's process needs (JSON-serialisable)."""

    mode: str  # "cache" | "direct"
    backend: str  # "etcd3" | "memory"
    endpoints: list[str]
    path_prefix: str
    nodes: int
    pods_per_node: int
    churn: float
    duration: float
    seed: int
    etcd_pid: int | None = None
    anyio_backend: str = "asyncio"
    drain_timeout: float = 180.0
    drain_stall_timeout: float = 15.0
    list_intervals: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LIST_INTERVALS))
    write_concurrency: int = 16
    setup_concurrency: int = 32
    list_concurrency: int = 8
    cleanup: bool = False


@dataclass
class WatcherState:
    """One watcher: its selector (as the API sees it and as an independent predicate) and what it got."""

    name: str
    group: str  # node-agent | cluster-wide | leases
    resource_prefix: str
    key: str
    label_selector: str
    field_selector: str
    predicate: Callable[[Mapping[str, str], tuple[str, str]], bool]
    start_rv: int = 0
    received: list[tuple[str, int, str]] = field(default_factory=list)
    recv_times: list[float] = field(default_factory=list)
    bookmarks: int = 0
    ended: str | None = None  # why the stream ended while we were still reading it
    listed: int = 0


@dataclass(eq=False)
class PodRec:
    key: str
    labels: dict[str, str]
    node: str
    phase: str


class IdlePods:
    """Running pods with no write in flight; O(1) add and random removal."""

    def __init__(self) -> None:
        self._items: list[PodRec] = []
        self._pos: dict[PodRec, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, rec: PodRec) -> None:
        self._pos[rec] = len(self._items)
        self._items.append(rec)

    def pop_random(self, rng: random.Random) -> PodRec:
        i = rng.randrange(len(self._items))
        rec, last = self._items[i], self._items[-1]
        self._items[i] = last
        self._pos[last] = i
        self._items.pop()
        del self._pos[rec]
        return rec


class ClusterRun:
    """The simulated cluster for one mode. ``emit(dict)`` reports progress to the parent."""

    def __init__(self, cfg: ModeConfig, emit: Callable[[dict[str, Any]], None]) -> None:
        self.cfg = cfg
        self.emit = emit
        self.rng = random.Random(cfg.seed)
        self.layout = build_layout(cfg.nodes, cfg.pods_per_node, self.rng)
        self.factory = ObjectFactory(self.layout, self.rng)
        self.log: list[LogEntry] = []
        self.write_lat: dict[str, list[float]] = defaultdict(list)
        self.write_errors: Counter[str] = Counter()
        self.error_examples: list[str] = []
        self.list_lat: dict[str, list[float]] = defaultdict(list)
        self.list_items: dict[str, int] = defaultdict(int)
        self.list_errors: Counter[str] = Counter()
        self.list_bad: Counter[str] = Counter()
        self.watchers: list[WatcherState] = []
        self.pods: dict[str, PodRec] = {}
        self.idle = IdlePods()
        self.followups: deque[tuple[str, PodRec]] = deque()
        self.target_pods = 0
        self.leases_busy: set[str] = set()
        self.timings: dict[str, float] = {}
        self.phase = "init"
        self.drain_outcome = "not run"

    # ---- helpers ---------------------------------------------------------------------------------
    def _progress(self, phase: str, done: float, total: float, **info: Any) -> None:
        self.emit({"type": "progress", "mode": self.cfg.mode, "phase": phase, "done": done, "total": total,
                   **info})

    def _storage(self, resource, kv):
        from storage.factory import StorageConfig, create_storage
        cfg = StorageConfig(resource=resource, type=self.cfg.backend, endpoints=list(self.cfg.endpoints),
                            prefix=self.cfg.path_prefix, memory_kv=kv)
        return CountingStorage(create_storage(cfg))

    def _error(self, what: str, exc: BaseException) -> None:
        self.write_errors[what] += 1
        if len(self.error_examples) < 10:
            self.error_examples.append(f"{what}: {type(exc).__name__}: {exc}")

    # ---- the run ---------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        kv = None
        if cfg.backend == "memory":
            from storage.memory.mvcc import MemoryKV
            kv = MemoryKV()
        self.pods_store = self._storage(PODS, kv)
        self.leases_store = self._storage(LEASES, kv)
        self.sampler = RSSSampler(cfg.etcd_pid)
        self.sampler.sample()
        rss_start = self.sampler.self_peak
        self.cachers: list[Any] = []
        t_begin = perf()
        async with anyio.create_task_group() as bg:
            bg.start_soon(self._sample_loop)
            async with self.pods_store, self.leases_store, AsyncExitStack() as stack:
                t = perf()
                await self._populate()
                self.timings["populate_s"] = perf() - t
                if cfg.mode == "cache":
                    from cacher.cacher import Cacher
                    t = perf()
                    self._progress("cache sync", 0, 2)
                    pc = await stack.enter_async_context(Cacher(self.pods_store))
                    lc = await stack.enter_async_context(Cacher(self.leases_store))
                    await pc.wait_ready(120)
                    self._progress("cache sync", 1, 2)
                    await lc.wait_ready(120)
                    self._progress("cache sync", 2, 2)
                    self.cachers = [pc, lc]
                    self.timings["cache_sync_s"] = perf() - t
                    self.api_pods, self.api_leases = pc, lc
                else:
                    self.api_pods, self.api_leases = self.pods_store, self.leases_store
                self.sampler.sample()
                rss_setup = self.sampler.self_peak
                result = await self._run_actors()
                if cfg.cleanup:
                    await self._cleanup()
            bg.cancel_scope.cancel()
        self.timings["total_s"] = perf() - t_begin
        self.sampler.sample()
        result["memory"] = {
            "peak_rss_bytes": max(peak_rss_self(), self.sampler.self_peak),
            "rss_at_start_bytes": rss_start,
            "rss_after_setup_bytes": rss_setup,
            "etcd_peak_rss_bytes": self.sampler.other_peak or None,
            "etcd_rss_at_start_bytes": self.sampler.other_first,
            "samples": self.sampler.samples[:: max(1, len(self.sampler.samples) // 200)],
        }
        result["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return result

    async def _sample_loop(self) -> None:
        while True:
            self.sampler.sample()
            await anyio.sleep(0.5)

    # ---- populate --------------------------------------------------------------------------------
    async def _populate(self) -> None:
        cfg, layout, factory = self.cfg, self.layout, self.factory
        jobs: list[tuple[str, Any]] = [("lease", node) for node in layout.nodes]
        node_iter = 0
        for dep in layout.deployments:
            for _ in range(dep.replicas):
                node = layout.nodes[node_iter % len(layout.nodes)]
                node_iter += 1
                jobs.append(("pod", (dep, node)))
        total, done = len(jobs), 0
        limiter = anyio.CapacityLimiter(cfg.setup_concurrency)
        self._progress("populate", 0, total)

        async def one(kind: str, arg: Any) -> None:
            nonlocal done
            async with limiter:
                if kind == "lease":
                    lease = factory.new_lease(arg)
                    out = await self.leases_store.create(lease_key(arg), lease)
                    self.log.append(LogEntry(int(out["metadata"]["resourceVersion"]), lease_key(arg), CREATE,
                                             {}, None, ("", ""), perf()))
                else:
                    dep, node = arg
                    pod = factory.new_pod(dep, node, running=True)
                    key = pod_key(pod)
                    out = await self.pods_store.create(key, pod)
                    rec = PodRec(key, dict(dep.labels), node, "Running")
                    self.pods[key] = rec
                    self.idle.add(rec)
                    self.log.append(LogEntry(int(out["metadata"]["resourceVersion"]), key, CREATE, rec.labels,
                                             None, (node, "Running"), perf()))
            done += 1
            if done % 250 == 0 or done == total:
                self._progress("populate", done, total)

        async with anyio.create_task_group() as tg:
            for kind, arg in jobs:
                tg.start_soon(one, kind, arg)
        self.target_pods = len(self.pods)

    async def _cleanup(self) -> None:
        """Delete everything this run wrote (only when running against an existing etcd)."""
        limiter = anyio.CapacityLimiter(self.cfg.setup_concurrency)

        async def rm(store: Any, key: str) -> None:
            async with limiter:
                try:
                    await store.delete(key)
                except Exception:  # noqa: BLE001 - best effort
                    pass

        async with anyio.create_task_group() as tg:
            for key in list(self.pods):
                tg.start_soon(rm, self.pods_store, key)
            for node in self.layout.nodes:
                tg.start_soon(rm, self.leases_store, lease_key(node))

    # ---- watchers --------------------------------------------------------------------------------
    def _make_watchers(self) -> list[WatcherState]:
        out: list[WatcherState] = []
        for node in self.layout.nodes:
            out.append(WatcherState(f"kubelet/{node}", "node-agent", "/pods", "/pods", "",
                                    f"spec.nodeName={node}", lambda labels, st, n=node: st[0] == n))
        out.append(WatcherState("scheduler", "cluster-wide", "/pods", "/pods", "", "",
                                lambda labels, st: True))
        out.append(WatcherState("scheduler/unassigned", "cluster-wide", "/pods", "/pods", "",
                                "spec.nodeName=", lambda labels, st: st[0] == ""))
        out.append(WatcherState("replicaset-controller", "cluster-wide", "/pods", "/pods", "group=load", "",
                                lambda labels, st: labels.get("group") == "load"))
        out.append(WatcherState("endpointslice-controller", "cluster-wide", "/pods", "/pods", "svc", "",
                                lambda labels, st: "svc" in labels))
        out.append(WatcherState("node-lifecycle-controller", "leases", "/leases",
                                f"/leases/{LEASE_NAMESPACE}", "", "", lambda labels, st: True))
        return out

    async def _watch(self, ws: WatcherState, limiter: anyio.CapacityLimiter, ready: Callable[[], None]) -> None:
        api = self.api_pods if ws.resource_prefix == "/pods" else self.api_leases
        prefix = ws.resource_prefix
        started = False
        try:
            async with limiter:
                t = perf()
                page = await api.get_list(ws.key, ListOptions(resource_version="0", recursive=True,
                                                              label_selector=ws.label_selector,
                                                              field_selector=ws.field_selector))
                self.list_lat[f"initial list ({ws.group})"].append(perf() - t)
                ws.listed = len(page.items)
                ws.start_rv = page.revision
            opts = ListOptions(resource_version=page.resource_version, recursive=True,
                               label_selector=ws.label_selector, field_selector=ws.field_selector,
                               allow_watch_bookmarks=True)
            async with api.watch(ws.key, opts) as w:
                started = True
                ready()
                received, times = ws.received, ws.recv_times
                BOOKMARK, ERROR = EventType.BOOKMARK, EventType.ERROR
                while True:
                    batch = await w.next_batch()
                    if not batch:
                        reason = getattr(w, "termination", None)
                        ws.ended = f"stream ended ({reason.value if reason else 'no reason'})"
                        return
                    now = perf()
                    for ev in batch:
                        typ = ev.type
                        if typ is BOOKMARK:
                            ws.bookmarks += 1
                            continue
                        if typ is ERROR:
                            ws.ended = f"ERROR event: {ev.object.get('message', ev.object)}"
                            continue
                        meta = ev.object["metadata"]
                        received.append((f"{prefix}/{meta['namespace']}/{meta['name']}",
                                         int(meta["resourceVersion"]), typ.value))
                        times.append(now)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:  # noqa: BLE001 - reported as a failed watcher
            ws.ended = f"{'watch' if started else 'start'} failed: {type(exc).__name__}: {exc}"
        finally:
            if not started:
                ready()

    async def _start_watchers(self, tg: anyio.abc.TaskGroup) -> None:
        self.watchers = self._make_watchers()
        total = len(self.watchers)
        limiter = anyio.CapacityLimiter(self.cfg.list_concurrency)
        all_ready = anyio.Event()
        count = 0

        def ready() -> None:
            nonlocal count
            count += 1
            if count % 10 == 0 or count == total:
                self._progress("watchers", count, total)
            if count == total:
                all_ready.set()

        self._progress("watchers", 0, total)
        for ws in self.watchers:
            tg.start_soon(self._watch, ws, limiter, ready)
        await all_ready.wait()

    # ---- writers ---------------------------------------------------------------------------------
    def _next_pod_op(self) -> tuple[str, PodRec, Any] | None:
        if self.followups:
            op, rec = self.followups.popleft()
            return op, rec, None
        if len(self.pods) > self.target_pods and len(self.idle):
            return "delete", self.idle.pop_random(self.rng), None
        dep = self.rng.choice(self.layout.deployments)
        bound = self.rng.random() < DIRECTLY_BOUND_SHARE
        node = self.rng.choice(self.layout.nodes) if bound else None
        pod = self.factory.new_pod(dep, node, running=False)
        rec = PodRec(pod_key(pod), dict(dep.labels), node or "", "Pending")
        self.pods[rec.key] = rec
        return "create", rec, pod

    async def _pod_write(self, op: str, rec: PodRec, pod: Any, limiter: anyio.CapacityLimiter) -> None:
        api = self.api_pods
        async with limiter:
            before = (rec.node, rec.phase) if op != "create" else None
            t0 = perf()
            try:
                with anyio.CancelScope(shield=True):
                    if op == "create":
                        out = await api.create(rec.key, pod)
                        after: tuple[str, str] | None = (rec.node, rec.phase)
                    elif op == "bind":
                        node = self.rng.choice(self.layout.nodes)
                        out = await api.guaranteed_update(rec.key, lambda cur, meta: self.factory.bind(cur, node))
                        rec.node = node
                        after = (node, rec.phase)
                    elif op == "status":
                        out = await api.guaranteed_update(
                            rec.key, lambda cur, meta: self.factory.set_running(cur, rec.node))
                        rec.phase = "Running"
                        after = (rec.node, "Running")
                    else:
                        out = await api.delete(rec.key)
                        after = None
            except Exception as exc:  # noqa: BLE001 - counted; the pod is dropped from the simulation
                self._error(f"pod {op}", exc)
                self.pods.pop(rec.key, None)
                return
            t_ack = perf()
            self.write_lat[f"pod {op}"].append(t_ack - t0)
            self.log.append(LogEntry(int(out["metadata"]["resourceVersion"]), rec.key,
                                     DELETE if op == "delete" else (CREATE if op == "create" else UPDATE),
                                     rec.labels, before, after, t_ack, t0))
        if op == "create":
            self.followups.append(("status" if rec.node else "bind", rec))
        elif op == "bind":
            self.followups.append(("status", rec))
        elif op == "status":
            self.idle.add(rec)
        else:
            self.pods.pop(rec.key, None)

    async def _pod_churn(self, stop: anyio.Event) -> None:
        if self.cfg.churn <= 0:
            return
        interval = 1.0 / self.cfg.churn
        limiter = anyio.CapacityLimiter(self.cfg.write_concurrency)
        async with anyio.create_task_group() as tg:
            next_t = perf()
            while not stop.is_set():
                next_t += interval
                delay = next_t - perf()
                if delay > 0:
                    with anyio.move_on_after(delay):
                        await stop.wait()
                if stop.is_set():
                    break
                op = self._next_pod_op()
                if op is not None:
                    tg.start_soon(self._pod_write, *op, limiter)
            # leaving the task group waits for writes in flight: every acknowledged write is logged

    async def _lease_write(self, node: str, limiter: anyio.CapacityLimiter) -> None:
        key = lease_key(node)

        def renew(cur: dict[str, Any], meta: Any) -> dict[str, Any]:
            cur["spec"]["renewTime"] = now_rfc3339(micro=True)
            return cur

        async with limiter:
            t0 = perf()
            try:
                with anyio.CancelScope(shield=True):
                    out = await self.api_leases.guaranteed_update(key, renew)
            except Exception as exc:  # noqa: BLE001
                self._error("lease renew", exc)
                return
            finally:
                self.leases_busy.discard(node)
            t_ack = perf()
            self.write_lat["lease renew"].append(t_ack - t0)
            self.log.append(LogEntry(int(out["metadata"]["resourceVersion"]), key, UPDATE, {}, ("", ""),
                                     ("", ""), t_ack, t0))

    async def _lease_renewals(self, stop: anyio.Event) -> None:
        nodes = list(self.layout.nodes)
        self.rng.shuffle(nodes)
        interval = LEASE_RENEW_SECONDS / len(nodes)
        limiter = anyio.CapacityLimiter(self.cfg.write_concurrency)
        async with anyio.create_task_group() as tg:
            next_t, i = perf(), 0
            while not stop.is_set():
                next_t += interval
                delay = next_t - perf()
                if delay > 0:
                    with anyio.move_on_after(delay):
                        await stop.wait()
                if stop.is_set():
                    break
                node = nodes[i % len(nodes)]
                i += 1
                if node in self.leases_busy:
                    continue  # the previous renewal of this node is still in flight
                self.leases_busy.add(node)
                tg.start_soon(self._lease_write, node, limiter)

    # ---- controllers' lists ----------------------------------------------------------------------
    async def _list_loop(self, kind: str, interval: float) -> None:
        rng = random.Random(hash((self.cfg.seed, kind)))
        await anyio.sleep(rng.uniform(0, interval))
        while True:
            check: Callable[[dict[str, Any]], bool]
            if kind == "pods by label (namespace)":
                dep = rng.choice(self.layout.deployments)
                api, key, opts = self.api_pods, f"/pods/{dep.namespace}", ListOptions(
                    resource_version="0", recursive=True, label_selector=f"app={dep.name}")
                check = (lambda o, d=dep: o["metadata"]["namespace"] == d.namespace
                         and o["metadata"]["labels"].get("app") == d.name)
            elif kind == "pods by node (field)":
                node = rng.choice(self.layout.nodes)
                api, key, opts = self.api_pods, "/pods", ListOptions(
                    resource_version="0", recursive=True, field_selector=f"spec.nodeName={node}")
                check = lambda o, n=node: o["spec"].get("nodeName") == n  # noqa: E731
            elif kind == "pods all":
                api, key, opts = self.api_pods, "/pods", ListOptions(resource_version="0", recursive=True)
                check = lambda o: True  # noqa: E731
            else:
                api, key, opts = self.api_leases, f"/leases/{LEASE_NAMESPACE}", ListOptions(
                    resource_version="0", recursive=True)
                check = lambda o: o["metadata"]["namespace"] == LEASE_NAMESPACE  # noqa: E731
            t = perf()
            try:
                page = await api.get_list(key, opts)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # noqa: BLE001
                self.list_errors[kind] += 1
                if len(self.error_examples) < 10:
                    self.error_examples.append(f"list {kind}: {type(exc).__name__}: {exc}")
            else:
                self.list_lat[kind].append(perf() - t)
                self.list_items[kind] += len(page.items)
                # sanity: every item matches the selector, items in key order, no duplicates
                keys = [f"{o['metadata'].get('namespace')}/{o['metadata']['name']}" for o in page.items]
                if not all(map(check, page.items)) or keys != sorted(set(keys)):
                    self.list_bad[kind] += 1
                    if len(self.error_examples) < 10:
                        self.error_examples.append(f"list {kind}: item not matching the selector, "
                                                   f"duplicate or out of key order")
            await anyio.sleep(max(0.0, interval - (perf() - t)))

    # ---- steady state, drain, results ------------------------------------------------------------
    def _counters(self) -> dict[str, int]:
        pod_writes = sum(1 for e in self.log if e.key.startswith("/pods/"))
        return {"events": self.pods_store.events + self.leases_store.events,
                "writes": len(self.log), "pod_writes": pod_writes, "lease_writes": len(self.log) - pod_writes,
                "delivered": sum(len(w.received) for w in self.watchers)}

    async def _run_actors(self) -> dict[str, Any]:
        cfg = self.cfg
        async with anyio.create_task_group() as watch_tg:
            t = perf()
            await self._start_watchers(watch_tg)
            self.timings["watchers_start_s"] = perf() - t
            self.sampler.sample()
            writes_before = len(self.log)
            c0, t0 = self._counters(), perf()
            stop = anyio.Event()
            held_samples: list[int] = []
            async with anyio.create_task_group() as load_tg:
                writers = anyio.create_task_group()
                async with writers:
                    writers.start_soon(self._pod_churn, stop)
                    writers.start_soon(self._lease_renewals, stop)
                    for kind, interval in cfg.list_intervals.items():
                        if interval > 0:
                            load_tg.start_soon(self._list_loop, kind, interval)
                    while perf() - t0 < cfg.duration:
                        await anyio.sleep(min(1.0, max(0.0, cfg.duration - (perf() - t0))))
                        held_samples.append(self.pods_store.active + self.leases_store.active)
                        c = self._counters()
                        el = perf() - t0
                        self._progress("steady", min(el, cfg.duration), cfg.duration,
                                       writes=c["writes"] - c0["writes"], events=c["events"] - c0["events"],
                                       delivered=c["delivered"] - c0["delivered"])
                    stop.set()
                    t1 = perf()
                    c1 = self._counters()
                load_tg.cancel_scope.cancel()  # controllers' lists
            window = t1 - t0
            self.timings["steady_s"] = window
            t_drain = perf()
            # ---- drain: wait (bounded) until every watcher has what the log says it must get
            self.log.sort(key=lambda e: e.rv)
            expected = {id(ws): expected_events(self.log, ws.key.rstrip("/") + "/", ws.predicate, ws.start_rv)
                        for ws in self.watchers}
            deadline = perf() + cfg.drain_timeout
            total_exp = sum(len(v) for v in expected.values())
            last_got, last_change = -1, perf()
            self.drain_outcome = "timeout"
            while perf() < deadline:
                pending = [ws for ws in self.watchers
                           if ws.ended is None and len(ws.received) < len(expected[id(ws)])]
                got = sum(min(len(ws.received), len(expected[id(ws)])) for ws in self.watchers)
                self._progress("drain", got, total_exp)
                if not pending:
                    self.drain_outcome = "complete"
                    break
                if got != last_got:
                    last_got, last_change = got, perf()
                elif perf() - last_change > cfg.drain_stall_timeout:
                    self.drain_outcome = "stalled"
                    break
                await anyio.sleep(0.1)
            await anyio.sleep(0.2)  # let anything extra (duplicates) arrive before we stop
            self.timings["drain_s"] = perf() - t_drain
            watches_held_end = self.pods_store.active + self.leases_store.active
            watch_tg.cancel_scope.cancel()
        c2 = self._counters()
        terminated_by_dispatcher = sum(c.dispatcher.terminated for c in self.cachers)
        return self._results(expected, c0, c1, c2, window, writes_before, held_samples, watches_held_end,
                             terminated_by_dispatcher)

    def _results(self, expected: dict[int, list], c0: dict, c1: dict, c2: dict, window: float,
                 writes_before: int, held_samples: list[int], held_end: int, terminated: int) -> dict[str, Any]:
        cfg = self.cfg
        acks = {(e.key, e.rv): (e.t_ack, e.t_issue) for e in self.log}
        # ---- correctness
        mismatches, ok_count = [], 0
        lagging = wrong = ended = 0
        for ws in self.watchers:
            exp = expected[id(ws)]
            cmp = compare_stream(exp, ws.received)
            if cmp["ok"] and ws.ended is None:
                ok_count += 1
                continue
            prefix_ok = is_prefix_in_order(exp, ws.received)
            if not prefix_ok:
                wrong += 1
                status = "wrong"
            elif ws.ended is not None:
                ended += 1
                status = "ended early (in order until then)"
            else:
                lagging += 1
                status = "lagging (in order, incomplete when the drain ended)"
            cmp.update(watcher=ws.name, status=status, ended=ws.ended, start_rv=ws.start_rv,
                       prefix_in_order=prefix_ok)
            mismatches.append(cmp)
        mismatches.sort(key=lambda m: (m["status"] != "wrong", m["watcher"]))
        n = len(self.watchers)
        if ok_count == n:
            summary = f"all {n} watchers complete and in order"
        else:
            parts = [f"{ok_count} of {n} watchers complete and in order"]
            if wrong:
                parts.append(f"{wrong} WRONG (gap, duplicate, reorder or unexpected event)")
            if lagging:
                drain_s = self.timings.get("drain_s", 0)
                parts.append(f"{lagging} lagging (in order but incomplete after a {drain_s:.0f} s "
                             f"drain, {self.drain_outcome})")
            if ended:
                parts.append(f"{ended} ended early (in order until then)")
            summary = "; ".join(parts)
        lists_bad = sum(self.list_bad.values())
        if lists_bad:
            summary += f"; {lists_bad} LIST results WRONG (selector, order or duplicates)"
        # ---- delivery latency: write acknowledged -> watcher received
        lat: dict[str, list[float]] = defaultdict(list)
        from_issue: list[float] = []
        early = unmatched = 0
        for ws in self.watchers:
            for (key, rv, _typ), t in zip(ws.received, ws.recv_times):
                times = acks.get((key, rv))
                if times is None:
                    unmatched += 1
                    continue
                t_ack, t_issue = times
                d = t - t_ack
                if d < 0:
                    early += 1
                    d = 0.0
                lat[ws.group].append(d)
                if t_issue:
                    from_issue.append(t - t_issue)
        all_lat = [x for v in lat.values() for x in v]
        stores = [self.pods_store, self.leases_store]
        pod_writes = c1["pod_writes"] - c0["pod_writes"]
        writes = c1["writes"] - c0["writes"]
        # what etcd streams: every watch on a prefix receives every change under that prefix
        watches_by_prefix = Counter(ws.resource_prefix for ws in self.watchers)
        lease_writes = writes - pod_writes
        if cfg.mode == "cache":
            streamed = pod_writes + lease_writes
        else:
            streamed = pod_writes * watches_by_prefix["/pods"] + lease_writes * watches_by_prefix["/leases"]
        return {
            "mode": cfg.mode,
            "backend": cfg.backend,
            "path_prefix": cfg.path_prefix,
            "objects": {"pods_initial": self.target_pods, "nodes": cfg.nodes, "leases": cfg.nodes,
                        "deployments": len(self.layout.deployments), "namespaces": len(self.layout.namespaces)},
            "watchers": {"total": n, "by_group": dict(Counter(ws.group for ws in self.watchers))},
            "upstream_watches": {
                "held": max(held_samples) if held_samples else held_end,
                "held_min": min(held_samples) if held_samples else held_end,
                "held_at_end": held_end,
                "opened_total": sum(s.opened for s in stores),
                "by_resource": {s.resource.prefix: {"opened": s.opened, "peak": s.peak_active} for s in stores},
                "expected": len(self.cachers) if cfg.mode == "cache" else n,
            },
            "events_ingested": {
                "per_s": (c1["events"] - c0["events"]) / window if window else None,
                "total_in_window": c1["events"] - c0["events"],
                "total_with_drain": c2["events"] - c0["events"],
                "streamed_per_s_computed": streamed / window if window else None,
                "bookmarks": sum(s.bookmarks for s in stores),
                "errors": sum(s.errors for s in stores),
            },
            "events_delivered": {"total": c2["delivered"] - c0["delivered"],
                                 "per_s": (c1["delivered"] - c0["delivered"]) / window if window else None},
            "writes": {
                "total": writes, "per_s": writes / window if window else None,
                "pod_writes": pod_writes, "lease_writes": lease_writes,
                "target_pod_writes_per_s": cfg.churn, "target_lease_writes_per_s": cfg.nodes / LEASE_RENEW_SECONDS,
                "latency": {op: summarize_ms(v) for op, v in sorted(self.write_lat.items())},
                "errors": dict(self.write_errors),
            },
            "delivery_latency": {
                "all": summarize_ms(all_lat),
                "by_group": {g: summarize_ms(v) for g, v in sorted(lat.items())},
                "received_before_ack": early,
                "received_before_ack_share": early / len(all_lat) if all_lat else None,
                "received_before_ack_note": "events received before the writer's await returned are "
                                            "counted as 0 ms",
                "from_write_start": summarize_ms(from_issue),
                "unmatched": unmatched,
            },
            "list_latency": {k: {**summarize_ms(v), "avg_items": (self.list_items[k] / len(v)) if v and k in
                                 self.list_items else None, "errors": self.list_errors.get(k, 0),
                                 "bad_results": self.list_bad.get(k, 0)}
                             for k, v in sorted(self.list_lat.items())},
            "watchers_terminated": {
                "total": sum(1 for ws in self.watchers if ws.ended is not None),
                "by_dispatcher": terminated,
                "ended_unexpectedly": [{"watcher": ws.name, "why": ws.ended}
                                       for ws in self.watchers if ws.ended is not None][:20],
            },
            "reflector": ({c.resource.prefix: {"lists": c.reflector.lists, "watches_opened": c.reflector.watches_opened}
                           for c in self.cachers} if self.cachers else None),
            "correctness": {"ok": ok_count == n and not lists_bad, "lists_bad": lists_bad,
                            "lists_checked": sum(len(v) for k, v in self.list_lat.items()
                                                 if not k.startswith("initial")),
                            "watchers": n, "complete_in_order": ok_count,
                            "wrong": wrong, "lagging": lagging, "ended_early": ended,
                            "drain": self.drain_outcome, "summary": summary, "mismatches": mismatches[:10],
                            "expected_events": sum(len(v) for v in expected.values())},
            "errors": self.error_examples,
            "config": asdict(cfg),
        }
