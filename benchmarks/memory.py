"""Memory benchmark: cache memory per stored object (against its JSON size) and per idle watcher
(cache watcher against a direct storage watch), side by side in one run.

    python -m benchmarks.memory                          # 30,000 pods; 1,000 and 10,000 idle watchers
    python -m benchmarks.memory --pods 5000 --watchers 1000 --repeats 1
    python -m benchmarks.memory --backend etcd3          # Cacher over an embedded etcd

Every measurement runs in a fresh child process, ``--repeats`` times; the table shows medians.

Per object: ``--pods`` pods from the real pod dump are written to the storage first (memory backend by
default: its MVCC store keeps the JSON bytes in this process, so it is filled *before* measuring and the
figures are deltas around the cache fill only). Then, after ``gc.collect()``:

- RSS pass: RSS before, Cacher started and synced, ``gc.collect()``, RSS after; (after - before) / pods;
- tracemalloc pass (the first Cacher closed): ``tracemalloc.start()``, a second Cacher synced,
  ``gc.collect()``, traced bytes still alive / pods: the Cacher's own Python allocations (objects,
  store, indexes, attributes, history), not the backend's;
- floor: tracemalloc of just ``orjson.loads`` of every pod's JSON kept in a list (what any cache of
  decoded objects must hold at least).

JSON size: ``len(orjson.dumps(pod))`` as stored (resourceVersion stamped by the storage).

Per idle watcher (``--watchers`` counts, ``--scopes``): over the same storage with ``--watcher-pods``
pods, K watchers are opened at the current revision (no initial events), each with a consumer task
waiting in ``next_batch()``; node-scoped watchers select ``spec.nodeName=<a distinct node>``,
cluster-wide ones nothing. Cache: K Cacher watchers over one Cacher; direct: K storage watches
(memory backend: one in-process watch each; etcd3: one gRPC stream and one thread each, capped at
``--direct-etcd-max``). Measured like the objects: RSS delta / K (first pass) and tracemalloc delta / K
(second pass, after the first pass's watchers were stopped). Both include the consumer task.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

from benchmarks.common import (child_entry, fill, host_info, make_pods, make_storage, median, now_iso,
                               pods_for_total, ratio, run_child, start_etcd, table, write_report)

perf = time.perf_counter


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _top_sites(snapshot: Any, per: int, top: int = 8) -> list[dict[str, Any]]:
    """The biggest live allocation sites of a tracemalloc snapshot, bytes per object/watcher."""
    return [{"site": str(st.traceback[0]), "bytes_per": round(st.size / per, 1), "count": st.count}
            for st in snapshot.statistics("lineno")[:top]]


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    import anyio
    return anyio.run(_objects if cfg["what"] == "objects" else _watchers, cfg)


async def _storage(cfg: dict[str, Any]) -> Any:
    kv = None
    if cfg["backend"] == "memory":
        from storage.memory.mvcc import MemoryKV
        kv = MemoryKV()
    return make_storage(cfg["backend"], cfg["endpoints"], cfg["prefix"], kv)


async def _objects(cfg: dict[str, Any]) -> dict[str, Any]:
    import tracemalloc

    import orjson

    from cacher.cacher import Cacher
    from storage.interface import ListOptions

    _, pods = pods_for_total(cfg["pods"], cfg["seed"], lazy=True)
    storage = await _storage(cfg)
    out: dict[str, Any] = {}
    sizes = [0, 0]

    def on_created(obj: dict[str, Any]) -> None:
        sizes[0] += 1
        sizes[1] += len(orjson.dumps(obj))

    async with storage:
        # pods are built one at a time and dropped once written: little freed heap for the Cacher to reuse
        await fill(storage, pods, 64, on_created=on_created)
        n = sizes[0]
        out["pods"] = n
        out["json_bytes_per_object"] = sizes[1] / n
        gc.collect()
        # RSS pass
        rss0 = _rss()
        t = perf()
        async with Cacher(storage, consistency_checks=False) as c:
            await c.wait_ready(900)
            out["cache_sync_s"] = perf() - t
            gc.collect()
            rss1 = _rss()
            out["cached_objects"] = len(c.watch_cache.store)
        out["rss_bytes_per_object"] = (rss1 - rss0) / n
        gc.collect()
        # tracemalloc pass
        tracemalloc.start()
        async with Cacher(storage, consistency_checks=False) as c:
            await c.wait_ready(900)
            gc.collect()
            traced, _ = tracemalloc.get_traced_memory()
            out["traced_bytes_per_object"] = traced / n
            out["top_allocation_sites"] = _top_sites(tracemalloc.take_snapshot(), n)
        tracemalloc.stop()
        gc.collect()
        # floor: the decoded objects alone (last: it allocates and frees a lot)
        stored = (await storage.get_list("/pods", ListOptions(recursive=True))).items
        blobs = [orjson.dumps(p) for p in stored]
        del stored
        gc.collect()
        tracemalloc.start()
        decoded = [orjson.loads(b) for b in blobs]
        gc.collect()
        traced, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["decoded_dict_bytes_per_object"] = traced / n
        del decoded
    return out


async def _watchers(cfg: dict[str, Any]) -> dict[str, Any]:
    import tracemalloc

    import anyio

    from cacher.cacher import Cacher
    from storage.interface import ListOptions

    k, scope, mode = cfg["watchers"], cfg["scope"], cfg["mode"]
    nodes, pods = make_pods(max(1, cfg["watcher_pods"] // 2), 2, cfg["seed"])
    storage = await _storage(cfg)
    out: dict[str, Any] = {"mode": mode, "scope": scope, "watchers": k}
    async with storage:
        await fill(storage, pods, 64)
        del pods
        api: Any = storage
        cacher = None
        if mode == "cache":
            cacher = Cacher(storage, consistency_checks=False)
            await cacher.__aenter__()
            await cacher.wait_ready(300)
            api = cacher
        try:
            rv = str(await storage.get_current_resource_version())

            async def open_k() -> tuple[anyio.abc.TaskGroup, list[Any]]:
                tg = anyio.create_task_group()
                await tg.__aenter__()
                opened = anyio.Event()
                watches: list[Any] = []
                limiter = anyio.CapacityLimiter(64)

                async def consume(i: int) -> None:
                    sel = f"spec.nodeName=idle-node-{i}" if scope == "node" else ""
                    async with limiter:
                        w = api.watch("/pods", ListOptions(resource_version=rv, recursive=True, field_selector=sel))
                        await w.__aenter__()
                    watches.append(w)
                    if len(watches) == k:
                        opened.set()
                    while await w.next_batch():
                        pass

                for i in range(k):
                    tg.start_soon(consume, i)
                with anyio.fail_after(cfg["open_timeout"]):
                    await opened.wait()
                await anyio.sleep(0.2)  # let every consumer reach next_batch()
                return tg, watches

            async def close_k(tg: Any, watches: list[Any]) -> None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
                for w in watches:
                    await w.stop()

            gc.collect()
            rss0 = _rss()
            t = perf()
            tg, ws = await open_k()
            out["open_s"] = perf() - t
            gc.collect()
            out["rss_bytes_per_watcher"] = (_rss() - rss0) / k
            if cacher is not None:
                out["registered"] = len(cacher.dispatcher.watchers())
            await close_k(tg, ws)
            del tg, ws
            gc.collect()
            tracemalloc.start()
            tg, ws = await open_k()
            gc.collect()
            traced, _ = tracemalloc.get_traced_memory()
            out["traced_bytes_per_watcher"] = traced / k
            out["top_allocation_sites"] = _top_sites(tracemalloc.take_snapshot(), k)
            tracemalloc.stop()
            await close_k(tg, ws)
        finally:
            if cacher is not None:
                await cacher.close()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--pods", type=int, default=30000, help="pods for the per-object figures (%(default)s)")
    p.add_argument("--watchers", default="1000,10000", help="idle watcher counts (%(default)s)")
    p.add_argument("--scopes", default="node,cluster", help="node,cluster (%(default)s)")
    p.add_argument("--watcher-pods", type=int, default=2000, help="pods in the store for the watcher runs")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement (%(default)s)")
    p.add_argument("--backend", choices=("memory", "etcd3"), default="memory", help="storage (%(default)s)")
    p.add_argument("--direct-etcd-max", type=int, default=1000,
                   help="largest direct etcd watch count (one thread + gRPC stream each; %(default)s)")
    p.add_argument("--open-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="./bench-results")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    return p


def _med(runs: list[dict[str, Any]], key: str) -> float | None:
    return median(r.get(key) for r in runs if "error" not in r)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._child:
        return child_entry(args._child, child)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    counts = [int(x) for x in args.watchers.split(",") if x.strip()]
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    etcd = None
    endpoints: list[str] = []
    etcd_info: dict[str, Any] = {"embedded": False}
    base = {"backend": args.backend, "seed": args.seed, "open_timeout": args.open_timeout}
    report: dict[str, Any] = {"benchmark": "memory", "timestamp": now_iso(),
                              "command": ["python", "-m", "benchmarks.memory"]
                              + (argv if argv is not None else sys.argv[1:]),
                              "params": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                              "host": host_info(), "notes": []}
    failed = False
    try:
        if args.backend == "etcd3":
            etcd = start_etcd("memory-etcd")
            endpoints = [etcd.endpoint]
            etcd_info = {"embedded": True, "version": etcd.version, "endpoint": etcd.endpoint}
        base["endpoints"] = endpoints
        run_no = 0
        obj_runs = []
        for rep in range(args.repeats):
            run_no += 1
            log(f"[objects {args.pods}] run {rep + 1}/{args.repeats} ...")
            r = run_child("benchmarks.memory", {**base, "what": "objects", "pods": args.pods,
                                                "prefix": f"/mem-{int(time.time())}-{run_no}"})
            if "error" in r:
                failed = True
                log(f"  failed: {r['error']}\n{r.get('stderr_tail', '')}")
            obj_runs.append(r)
        objects = {key: _med(obj_runs, key) for key in ("json_bytes_per_object", "decoded_dict_bytes_per_object",
                                                         "traced_bytes_per_object", "rss_bytes_per_object")}
        objects["runs"] = obj_runs
        report["objects"] = objects
        watcher_results = []
        for k in counts:
            for scope in scopes:
                cell: dict[str, Any] = {"watchers": k, "scope": scope, "modes": {}}
                for mode in ("cache", "direct"):
                    k_mode = k
                    if mode == "direct" and args.backend == "etcd3" and k > args.direct_etcd_max:
                        k_mode = args.direct_etcd_max
                        report["notes"].append(f"direct {scope} ran with {k_mode} etcd watches, not {k} "
                                               f"(--direct-etcd-max); figures are per watcher")
                    runs = []
                    for rep in range(args.repeats):
                        run_no += 1
                        log(f"[{k} {scope} {mode}] run {rep + 1}/{args.repeats} ...")
                        r = run_child("benchmarks.memory", {**base, "what": "watchers", "watchers": k_mode,
                                                            "scope": scope, "mode": mode,
                                                            "watcher_pods": args.watcher_pods,
                                                            "prefix": f"/mem-{int(time.time())}-{run_no}"})
                        if "error" in r:
                            failed = True
                            log(f"  failed: {r['error']}\n{r.get('stderr_tail', '')}")
                        runs.append(r)
                    cell["modes"][mode] = {"watchers": k_mode, "runs": runs,
                                           "traced_bytes_per_watcher": _med(runs, "traced_bytes_per_watcher"),
                                           "rss_bytes_per_watcher": _med(runs, "rss_bytes_per_watcher")}
                watcher_results.append(cell)
        report["idle_watchers"] = watcher_results
    finally:
        if etcd is not None:
            etcd.close()
    report["etcd"] = etcd_info
    o = report["objects"]
    j = o["json_bytes_per_object"]
    rows = [("JSON bytes per pod (as stored)", j, None, None),
            ("decoded dicts alone, tracemalloc B/pod (floor)", o["decoded_dict_bytes_per_object"],
             ratio(o["decoded_dict_bytes_per_object"], j), None),
            ("Cacher, tracemalloc B/pod", o["traced_bytes_per_object"], ratio(o["traced_bytes_per_object"], j),
             ratio(o["traced_bytes_per_object"], o["decoded_dict_bytes_per_object"])),
            ("Cacher, RSS delta B/pod", o["rss_bytes_per_object"], ratio(o["rss_bytes_per_object"], j),
             ratio(o["rss_bytes_per_object"], o["decoded_dict_bytes_per_object"]))]
    t1 = table(f"cache memory per stored object: {args.pods:,} pods, {args.backend} backend, medians of "
               f"{args.repeats}", ("", "bytes", "x JSON", "x decoded floor"), rows)
    rows2 = []
    for cell in report["idle_watchers"]:
        c, d = cell["modes"]["cache"], cell["modes"]["direct"]
        dn = "" if d["watchers"] == cell["watchers"] else f" (direct: {d['watchers']})"
        keys = (("tracemalloc B/watcher", "traced_bytes_per_watcher"), ("RSS B/watcher", "rss_bytes_per_watcher"))
        for label, key in keys:
            rows2.append((f"{cell['watchers']:>6} {cell['scope']:<7} {label}{dn}", c[key], d[key],
                          ratio(c[key], d[key])))
        cell["ratio_cache_over_direct"] = {key: ratio(c[key], d[key]) for _, key in keys}
    t2 = table(f"memory per idle watcher (incl. its consumer task), {args.backend} backend, medians of {args.repeats}",
               ("watchers scope metric", "cache", "direct", "cache/direct"), rows2)
    text = t1 + "\n\n" + t2
    print(text)
    for note in report["notes"]:
        print("note: " + note)
    report["table"] = text
    path = write_report("memory", report, args.out)
    print(f"results: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
