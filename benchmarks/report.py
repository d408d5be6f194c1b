"""Output of the cluster benchmark: the side-by-side table (rich or plain text), JSON files, PNG chart."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MODES = ("cache", "direct")
MiB = 1024 * 1024


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _fmt_num(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _fmt_pair(a: Any, b: Any, digits: int = 1) -> str:
    if a is None and b is None:
        return "-"
    return f"{_fmt_num(a, digits)} / {_fmt_num(b, digits)}"


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def _fmt_ratio(r: float | None) -> str:
    """cache/direct as "0.52x", "12x", or "1/340" when the cache's figure is a small fraction."""
    if r is None:
        return ""
    if r >= 100:
        return f"{r:,.0f}x"
    if r >= 0.1:
        return f"{r:.2f}x"
    if r <= 0:
        return "0x"
    return f"1/{1 / r:,.0f}" if 1 / r >= 100 else f"1/{1 / r:.1f}"


def _fmt_value(v: float) -> str:
    """Compact bar label: 3 significant digits, thousands separators."""
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2g}"


def comparison_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, cache, direct, cache/direct) rows of the side-by-side table."""
    modes = report["modes"]
    c, d = modes.get("cache"), modes.get("direct")
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, path: tuple[str, ...], digits: int = 1, scale: float = 1.0, ratio: bool = True) -> None:
        vc = _get(c, *path) if c else None
        vd = _get(d, *path) if d else None
        vc = vc / scale if isinstance(vc, (int, float)) and scale != 1.0 else vc
        vd = vd / scale if isinstance(vd, (int, float)) and scale != 1.0 else vd
        rows.append((label, _fmt_num(vc, digits), _fmt_num(vd, digits), _fmt_ratio(_ratio(vc, vd)) if ratio else ""))

    def pair(label: str, p50: tuple[str, ...], p99: tuple[str, ...]) -> None:
        c50, c99 = (_get(c, *p50), _get(c, *p99)) if c else (None, None)
        d50, d99 = (_get(d, *p50), _get(d, *p99)) if d else (None, None)
        r50, r99 = _ratio(c50, d50), _ratio(c99, d99)
        ratio = "" if r50 is None and r99 is None else f"{_fmt_ratio(r50) or '-'} / {_fmt_ratio(r99) or '-'}"
        rows.append((label, _fmt_pair(c50, c99, 2), _fmt_pair(d50, d99, 2), ratio))

    row("upstream watches held", ("upstream_watches", "held"), 0)
    row("watchers (consumers)", ("watchers", "total"), 0, ratio=False)
    row("writes/s achieved (pods + leases)", ("writes", "per_s"))
    row("events ingested/s (out of storage watches)", ("events_ingested", "per_s"))
    row("events streamed by storage/s (writes x watches)", ("events_ingested", "streamed_per_s_computed"))
    row("events delivered to watchers/s", ("events_delivered", "per_s"), ratio=False)
    pair("delivery latency p50 / p99 ms (all)", ("delivery_latency", "all", "p50_ms"),
         ("delivery_latency", "all", "p99_ms"))
    row("  received before the write's ack %", ("delivery_latency", "received_before_ack_share"), 1, 0.01,
        ratio=False)
    pair("  from write start p50 / p99 ms", ("delivery_latency", "from_write_start", "p50_ms"),
         ("delivery_latency", "from_write_start", "p99_ms"))
    groups = sorted({g for m in (c, d) if m for g in (_get(m, "delivery_latency", "by_group") or {})})
    for g in groups:
        pair(f"  {g} p50 / p99 ms", ("delivery_latency", "by_group", g, "p50_ms"),
             ("delivery_latency", "by_group", g, "p99_ms"))
    kinds = []
    for m in (c, d):
        for k in (_get(m, "list_latency") or {}) if m else ():
            if k not in kinds:
                kinds.append(k)
    for k in sorted(kinds, key=lambda s: (s.startswith("initial"), s)):
        pair(f"LIST {k} p50 / p99 ms", ("list_latency", k, "p50_ms"), ("list_latency", k, "p99_ms"))
    pair("write latency pod create p50 / p99 ms", ("writes", "latency", "pod create", "p50_ms"),
         ("writes", "latency", "pod create", "p99_ms"))
    row("peak RSS benchmark process MiB", ("memory", "peak_rss_bytes"), 0, MiB)
    if any(_get(m, "memory", "etcd_peak_rss_bytes") for m in (c, d) if m):
        row("peak RSS etcd MiB (shared, cumulative)", ("memory", "etcd_peak_rss_bytes"), 0, MiB, ratio=False)
    row("watchers terminated (any cause)", ("watchers_terminated", "total"), 0, ratio=False)
    row("  by the cache's dispatcher", ("watchers_terminated", "by_dispatcher"), 0, ratio=False)
    row("setup: start all watchers s", ("timings", "watchers_start_s"), 2)
    rows.append(("correctness", (_get(c, "correctness", "summary") or "-") if c else "-",
                 (_get(d, "correctness", "summary") or "-") if d else "-", ""))
    return rows


def render_table(report: dict[str, Any], file: Any = None, force_plain: bool | None = None) -> str:
    """Print the side-by-side table (rich when ``file`` is a terminal, plain text otherwise); returns
    the plain-text version."""
    import sys
    file = file or sys.stdout
    rows = comparison_rows(report)
    header = ("metric", "cache", "direct", "cache/direct")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    lines = [report.get("title", "")]
    lines.append("  ".join(h.ljust(widths[i]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header)))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(r)))
    plain = "\n".join(lines)
    use_rich = (not force_plain) and hasattr(file, "isatty") and file.isatty()
    if use_rich:
        from rich.console import Console
        from rich.table import Table
        table = Table(title=report.get("title", ""), show_lines=False)
        table.add_column("metric")
        for h in header[1:]:
            table.add_column(h, justify="right")
        for r in rows:
            style = None
            if r[0] == "correctness":
                bad = any("incomplete" in v for v in r[1:3])
                style = "bold red" if bad else "bold green"
            table.add_row(*r, style=style)
        Console(file=file).print(table)
    else:
        print(plain, file=file)
    return plain


def write_json(report: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path]:
    """Write ``cluster-<stamp>.json`` and ``latest.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cluster-{stamp}.json"
    text = json.dumps(report, indent=2, sort_keys=False, default=str)
    path.write_text(text)
    latest = out_dir / "latest.json"
    tmp = out_dir / ".latest.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, latest)
    return path, latest


