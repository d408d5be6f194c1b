"""Shared plumbing of the issue-4 benchmarks (fanout.py, lists.py, memory.py).

- pods built from the real dump through ``benchmarks.objects`` (the main job's builders), spread over
  ``nodes`` nodes the way the cluster benchmark's populate step does (round robin);
- an embedded etcd (``EtcdServer``) started once by the parent and stopped at exit;
- scenarios run in fresh child processes (``run_child``) so memory, threads and watches of one
  scenario never leak into the next; the child writes one JSON line on the original stdout;
- medians, ratios, a plain side-by-side table and ``bench-results/<name>-<stamp>.json`` plus
  ``<name>-latest.json`` (the main job's ``latest.json`` is left alone).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from benchmarks.instrument import percentile
from benchmarks.objects import PODS, ObjectFactory, build_layout, pod_key


# ---- objects -------------------------------------------------------------------------------------
def iter_pods(nodes: int, pods_per_node: int, seed: int = 1,
              limit: int | None = None) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """``nodes`` node names and a generator of about ``nodes * pods_per_node`` Running pods (at most
    ``limit``) from the real pod dump, assigned to nodes round robin (as ``ClusterRun._populate``).
    Pods are built one at a time, so filling a store from the generator keeps few decoded pods alive."""
    rng = random.Random(seed)
    layout = build_layout(nodes, pods_per_node, rng)
    factory = ObjectFactory(layout, rng)

    def gen() -> Iterator[dict[str, Any]]:
        i = 0
        for dep in layout.deployments:
            for _ in range(dep.replicas):
                if limit is not None and i >= limit:
                    return
                node = layout.nodes[i % len(layout.nodes)]
                i += 1
                yield factory.new_pod(dep, node, running=True)

    return layout.nodes, gen()


def make_pods(nodes: int, pods_per_node: int, seed: int = 1) -> tuple[list[str], list[dict[str, Any]]]:
    """As iter_pods, as a list."""
    names, pods = iter_pods(nodes, pods_per_node, seed)
    return names, list(pods)


def pods_for_total(total: int, seed: int = 1, lazy: bool = False) -> tuple[list[str], Any]:
    """About ``total`` pods at 30 pods per node (the clusterloader2 load density); a generator if lazy."""
    nodes = max(1, -(-total // 30))
    names, pods = iter_pods(nodes, 30, seed, limit=total)
    return names, (pods if lazy else list(pods))


def make_storage(backend: str, endpoints: Sequence[str], prefix: str, kv: Any = None, **options: Any) -> Any:
    from storage.factory import StorageConfig, create_storage
    cfg = StorageConfig(resource=PODS, type=backend, endpoints=list(endpoints), prefix=prefix, memory_kv=kv,
                        options=options)
    return create_storage(cfg)


async def fill(storage: Any, pods: Iterable[dict[str, Any]], concurrency: int = 64,
               progress: Callable[[int], None] | None = None,
               on_created: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Create every pod through the storage API, at most ``concurrency`` in flight (pods are taken from
    ``pods`` only as slots free up); returns the last revision. ``on_created(stored)`` sees each result."""
    import anyio
    sem = anyio.Semaphore(concurrency)
    last = 0
    done = 0

    async def one(pod: dict[str, Any]) -> None:
        nonlocal last, done
        try:
            out = await storage.create(pod_key(pod), pod)
        finally:
            sem.release()
        if on_created is not None:
            on_created(out)
        last = max(last, int(out["metadata"]["resourceVersion"]))
        done += 1
        if progress is not None and done % 5000 == 0:
            progress(done)

    async with anyio.create_task_group() as tg:
        for pod in pods:
            await sem.acquire()
            tg.start_soon(one, pod)
    return last


# ---- etcd ----------------------------------------------------------------------------------------
def start_etcd(name: str) -> Any:
    from storage.testing.etcd_server import EtcdServer
    etcd = EtcdServer(name=name, extra_args=["--quota-backend-bytes=8589934592",
                                             "--max-request-bytes=10485760"])
    etcd.start()
    return etcd


# ---- child processes -----------------------------------------------------------------------------
def child_entry(config_json: str, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """In the child: run ``fn(config)`` and write ``{"result": ...}`` as one line on the real stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    result = fn(json.loads(config_json))
    out.write(json.dumps({"result": result}, default=str) + "\n")
    out.flush()
    return 0


def run_child(module: str, config: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m <module> --_child <json>`` in a fresh interpreter; returns its result or
    ``{"error": ...}`` (never raises for a failed scenario, so the others still run)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, "-m", module, "--_child", json.dumps(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # the result may be out already (teardown is not measured)
        timed_out = True
        proc.kill()
        out, err = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    for line in reversed(out.decode(errors="replace").splitlines()):
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and "result" in msg:
            return msg["result"]
    if timed_out:
        return {"error": f"timed out after {timeout} s", "stderr_tail": err.decode(errors="replace")[-2000:]}
    return {"error": f"child exited with {proc.returncode}", "stderr_tail": err.decode(errors="replace")[-2000:]}


# ---- statistics and output -----------------------------------------------------------------------
def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else None


def p99(values: Iterable[float]) -> float | None:
    return percentile(sorted(values), 99)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    just = lambda i, s: s.ljust(widths[i]) if i == 0 else s.rjust(widths[i])  # noqa: E731
    lines = [title, "  ".join(just(i, str(h)) for i, h in enumerate(header)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(just(i, c) for i, c in enumerate(r)) for r in cells]
    return "\n".join(lines)


def host_info() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_end": load}


def write_report(name: str, report: dict[str, Any], out_dir: str | Path) -> Path:
    """``<out>/<name>-<stamp>.json`` and ``<out>/<name>-latest.json``; returns the first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"{name}-{stamp}.json"
    text = json.dumps(report, indent=2, default=str)
    path.write_text(text)
    tmp = out / f".{name}-latest.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / f"{name}-latest.json")
    return path


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
