"""Smoke test of the cluster benchmark at a tiny scale: memory backend and the embedded etcd.

Checks what the benchmark promises, not how fast anything is: every watcher of both modes received
exactly its events in order, the cache holds one upstream watch per cached resource and the direct
mode one per watcher, and the JSON/PNG outputs are written. (No timing assertions: see DESIGN.md.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.cluster import main

TINY = ["--nodes", "4", "--pods-per-node", "3", "--duration", "3", "--churn", "40", "--quiet",
        "--drain-timeout", "20"]
CACHED_RESOURCES = 2  # pods and leases


def _check_report(out: Path) -> dict:
    report = json.loads((out / "latest.json").read_text())
    assert set(report["modes"]) == {"cache", "direct"}
    for mode, res in report["modes"].items():
        corr = res["correctness"]
        assert corr["ok"], (mode, corr)
        assert corr["complete_in_order"] == corr["watchers"] == res["watchers"]["total"]
        assert corr["summary"] == f"all {corr['watchers']} watchers complete and in order"
        assert corr["expected_events"] > 0
        assert corr["lists_bad"] == 0
        assert res["writes"]["total"] > 0 and not res["writes"]["errors"]
        assert res["watchers_terminated"]["total"] == 0
        assert res["delivery_latency"]["unmatched"] == 0
        assert res["delivery_latency"]["all"]["count"] > 0
        assert res["memory"]["peak_rss_bytes"] > 0
    cache, direct = report["modes"]["cache"], report["modes"]["direct"]
    # 4 node agents + 4 cluster-wide pod watchers + 1 lease watcher
    assert direct["watchers"]["total"] == 4 + 4 + 1
    assert cache["upstream_watches"]["held"] == CACHED_RESOURCES
    assert cache["upstream_watches"]["held_min"] == CACHED_RESOURCES
    assert cache["upstream_watches"]["opened_total"] == CACHED_RESOURCES
    assert direct["upstream_watches"]["held"] == direct["watchers"]["total"]
    assert direct["upstream_watches"]["held_min"] == direct["watchers"]["total"]
    assert direct["upstream_watches"]["opened_total"] == direct["watchers"]["total"]
    assert cache["watchers_terminated"]["by_dispatcher"] == 0
    # every kind of LIST was measured in both modes (rv "0": from the cache in cache mode)
    for kind in ("pods by node (field)", "pods by label (namespace)", "initial list (node-agent)"):
        assert cache["list_latency"][kind]["count"] > 0
        assert direct["list_latency"][kind]["count"] > 0
    return report


def test_cluster_benchmark_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(TINY + ["--backend", "memory", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = _check_report(tmp_path)
    assert report["etcd"] == {"embedded": False}
    assert "upstream watches held" in printed and "all 9 watchers complete and in order" in printed
    assert (tmp_path / "latest.png").stat().st_size > 10_000
    assert len(list(tmp_path.glob("cluster-*.json"))) == 1
    assert len(list(tmp_path.glob("cluster-*.png"))) == 1


def test_cluster_benchmark_embedded_etcd(tmp_path: Path) -> None:
    code = main(TINY + ["--backend", "etcd3", "--out", str(tmp_path), "--no-chart"])
    assert code == 0
    report = _check_report(tmp_path)
    assert report["etcd"]["embedded"] is True and report["etcd"]["version"].startswith("3.")
    for res in report["modes"].values():
        assert res["memory"]["etcd_peak_rss_bytes"] > 0
    # the embedded etcd is gone once the benchmark returns
    import psutil
    assert not psutil.pid_exists(report["etcd"]["pid"]) or \
        psutil.Process(report["etcd"]["pid"]).status() == psutil.STATUS_ZOMBIE
