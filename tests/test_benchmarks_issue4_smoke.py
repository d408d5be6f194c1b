"""Smoke tests of the issue-4 benchmarks (fanout, lists, memory) at a tiny scale.

They check that each benchmark runs end to end, compares both sides in the same run and writes its
JSON with sane fields. No timing assertions (DESIGN.md): only counts, presence and signs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import fanout, lists, memory


def _latest(out: Path, name: str) -> dict:
    report = json.loads((out / f"{name}-latest.json").read_text())
    stamped = [p for p in out.glob(f"{name}-*.json") if p.name != f"{name}-latest.json"]
    assert len(stamped) == 1
    return report


def test_fanout_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = fanout.main(["--watchers", "20", "--duration", "1", "--rate", "100", "--repeats", "1",
                        "--drain-timeout", "5", "--quiet", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = _latest(tmp_path, "fanout")
    assert report["benchmark"] == "fanout"
    assert [(s["watchers"], s["scope"]) for s in report["scenarios"]] == [(20, "node"), (20, "cluster")]
    for sc in report["scenarios"]:
        assert set(sc["modes"]) == {"cache", "direct"}
        for mode, m in sc["modes"].items():
            (run,) = m["runs"]
            assert "error" not in run, run
            assert run["watchers_opened"] == 20
            assert run["writes"]["acked"] > 0 and run["writes"]["errors"] == 0
            owed = run["deliveries"]["owed"]
            assert owed == run["writes"]["acked"] * (20 if sc["scope"] == "cluster" else 1)
            assert 0 < run["deliveries"]["total"] <= owed
            assert run["delivery_latency"]["count"] > 0 and run["delivery_latency"]["unmatched"] == 0
            assert run["terminated"]["total"] == 0
            assert m["median"]["deliveries/s"] > 0
        assert "cache/direct" in printed
    assert "deliveries/s" in printed


def test_lists_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = lists.main(["--pods", "300", "--repeats", "2", "--backend", "memory", "--quiet", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = _latest(tmp_path, "lists")
    res = report["sizes"]["300"]
    assert res["pods"] == 300
    rows = res["lists"]
    assert len(rows) == 4
    for label, row in rows.items():
        assert len(row["cache_ms"]["all"]) == 2 and len(row["etcd_ms"]["all"]) == 2
        assert row["cache_ms"]["median"] > 0 and row["etcd_ms"]["median"] > 0
        assert row["ratio_cache_over_etcd_median"] > 0
        assert row["items_median"]["cache"] == row["items_median"]["etcd"]
        assert row["served_by"]
    node = next(r for r in rows.values() if r["kind"] == "node")
    assert node["served_by"] == ["cache (index spec.nodeName)"]
    full = [r for r in rows.values() if r["kind"] == "full"]
    assert all(r["items_median"]["cache"] == 300 for r in full)
    assert "cache/etcd" in printed


def test_memory_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = memory.main(["--pods", "300", "--watchers", "50", "--scopes", "node", "--repeats", "1", "--quiet",
                        "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = _latest(tmp_path, "memory")
    o = report["objects"]
    assert o["runs"][0]["pods"] == 300 and o["runs"][0]["cached_objects"] == 300
    assert o["json_bytes_per_object"] > 1000  # pods from the real dump are a few KiB
    assert o["traced_bytes_per_object"] > 0 and o["decoded_dict_bytes_per_object"] > 0
    assert o["rss_bytes_per_object"] is not None
    (cell,) = report["idle_watchers"]
    assert cell["watchers"] == 50 and set(cell["modes"]) == {"cache", "direct"}
    assert cell["modes"]["cache"]["runs"][0]["registered"] == 50
    for m in cell["modes"].values():
        assert m["traced_bytes_per_watcher"] > 0
    assert "x JSON" in printed and "cache/direct" in printed


def test_lists_smoke_etcd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = lists.main(["--pods", "200", "--repeats", "2", "--quiet", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = _latest(tmp_path, "lists")
    assert report["etcd"]["embedded"] is True
    res = report["sizes"]["200"]
    rows = list(res["lists"].values())
    assert all(r["items_median"]["cache"] == r["items_median"]["etcd"] for r in rows)
    consistent = rows[-1]
    assert consistent["cache_resource_version"] == ""
    # which path served the consistent LIST depends on the etcd version; it must be reported either way
    expected = "cache (scan)" if res["consistent_reads_from_cache_enabled"] else "storage (delegated)"
    assert consistent["served_by"] == [expected]
