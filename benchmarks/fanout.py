"""Fan-out benchmark: N watchers through the Cacher against N direct storage watches, same run.

    python -m benchmarks.fanout                              # 1,000 and 10,000 watchers, memory backend
    python -m benchmarks.fanout --watchers 1000 --duration 5 --repeats 1
    python -m benchmarks.fanout --backend etcd3              # embedded etcd as the write source

Scenarios: for every watcher count N (``--watchers``) and scope (``--scopes``):

- ``node``: N nodes, one watcher per node with ``spec.nodeName=<node>`` (a kubelet); each write is
  wanted by exactly one watcher;
- ``cluster``: N cluster-wide watchers (no selector); each write is wanted by all N.

Each scenario runs in a fresh child process: ``--pods-per-node`` x N pods from the real pod dump are
written to the storage (``--backend memory`` by default, so etcd is not the bottleneck; ``etcd3``: an
embedded etcd started once by the parent), the watchers open at the current revision (no initial
state), then a writer updates random pods (``guaranteed_update`` of an annotation, straight to the
storage in both modes) at ``--rate`` writes/s for ``--duration`` seconds, up to ``--write-concurrency``
in flight. Mode ``cache``: one Cacher over the storage, every watcher a cache watcher. Mode ``direct``:
every watcher its own storage watch (with etcd, its own gRPC stream and thread). Consumers drain with
``next_batch()``. After the writes, consumers get up to ``--drain-timeout`` s (ending earlier after 3 s
without progress) to receive what the writes owe them.

Measured: writes/s achieved; deliveries/s (events received by all watchers during the write window /
window); delivered share (received by the end of the drain / owed); delivery latency p50/p99 from the
moment the writer's ``await`` returned to the moment ``next_batch()`` returned the event (events that
arrive before the writer resumes count as 0 ms; for cluster-wide scenarios latencies are recorded on
a sample of at most ``--latency-sample`` watchers, every watcher counts deliveries); watchers
terminated (cache: ``Cacher.dispatcher.terminated``; any mode: streams that ended while being read);
peak RSS of the scenario process.

Direct etcd watches cost one thread and one gRPC stream each: above ``--direct-etcd-max`` (default
1,000) the direct mode runs at that count instead, and the table and JSON say so.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from array import array
from contextlib import AsyncExitStack
from typing import Any

from benchmarks.common import (child_entry, fmt, host_info, make_pods, make_storage, median, now_iso, ratio,
                               run_child, start_etcd, table, write_report)
from benchmarks.instrument import RSSSampler, peak_rss_self, summarize_ms
from benchmarks.objects import pod_key

perf = time.perf_counter
DEFAULTS = {"watchers": "1000,10000", "scopes": "node,cluster", "rate": 1000.0, "duration": 10.0,
            "repeats": 2, "pods_per_node": 2}


# ---- child: one scenario -------------------------------------------------------------------------
def scenario(cfg: dict[str, Any]) -> dict[str, Any]:
    import anyio
    return anyio.run(_scenario, cfg)


async def _scenario(cfg: dict[str, Any]) -> dict[str, Any]:
    import anyio

    from storage.interface import EventType, ListOptions

    n, scope, mode = cfg["watchers"], cfg["scope"], cfg["mode"]
    rng = random.Random(cfg["seed"])
    nodes, pods = make_pods(n, cfg["pods_per_node"], cfg["seed"])
    keys = [pod_key(p) for p in pods]
    kv = None
    if cfg["backend"] == "memory":
        from storage.memory.mvcc import MemoryKV
        kv = MemoryKV()
    storage = make_storage(cfg["backend"], cfg["endpoints"], cfg["prefix"], kv)
    sampler = RSSSampler()
    timings: dict[str, float] = {}
    result: dict[str, Any] = {"mode": mode, "scope": scope, "watchers_requested": n, "pods": len(pods)}
    async with storage, AsyncExitStack() as stack:
        t = perf()
        from benchmarks.common import fill
        await fill(storage, pods, 64)
        timings["fill_s"] = perf() - t
        api: Any = storage
        cacher = None
        if mode == "cache":
            from cacher.cacher import Cacher
            t = perf()
            cacher = await stack.enter_async_context(Cacher(storage))
            await cacher.wait_ready(300)
            api = cacher
            timings["cache_sync_s"] = perf() - t
        start_rv = await storage.get_current_resource_version()
        if cfg.get("gc") == "freeze":
            import gc
            gc.collect()
            gc.freeze()  # the filled store and the synced cache move to the permanent generation
        elif cfg.get("gc") == "off":
            import gc
            gc.disable()

        delivered = [0]
        ended = [0]
        start_errors: list[str] = []
        opened = [0]
        opened_ok = [0]
        sample_every = 1 if scope == "node" else max(1, n // max(1, cfg["latency_sample"]))
        recs: list[tuple[array, array]] = []
        all_open = anyio.Event()
        open_limiter = anyio.CapacityLimiter(cfg["open_concurrency"])
        BOOKMARK, ERROR = EventType.BOOKMARK, EventType.ERROR

        def opened_one() -> None:
            opened[0] += 1
            if opened[0] == n:
                all_open.set()

        async def consume(i: int) -> None:
            sel = f"spec.nodeName={nodes[i]}" if scope == "node" else ""
            opts = ListOptions(resource_version=str(start_rv), recursive=True, field_selector=sel)
            record = i % sample_every == 0
            rvs, times = array("q"), array("d")
            if record:
                recs.append((rvs, times))
            started = False
            try:
                async with open_limiter:
                    w = api.watch("/pods", opts)
                    await w.__aenter__()
                started = True
                opened_ok[0] += 1
                opened_one()
                try:
                    while True:
                        batch = await w.next_batch()
                        if not batch:
                            ended[0] += 1
                            return
                        now = perf()
                        got = 0
                        for ev in batch:
                            if ev.type is BOOKMARK or ev.type is ERROR:
                                continue
                            got += 1
                            if record:
                                rvs.append(int(ev.object["metadata"]["resourceVersion"]))
                                times.append(now)
                        delivered[0] += got
                finally:
                    with anyio.CancelScope(shield=True):
                        await w.stop()
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # noqa: BLE001 - reported
                if len(start_errors) < 5:
                    start_errors.append(f"{type(exc).__name__}: {exc}")
                if not started:
                    opened_one()  # counted as done opening (failed), so the run goes on
                else:
                    ended[0] += 1

        acks: dict[int, float] = {}
        write_lat: list[float] = []
        write_errors = [0]
        written_keys: list[str] = []

        async def write(i: int, key: str, limiter: anyio.CapacityLimiter) -> None:
            def update(cur: dict[str, Any], meta: Any) -> dict[str, Any]:
                cur["metadata"].setdefault("annotations", {})["bench/seq"] = str(i)
                return cur
            try:
                t0 = perf()
                out = await storage.guaranteed_update(key, update)
                t1 = perf()
                acks[int(out["metadata"]["resourceVersion"])] = t1
                write_lat.append(t1 - t0)
                written_keys.append(key)
            except Exception:  # noqa: BLE001 - counted
                write_errors[0] += 1
            finally:
                limiter.release_on_behalf_of(i)

        async with anyio.create_task_group() as consumers:
            t = perf()
            for i in range(n):
                consumers.start_soon(consume, i)
            with anyio.move_on_after(cfg["open_timeout"]):
                await all_open.wait()
            timings["open_watchers_s"] = perf() - t
            sampler.sample()
            rss_before = sampler.self_peak
            # ---- writes at the target rate
            limiter = anyio.CapacityLimiter(cfg["write_concurrency"])
            issued = 0
            t0 = perf()
            t_end = t0 + cfg["duration"]
            async with anyio.create_task_group() as writers:
                while True:
                    now = perf()
                    if now >= t_end:
                        break
                    due = int((now - t0) * cfg["rate"]) - issued
                    for _ in range(due):
                        if limiter.available_tokens < 1:
                            break
                        issued += 1
                        limiter.acquire_on_behalf_of_nowait(issued)
                        writers.start_soon(write, issued, rng.choice(keys), limiter)
                    await anyio.sleep(0.001)
                t_window = perf()
                delivered_window = delivered[0]
            t_writes_done = perf()
            sampler.sample()
            # ---- drain: until every watcher has what the writes owe it
            owed = len(acks) * (opened_ok[0] if scope == "cluster" else 1) if opened_ok[0] == n else None
            last, last_change = -1, perf()
            deadline = perf() + cfg["drain_timeout"]
            while perf() < deadline:
                if owed is not None and delivered[0] >= owed:
                    break
                if delivered[0] != last:
                    last, last_change = delivered[0], perf()
                elif perf() - last_change > 3.0:
                    break
                await anyio.sleep(0.05)
            timings["drain_s"] = perf() - t_writes_done
            sampler.sample()
            consumers.cancel_scope.cancel()

        window = t_window - t0
        lat: list[float] = []
        early = unmatched = 0
        for rvs, times in recs:
            for rv, tr in zip(rvs, times):
                ta = acks.get(rv)
                if ta is None:
                    unmatched += 1
                    continue
                d = tr - ta
                if d < 0:
                    early += 1
                    d = 0.0
                lat.append(d)
        if cfg["scope"] == "node":
            owed_total = len(acks)
        else:
            owed_total = len(acks) * opened_ok[0]
        result.update({
            "watchers_opened": opened_ok[0],
            "start_errors": start_errors,
            "window_s": window,
            "writes": {"issued": issued, "acked": len(acks), "errors": write_errors[0],
                       "per_s": len(acks) / window if window else None, "target_per_s": cfg["rate"],
                       "latency": summarize_ms(write_lat)},
            "deliveries": {"in_window": delivered_window, "per_s": delivered_window / window if window else None,
                           "total": delivered[0], "owed": owed_total,
                           "delivered_share": delivered[0] / owed_total if owed_total else None},
            "delivery_latency": {**summarize_ms(lat), "sampled_watchers": len(recs),
                                 "received_before_ack": early, "unmatched": unmatched},
            "terminated": {"by_dispatcher": cacher.dispatcher.terminated if cacher is not None else None,
                           "streams_ended": ended[0]},
            "memory": {"peak_rss_bytes": max(peak_rss_self(), sampler.self_peak),
                       "rss_before_writes_bytes": rss_before},
            "timings": {k: round(v, 3) for k, v in timings.items()},
        })
        if cacher is not None:
            result["terminated"]["total"] = cacher.dispatcher.terminated + ended[0]
        else:
            result["terminated"]["total"] = ended[0]
    return result


# ---- parent ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fanout", description=__doc__.split("\n")[0])
    p.add_argument("--watchers", default=DEFAULTS["watchers"], help="comma-separated watcher counts (%(default)s)")
    p.add_argument("--scopes", default=DEFAULTS["scopes"], help="node,cluster (%(default)s)")
    p.add_argument("--modes", default="cache,direct", help="cache,direct (%(default)s)")
    p.add_argument("--rate", type=float, default=DEFAULTS["rate"], help="target writes/s (%(default)s)")
    p.add_argument("--duration", type=float, default=DEFAULTS["duration"], help="seconds of writes (%(default)s)")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="runs per scenario (%(default)s)")
    p.add_argument("--pods-per-node", type=int, default=DEFAULTS["pods_per_node"],
                   help="pods per node; nodes = watchers (%(default)s)")
    p.add_argument("--backend", choices=("memory", "etcd3"), default="memory", help="write source (%(default)s)")
    p.add_argument("--direct-etcd-max", type=int, default=1000,
                   help="largest direct etcd watch count to run (one thread + gRPC stream each; %(default)s)")
    p.add_argument("--write-concurrency", type=int, default=32, help="writes in flight at most (%(default)s)")
    p.add_argument("--open-concurrency", type=int, default=64, help="watches being opened at once (%(default)s)")
    p.add_argument("--open-timeout", type=float, default=120.0, help="max seconds to open the watchers")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="max seconds of drain after the writes")
    p.add_argument("--latency-sample", type=int, default=50,
                   help="cluster-wide scenarios: watchers that record latencies (%(default)s)")
    p.add_argument("--scenario-timeout", type=float, default=600.0, help="kill a scenario after this many s")
    p.add_argument("--gc", choices=("default", "freeze", "off"), default="default",
                   help="Python cyclic GC in the scenario processes: default; freeze = gc.freeze() after the "
                        "fill and cache sync; off = gc.disable() from then on (%(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="./bench-results")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    return p


def _agg(runs: list[dict[str, Any]], *path: str) -> float | None:
    vals = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        vals.append(v)
    return median(vals)


METRICS = [("writes/s achieved", ("writes", "per_s")),
           ("deliveries/s", ("deliveries", "per_s")),
           ("delivered share after drain", ("deliveries", "delivered_share")),
           ("delivery latency p50 ms", ("delivery_latency", "p50_ms")),
           ("delivery latency p99 ms", ("delivery_latency", "p99_ms")),
           ("watchers terminated", ("terminated", "total")),
           ("peak RSS MiB", ("memory", "peak_rss_bytes"))]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._child:
        return child_entry(args._child, scenario)
    counts = [int(x) for x in args.watchers.split(",") if x.strip()]
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    etcd = None
    endpoints: list[str] = []
    etcd_info: dict[str, Any] = {"embedded": False}
    scenarios: list[dict[str, Any]] = []
    try:
        if args.backend == "etcd3":
            etcd = start_etcd("fanout-etcd")
            endpoints = [etcd.endpoint]
            etcd_info = {"embedded": True, "version": etcd.version, "endpoint": etcd.endpoint}
            log(f"etcd {etcd.version} on {etcd.endpoint}")
        run_no = 0
        for n in counts:
            for scope in scopes:
                sc: dict[str, Any] = {"watchers": n, "scope": scope, "modes": {}, "notes": []}
                for mode in modes:
                    n_mode = n
                    if mode == "direct" and args.backend == "etcd3" and n > args.direct_etcd_max:
                        n_mode = args.direct_etcd_max
                        sc["notes"].append(f"direct ran at {n_mode} etcd watches, not {n}: one thread + gRPC "
                                           f"stream per watch is not feasible at {n} here (--direct-etcd-max)")
                    runs = []
                    for rep in range(args.repeats):
                        run_no += 1
                        cfg = {"watchers": n_mode, "scope": scope, "mode": mode, "backend": args.backend,
                               "endpoints": endpoints, "prefix": f"/fanout-{int(time.time())}-{run_no}",
                               "rate": args.rate, "duration": args.duration, "seed": args.seed + rep,
                               "pods_per_node": args.pods_per_node, "write_concurrency": args.write_concurrency,
                               "open_concurrency": args.open_concurrency, "open_timeout": args.open_timeout,
                               "drain_timeout": args.drain_timeout, "latency_sample": args.latency_sample,
                               "gc": args.gc}
                        log(f"[{n} {scope} {mode}] run {rep + 1}/{args.repeats} ...")
                        t = perf()
                        res = run_child("benchmarks.fanout", cfg, args.scenario_timeout)
                        if "error" in res:
                            log(f"  failed: {res['error']}\n{res.get('stderr_tail', '')}")
                        else:
                            log(f"  {time.perf_counter() - t:.0f} s: writes/s {fmt(res['writes']['per_s'])}, "
                                f"deliveries/s {fmt(res['deliveries']['per_s'])}, p99 "
                                f"{fmt(res['delivery_latency']['p99_ms'])} ms, terminated "
                                f"{res['terminated']['total']}")
                        runs.append(res)
                    ok = [r for r in runs if "error" not in r]
                    sc["modes"][mode] = {"watchers": n_mode, "runs": runs,
                                         "median": {label: _agg(ok, *path) for label, path in METRICS}}
                    if ok and any(r.get("watchers_opened", n_mode) < n_mode for r in ok):
                        sc["notes"].append(f"{mode}: only {min(r['watchers_opened'] for r in ok)} of {n_mode} "
                                           f"watchers opened within --open-timeout")
                scenarios.append(sc)
    finally:
        if etcd is not None:
            etcd.close()
    report = {"benchmark": "fanout", "timestamp": now_iso(), "command": ["python", "-m", "benchmarks.fanout"]
              + (argv if argv is not None else sys.argv[1:]),
              "params": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "host": host_info(),
              "etcd": etcd_info, "scenarios": scenarios}
    rows = []
    for sc in scenarios:
        c = sc["modes"].get("cache", {}).get("median", {})
        d = sc["modes"].get("direct", {}).get("median", {})
        dn = sc["modes"].get("direct", {}).get("watchers", sc["watchers"])
        for label, _ in METRICS:
            cv, dv = c.get(label), d.get(label)
            if label == "peak RSS MiB":
                cv = cv / 2**20 if cv else cv
                dv = dv / 2**20 if dv else dv
            name = f"{sc['watchers']:>6} {sc['scope']:<7} {label}"
            rows.append((name, cv, dv, ratio(cv, dv)))
        sc["ratio_cache_over_direct"] = {label: ratio(c.get(label), d.get(label)) for label, _ in METRICS}
        if dn != sc["watchers"]:
            rows.append((f"{sc['watchers']:>6} {sc['scope']:<7} NOTE direct ran with {dn} watchers", None, None, None))
    title = (f"fan-out: {args.backend} write source, target {args.rate:g} pod updates/s for {args.duration:g} s, "
             f"medians of {args.repeats} run(s) per cell, GC {args.gc} (noisy shared 2-core host)")
    text = table(title, ("watchers scope metric", "cache", "direct", "cache/direct"), rows)
    notes = [n for sc in scenarios for n in sc["notes"]]
    print(text)
    for note in notes:
        print("note: " + note)
    report["table"] = text
    path = write_report("fanout", report, args.out)
    print(f"results: {path}")
    return 0 if all("error" not in r for sc in scenarios for m in sc["modes"].values() for r in m["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
