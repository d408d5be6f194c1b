"""The main benchmark: a simulated Kubernetes cluster, with and without the watch cache, side by side.

    watchcache-bench                        # embedded etcd, both modes, default scale
    python -m benchmarks.cluster --backend memory --nodes 50 --duration 30
    python -m benchmarks.cluster --etcd-endpoints 10.0.0.5:2379,10.0.0.6:2379 --mode cache

A cluster after the clusterloader2 "load" test (``data/k8s-objects/WORKLOAD.md``): ``--nodes`` nodes
with ``--pods-per-node`` pods built from a real pod dump, a node Lease per node renewed every 10 s, pod
churn (create -> bind -> Running -> delete) at ``--churn`` writes/s. Actors: one node agent per node
watching its own pods (``spec.nodeName=<node>``), a scheduler and controllers watching cluster-wide,
a node lifecycle controller watching Leases, controllers LISTing periodically at resourceVersion "0".

The same workload runs twice, each time in a fresh child process against a fresh key prefix (or a
fresh in-memory store): through one Cacher per resource ("cache") and straight against storage, one
storage watch per watcher ("direct"). The parent starts etcd once (packaged binary, temporary data
dir, free loopback ports; stopped at exit, also on Ctrl-C), shows progress, prints the results side
by side and writes ``<out>/cluster-<timestamp>.json``, ``latest.json`` and a PNG chart.

Exit status: 0 when every watcher of every mode got exactly its events in order, 1 otherwise, 2 when
the benchmark could not run, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from benchmarks.workload import DEFAULT_LIST_INTERVALS, ModeConfig

DEFAULTS = {"nodes": 100, "pods_per_node": 30, "churn": 40.0, "duration": 60.0, "seed": 1}


class BenchmarkError(RuntimeError):
    """The benchmark could not run (a child failed, etcd did not start, ...)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="watchcache-bench",
        description="Simulated Kubernetes cluster (clusterloader2 load profile) against the watch cache and "
                    "directly against storage, side by side.")
    p.add_argument("--nodes", type=int, default=DEFAULTS["nodes"], help="simulated nodes (default %(default)s)")
    p.add_argument("--pods-per-node", type=int, default=DEFAULTS["pods_per_node"],
                   help="load pods per node at steady state (default %(default)s)")
    p.add_argument("--churn", type=float, default=DEFAULTS["churn"],
                   help="pod writes/s: create, bind, status, delete (default %(default)s = 10 pods/s x 4 writes)")
    p.add_argument("--duration", type=float, default=DEFAULTS["duration"],
                   help="seconds of steady state per mode (default %(default)s)")
    p.add_argument("--backend", choices=("etcd3", "memory"), default="etcd3",
                   help="storage backend (default %(default)s: an embedded etcd unless --etcd-endpoints)")
    p.add_argument("--etcd-endpoints", default="",
                   help="host:port,... of an existing etcd cluster to use instead of an embedded one")
    p.add_argument("--out", default="./bench-results", help="output directory (default %(default)s)")
    p.add_argument("--mode", choices=("both", "cache", "direct"), default="both",
                   help="run through the cache, directly against storage, or both (default)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="random seed (default %(default)s)")
    p.add_argument("--anyio-backend", choices=("asyncio", "trio"), default="asyncio",
                   help="event loop of the benchmark processes (default %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=180.0,
                   help="after the steady state, max seconds to wait until every watcher has received every "
                        "write meant for it (the wait also ends after 15 s without progress; default %(default)s)")
    p.add_argument("--list-interval-scale", type=float, default=1.0,
                   help="multiply the controllers' LIST intervals (default 1: node and label lists every 2 s, "
                        "full lists every 5 s; 0 turns the periodic LISTs off)")
    p.add_argument("--no-chart", action="store_true", help="do not write the PNG chart")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    return p


# ---- child process ---------------------------------------------------------------------------------
def child_main(config_json: str) -> int:
    """Run one mode and write JSON lines (progress, then the result) on the original stdout."""
    import anyio

    from benchmarks.workload import ClusterRun
    cfg = ModeConfig(**json.loads(config_json))
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed to stdout goes to stderr, not into the protocol
    sys.stdout = sys.stderr

    def emit(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg, default=str) + "\n")
        out.flush()

    result = anyio.run(ClusterRun(cfg, emit).run, backend=cfg.anyio_backend)
    emit({"type": "result", "result": result})
    return 0


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def run_child(cfg: ModeConfig, on_progress: Callable[[dict[str, Any]], None], log_dir: Path) -> dict[str, Any]:
    """Run one mode in a fresh interpreter; returns its result dict. Raises BenchmarkError."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    log_path = log_dir / f"{cfg.mode}.stderr.log"
    with open(log_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cluster", "--_child", json.dumps(asdict(cfg))],
                                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env)
        result = None
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                if msg.get("type") == "progress":
                    on_progress(msg)
                elif msg.get("type") == "result":
                    result = msg["result"]
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: end the child we started, by its pid
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    stderr_tail = log_path.read_text(errors="replace").strip().splitlines()[-30:]
    if result is None:
        raise BenchmarkError(f"the {cfg.mode} run failed (exit code {code}):\n" + "\n".join(stderr_tail))
    if stderr_tail:
        result["stderr_tail"] = stderr_tail
    return result


# ---- progress display ------------------------------------------------------------------------------
class ProgressView:
    """Progress on stderr: a rich progress bar on a terminal, status lines every few seconds otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.rich = not quiet and sys.stderr.isatty()
        self._progress = None
        self._tasks: dict[tuple[str, str], Any] = {}
        self._last_line = 0.0
        self._last_phase: tuple[str, str] | None = None

    def __enter__(self) -> "ProgressView":
        if self.rich:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(),
                                      TextColumn("{task.completed:>8.0f}/{task.total:<8.0f}"),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                      transient=False)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def update(self, msg: dict[str, Any]) -> None:
        if self.quiet:
            return
        mode, phase = msg["mode"], msg["phase"]
        info = ""
        if phase == "steady":
            info = f"writes {msg.get('writes', 0):,}  ingested {msg.get('events', 0):,}  " \
                   f"delivered {msg.get('delivered', 0):,}"
        if self._progress is not None:
            key = (mode, phase)
            if key not in self._tasks:
                unit = " (s)" if phase == "steady" else ""
                from rich.markup import escape
                self._tasks[key] = self._progress.add_task(escape(f"[{mode}] {phase}{unit}"), total=msg["total"] or 1,
                                                           info=info)
            self._progress.update(self._tasks[key], completed=msg["done"], total=msg["total"] or 1, info=info)
            return
        now = time.monotonic()
        key = (mode, phase)
        done = msg["done"] >= msg["total"]
        if key != self._last_phase or now - self._last_line >= 5 or (done and phase != "drain"):
            if key == self._last_phase and done and now - self._last_line < 0.5:
                return
            self._last_phase, self._last_line = key, now
            print(f"[{mode}] {phase}: {msg['done']:.0f}/{msg['total']:.0f} {info}".rstrip(),
                  file=sys.stderr, flush=True)


