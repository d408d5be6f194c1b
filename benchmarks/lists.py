"""LIST benchmark: the same LISTs from the Cacher and from etcd, side by side in one run.

    python -m benchmarks.lists                   # 30,000 pods, embedded etcd, 5 repeats
    python -m benchmarks.lists --full            # 30,000 and 150,000 pods
    python -m benchmarks.lists --pods 5000 --repeats 3

For each size (``--pods``, plus 150,000 with ``--full``): the pods (real pod dump, 30 per node, the
clusterloader2 load layout) are written once into a fresh key prefix of an embedded etcd (or
``--etcd-endpoints``) through the storage API, ``--fill-concurrency`` creates in flight. Then a Cacher
(consistency checker off, so it does not LIST etcd behind our back) syncs over that storage, and each
kind of LIST runs ``--repeats`` times from the cache and from etcd (``Etcd3Storage`` directly),
alternating which goes first:

- ``node``: ``spec.nodeName=<node>`` on all pods (a kubelet's list; the cache answers from its
  spec.nodeName index, etcd reads every pod and filters);
- ``label``: ``app=<deployment>`` in one namespace (a controller's list; both scan the namespace);
- ``full``: every pod.

Cache LISTs use resource_version "0" (served from the cache). Consistent LISTs (resource_version "")
are served from the cache only when the backend's progress notifications are safe (etcd 3.4.31+ /
3.5.13+); the packaged etcd 3.5.1 is not, so the Cacher delegates them: the ``full, rv ""`` row runs
that LIST through the Cacher too and reports which path served it (``Cacher.consistent_reads``). Every
cache row says what served it: "cache (index spec.nodeName)", "cache (scan)" or "storage (delegated)",
from the Cacher's list metrics and a count of storage LIST calls. etcd LISTs use resource_version ""
(a quorum read, what a LIST without a cache costs).

Reported per kind: median and p99 (nearest rank; with 5 repeats that is the maximum) latency for cache
and etcd, ratio cache/etcd of the medians, items returned.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any

from benchmarks.common import (fill, host_info, make_storage, median, now_iso, p99, pods_for_total, ratio,
                               start_etcd, table, write_report)
from benchmarks.instrument import peak_rss_self

perf = time.perf_counter


class ListCounting:
    """Forwards to a Storage; counts get_list calls (to tell cache-served LISTs from delegated ones)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.resource = inner.resource
        self.lists = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_list(self, key: str, opts: Any = None) -> Any:
        self.lists += 1
        return await self.inner.get_list(key, opts) if opts is not None else await self.inner.get_list(key)