def write_chart(report: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path]:
    """Write ``cluster-<stamp>.png`` (and ``latest.png``): delivery latency, LIST latency by kind,
    upstream watches and ingestion, memory — cache vs direct."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in report["modes"]]
    colors = {"cache": "#2a9d8f", "direct": "#e76f51"}
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    fig.suptitle(report.get("title", "cluster benchmark"), fontsize=12)

    def bars(ax: Any, labels: list[str], series: dict[str, list[float | None]], ylabel: str, log: bool,
             title: str, fmt: str | None = None) -> None:
        n = len(series)
        width = 0.8 / max(1, n)
        for i, (name, vals) in enumerate(series.items()):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
            ys = [v if v is not None else 0 for v in vals]
            mode = name.split()[0]
            hatch = "//" if "p99" in name or "etcd" in name else None
            rects = ax.bar(xs, ys, width, label=name, color=colors.get(mode, "#888"),
                           alpha=0.55 if hatch else 0.95, hatch=hatch, edgecolor="black", linewidth=0.5)
            for r, v in zip(rects, vals):
                if v is not None:
                    ax.annotate(fmt.format(v) if fmt else _fmt_value(v),
                                (r.get_x() + r.get_width() / 2, r.get_height()),
                                ha="center", va="bottom", fontsize=7, rotation=90 if n > 2 else 0,
                                xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.margins(y=0.25)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)

    # 1. delivery latency by watcher group
    groups = sorted({g for m in modes for g in (_get(report["modes"][m], "delivery_latency", "by_group") or {})})
    labels = ["all"] + groups
    series: dict[str, list[float | None]] = {}
    for m in modes:
        res = report["modes"][m]
        for q in ("p50", "p99"):
            series[f"{m} {q}"] = [_get(res, "delivery_latency", "all", f"{q}_ms")] + [
                _get(res, "delivery_latency", "by_group", g, f"{q}_ms") for g in groups]
    bars(axes[0][0], labels, series, "ms (log)", True, "Event delivery latency (write ack -> watcher)")

    # 2. LIST latency by kind
    kinds = [k for k in (_get(report["modes"][modes[0]], "list_latency") or {}) if not k.startswith("initial")]
    series = {}
    for m in modes:
        res = report["modes"][m]
        for q in ("p50", "p99"):
            series[f"{m} {q}"] = [_get(res, "list_latency", k, f"{q}_ms") for k in kinds]
    bars(axes[0][1], [k.replace(" (", "\n(") for k in kinds], series, "ms (log)", True,
         "LIST latency by kind (resourceVersion=0)")

    # 3. upstream watches held and events ingested/s
    ax = axes[1][0]
    metrics = ["upstream watches held", "events ingested/s", "events streamed by storage/s\n(writes x watches)"]
    series = {m: [_get(report["modes"][m], "upstream_watches", "held"),
                  _get(report["modes"][m], "events_ingested", "per_s"),
                  _get(report["modes"][m], "events_ingested", "streamed_per_s_computed")] for m in modes}
    bars(ax, metrics, series, "count (log)", True, "Upstream load on storage", fmt="{:,.0f}")

    # 4. memory over time (peak in the legend)
    ax = axes[1][1]
    for m in modes:
        mem = _get(report["modes"][m], "memory") or {}
        samples = mem.get("samples") or []
        if samples:
            xs = [t for t, _, _ in samples]
            ax.plot(xs, [a / MiB for _, a, _ in samples], color=colors[m], linewidth=1.8,
                    label=f"{m}: benchmark process (peak {(mem.get('peak_rss_bytes') or 0) / MiB:,.0f} MiB)")
            if any(b for _, _, b in samples):
                ax.plot(xs, [b / MiB for _, _, b in samples], color=colors[m], linewidth=1.2, linestyle="--",
                        label=f"{m}: etcd (peak {(mem.get('etcd_peak_rss_bytes') or 0) / MiB:,.0f} MiB)")
    ax.set_xlabel("seconds since the mode's process started (populate, watchers, steady state, drain)")
    ax.set_ylabel("RSS MiB")
    ax.set_title("Memory (RSS over time; etcd is shared by both modes)", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    fig.text(0.5, 0.005, "  |  ".join(f"{m}: {_get(report['modes'][m], 'correctness', 'summary')}" for m in modes),
             ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cluster-{stamp}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    latest = out_dir / "latest.png"
    tmp = out_dir / ".latest.png.tmp"
    tmp.write_bytes(path.read_bytes())
    os.replace(tmp, latest)
    return path, latest