# ---- parent ----------------------------------------------------------------------------------------
def _title(args: argparse.Namespace, etcd_desc: str) -> str:
    return (f"watch cache cluster benchmark: {args.nodes} nodes x {args.pods_per_node} pods, churn "
            f"{args.churn:g} pod writes/s + {args.nodes / 10:g} lease writes/s, {args.duration:g} s per mode, "
            f"backend {etcd_desc}")


def run_benchmark(args: argparse.Namespace, view: ProgressView | None = None) -> dict[str, Any]:
    """Start etcd if needed, run the modes (each in a child process), return the full report."""
    view = view or ProgressView(quiet=True)
    etcd = None
    endpoints: list[str] = []
    etcd_info: dict[str, Any] = {"embedded": False}
    run_id = datetime.now().strftime("%Y%m%d%H%M%S") + f"-{os.getpid()}"
    try:
        if args.backend == "etcd3":
            if args.etcd_endpoints:
                endpoints = [e.strip() for e in args.etcd_endpoints.split(",") if e.strip()]
                etcd_info = {"embedded": False, "endpoints": endpoints}
            else:
                from storage.testing.etcd_server import EtcdServer
                view.message("starting embedded etcd ...")
                etcd = EtcdServer(name="bench-etcd",
                                  extra_args=["--quota-backend-bytes=8589934592", "--auto-compaction-mode=periodic",
                                              "--auto-compaction-retention=5m"])
                etcd.start()
                endpoints = [etcd.endpoint]
                etcd_info = {"embedded": True, "endpoints": endpoints, "version": etcd.version,
                             "binary": etcd.binary, "pid": etcd.pid}
                view.message(f"etcd {etcd.version} on {etcd.endpoint} (pid {etcd.pid})")
        if args.backend != "etcd3":
            etcd_desc = "memory"
        elif etcd_info.get("embedded"):
            etcd_desc = f"etcd3 (embedded etcd {etcd_info.get('version', '')})"
        else:
            etcd_desc = f"etcd3 ({','.join(endpoints)})"
        modes = ["cache", "direct"] if args.mode == "both" else [args.mode]
        results: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="watchcache-bench-") as tmp:
            for i, mode in enumerate(modes):
                cfg = ModeConfig(
                    mode=mode, backend=args.backend, endpoints=endpoints,
                    path_prefix=f"/registry-bench-{run_id}-{mode}", nodes=args.nodes,
                    pods_per_node=args.pods_per_node, churn=args.churn, duration=args.duration, seed=args.seed,
                    etcd_pid=etcd.pid if etcd is not None else None, anyio_backend=args.anyio_backend,
                    drain_timeout=args.drain_timeout,
                    list_intervals={k: v * args.list_interval_scale for k, v in DEFAULT_LIST_INTERVALS.items()},
                    cleanup=bool(args.backend == "etcd3" and args.etcd_endpoints))
                view.message(f"mode {i + 1}/{len(modes)}: {mode} "
                             f"({'one Cacher per resource' if mode == 'cache' else 'one storage watch per watcher'})")
                results[mode] = run_child(cfg, view.update, Path(tmp))
        report = {
            "benchmark": "watchcache-bench cluster",
            "title": _title(args, etcd_desc),
            "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": [Path(sys.argv[0]).name] + sys.argv[1:],
            "params": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                     "platform": platform.platform(), "anyio_backend": args.anyio_backend},
            "etcd": etcd_info,
            "modes": results,
        }
        report["comparison"] = _comparison(results)
        return report
    finally:
        if etcd is not None:
            etcd.close()