async def run_size(total: int, args: argparse.Namespace, endpoints: list[str], log: Any) -> dict[str, Any]:
    import anyio

    from cacher.cacher import Cacher
    from storage.interface import ListOptions

    rng = random.Random(args.seed)
    nodes, gen = pods_for_total(total, args.seed, lazy=True)  # built one at a time while filling
    apps: dict[str, set[str]] = {}
    count = [0]

    def tracked() -> Any:
        for p in gen:
            meta = p["metadata"]
            apps.setdefault(meta["namespace"], set()).add(meta["labels"]["app"])
            count[0] += 1
            yield p

    prefix = f"/lists-{int(time.time())}-{total}"
    out: dict[str, Any] = {"prefix": prefix}
    storage = make_storage(args.backend, endpoints, prefix)
    async with storage:
        t = perf()
        log(f"[{total}] filling {total:,} pods into {args.backend} ...")
        await fill(storage, tracked(), args.fill_concurrency, lambda d: log(f"  {d:,} written"))
        out["fill_s"] = perf() - t
        out.update(pods=count[0], nodes=len(nodes), namespaces=len(apps))
        out["fill_per_s"] = count[0] / out["fill_s"]
        namespaces = sorted(apps)
        apps_by_ns = {ns: sorted(a) for ns, a in apps.items()}
        counting = ListCounting(storage)
        t = perf()
        async with Cacher(counting, consistency_checks=False) as cacher:
            await cacher.wait_ready(900)
            out["cache_sync_s"] = perf() - t
            out["consistent_reads_from_cache_enabled"] = bool(cacher.consistent_reads_from_cache)
            log(f"[{total}] cache synced in {out['cache_sync_s']:.1f} s "
                f"(consistent reads from cache: {cacher.consistent_reads_from_cache})")
            last_list: dict[str, Any] = {}
            orig_record = cacher.metrics.record_list

            def record_list(index: str, fetched: int, returned: int) -> None:
                last_list.update(index=index, fetched=fetched)
                orig_record(index, fetched, returned)

            cacher.metrics.record_list = record_list  # instance attribute: observe, then forward

            def query(kind: str) -> tuple[str, dict[str, Any]]:
                if kind == "node":
                    return "/pods", {"field_selector": f"spec.nodeName={rng.choice(nodes)}"}
                if kind == "label":
                    ns = rng.choice(namespaces)
                    return f"/pods/{ns}", {"label_selector": f"app={rng.choice(apps_by_ns[ns])}"}
                return "/pods", {}

            async def timed(api: Any, key: str, opts: Any) -> tuple[float, int]:
                t0 = perf()
                res = await api.get_list(key, opts)
                return perf() - t0, len(res.items)

            kinds = [("node", "node-scoped (spec.nodeName index)", "0"),
                     ("label", "label-selected (one namespace)", "0"),
                     ("full", "full LIST", "0"),
                     ("full", 'full LIST, rv "" (consistent) via Cacher', "")]
            rows: dict[str, Any] = {}
            for kind, label, cache_rv in kinds:
                cache_t, etcd_t, items_c, items_e, paths = [], [], [], [], []
                for rep in range(args.repeats):
                    key, sel = query(kind)
                    copts = ListOptions(resource_version=cache_rv, recursive=True, **sel)
                    eopts = ListOptions(resource_version="", recursive=True, **sel)

                    async def cache_side() -> None:
                        before = counting.lists
                        last_list.clear()
                        dt, n = await timed(cacher, key, copts)
                        cache_t.append(dt)
                        items_c.append(n)
                        if counting.lists > before:
                            paths.append("storage (delegated)")
                        elif last_list:
                            paths.append(f"cache ({'index ' + last_list['index'] if last_list['index'] else 'scan'})")
                        else:
                            paths.append("cache")

                    async def etcd_side() -> None:
                        dt, n = await timed(storage, key, eopts)
                        etcd_t.append(dt)
                        items_e.append(n)

                    if rep % 2 == 0:
                        await cache_side()
                        await etcd_side()
                    else:
                        await etcd_side()
                        await cache_side()
                    await anyio.sleep(0)
                row = {
                    "kind": kind, "label": label, "cache_resource_version": cache_rv,
                    "cache_ms": {"median": median(cache_t) * 1e3, "p99": p99(cache_t) * 1e3,
                                 "all": [round(x * 1e3, 3) for x in cache_t]},
                    "etcd_ms": {"median": median(etcd_t) * 1e3, "p99": p99(etcd_t) * 1e3,
                                "all": [round(x * 1e3, 3) for x in etcd_t]},
                    "ratio_cache_over_etcd_median": ratio(median(cache_t), median(etcd_t)),
                    "items_median": {"cache": median(items_c), "etcd": median(items_e)},
                    "served_by": sorted(set(paths)),
                }
                rows[label] = row
                log(f"[{total}] {label}: cache {row['cache_ms']['median']:.2f} ms ({', '.join(row['served_by'])}), "
                    f"etcd {row['etcd_ms']['median']:.1f} ms")
            out["consistent_reads"] = dict(cacher.consistent_reads)
            out["lists"] = rows
    out["peak_rss_bytes"] = peak_rss_self()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lists", description=__doc__.split("\n")[0])
    p.add_argument("--pods", type=int, default=30000, help="pods (default %(default)s)")
    p.add_argument("--full", action="store_true", help="also 150,000 pods")
    p.add_argument("--repeats", type=int, default=5, help="LISTs of each kind per side (default %(default)s)")
    p.add_argument("--backend", choices=("etcd3", "memory"), default="etcd3",
                   help="storage the cache is compared with (default %(default)s)")
    p.add_argument("--etcd-endpoints", default="", help="host:port,... of an existing etcd instead of an embedded one")
    p.add_argument("--fill-concurrency", type=int, default=64, help="creates in flight while filling")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="./bench-results")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    import anyio
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.pods < 1:
        print("--repeats and --pods must be >= 1", file=sys.stderr)
        return 2
    sizes = [args.pods] + ([150000] if args.full and args.pods != 150000 else [])
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    etcd = None
    endpoints: list[str] = []
    etcd_info: dict[str, Any] = {"embedded": False}
    results: dict[str, Any] = {}
    try:
        if args.backend == "etcd3":
            if args.etcd_endpoints:
                endpoints = [e.strip() for e in args.etcd_endpoints.split(",") if e.strip()]
                etcd_info = {"embedded": False, "endpoints": endpoints}
            else:
                etcd = start_etcd("lists-etcd")
                endpoints = [etcd.endpoint]
                etcd_info = {"embedded": True, "version": etcd.version, "endpoint": etcd.endpoint}
                log(f"etcd {etcd.version} on {etcd.endpoint}")
        for size in sizes:
            results[str(size)] = anyio.run(run_size, size, args, endpoints, log)
    finally:
        if etcd is not None:
            etcd.close()
    other = "etcd" if args.backend == "etcd3" else "memory backend"
    rows = []
    for size, res in results.items():
        for label, r in res["lists"].items():
            rows.append((f"{int(size):,} pods  {label}", r["cache_ms"]["median"], r["etcd_ms"]["median"],
                         r["ratio_cache_over_etcd_median"], r["cache_ms"]["p99"], r["etcd_ms"]["p99"],
                         r["items_median"]["cache"], " / ".join(r["served_by"])))
    title = (f"LIST latency (ms): cache (rv \"0\" unless noted) vs {other} (rv \"\"), {args.repeats} repeats, "
             f"median and p99 (nearest rank; = max at 5 repeats); noisy shared 2-core host")
    text = table(title, ("size / kind", "cache p50", f"{other} p50", "cache/etcd", "cache p99", f"{other} p99",
                         "items", "cache served by"), rows)
    print(text)
    for size, res in results.items():
        print(f"{int(size):,} pods: filled in {res['fill_s']:.1f} s ({res['fill_per_s']:,.0f}/s), cache synced in "
              f"{res['cache_sync_s']:.1f} s; consistent reads from cache enabled: "
              f"{res['consistent_reads_from_cache_enabled']} (Cacher.consistent_reads {res['consistent_reads']})")
    report = {"benchmark": "lists", "timestamp": now_iso(),
              "command": ["python", "-m", "benchmarks.lists"] + (argv if argv is not None else sys.argv[1:]),
              "params": vars(args), "host": host_info(), "etcd": etcd_info, "sizes": results, "table": text}
    path = write_report("lists", report, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