def _comparison(results: dict[str, Any]) -> dict[str, Any]:
    c, d = results.get("cache"), results.get("direct")
    if not c or not d:
        return {}

    def ratio(*path: str) -> float | None:
        a, b = c, d
        for p in path:
            a = a.get(p) if isinstance(a, dict) else None
            b = b.get(p) if isinstance(b, dict) else None
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    out = {
        "note": "cache / direct",
        "upstream_watches_held": ratio("upstream_watches", "held"),
        "events_ingested_per_s": ratio("events_ingested", "per_s"),
        "events_streamed_per_s": ratio("events_ingested", "streamed_per_s_computed"),
        "delivery_latency_p50": ratio("delivery_latency", "all", "p50_ms"),
        "delivery_latency_p99": ratio("delivery_latency", "all", "p99_ms"),
        "peak_rss": ratio("memory", "peak_rss_bytes"),
        "list_latency_p50": {}, "list_latency_p99": {},
    }
    for kind in c.get("list_latency", {}):
        out["list_latency_p50"][kind] = ratio("list_latency", kind, "p50_ms")
        out["list_latency_p99"][kind] = ratio("list_latency", kind, "p99_ms")
    return out


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``watchcache-bench``). Returns the exit status."""
    args = build_parser().parse_args(argv)
    if args._child:
        return child_main(args._child)
    for name in ("nodes", "pods_per_node"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if args.duration <= 0 or args.churn < 0:
        print("--duration must be > 0 and --churn >= 0", file=sys.stderr)
        return 2
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = True
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a worker): no handler
        in_main_thread = False
    try:
        with ProgressView(quiet=args.quiet) as view:
            report = run_benchmark(args, view)
    except KeyboardInterrupt:
        print("\ninterrupted: child processes and etcd stopped", file=sys.stderr)
        return 130
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)

    from benchmarks.report import render_table, write_chart, write_json
    out_dir = Path(args.out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    render_table(report)
    json_path, _ = write_json(report, out_dir, stamp)
    files = [str(json_path), str(out_dir / "latest.json")]
    if not args.no_chart:
        png, latest_png = write_chart(report, out_dir, stamp)
        files += [str(png), str(latest_png)]
    print("results: " + ", ".join(files))
    ok = all(r.get("correctness", {}).get("ok") for r in report["modes"].values())
    for mode, r in report["modes"].items():
        corr = r.get("correctness", {})
        if not corr.get("ok"):
            print(f"[{mode}] correctness: {corr.get('summary')}", file=sys.stderr)
            for m in corr.get("mismatches", [])[:3]:
                print(f"  {json.dumps(m, default=str)[:600]}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
