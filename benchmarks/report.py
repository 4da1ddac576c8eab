"""The summary of all benchmark results: one table against the targets, and a chart.

Run after the ``bench_*.py`` scripts (``nox -s bench`` does): reads
``results/{comm,worker,client,surface,tls,launcher}.json`` and writes ``results/summary.md`` (the
table README.md shows) and ``results/summary.png`` (each ratio against its target).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _row(area: str, metric: str, unit: str, ours: float, dask: float, target: str) -> dict:
    ratio = ours / dask if dask else float("nan")
    op, _, bound = target.partition(" ")
    limit = float(bound.rstrip("x s"))
    if target.endswith(" s"):
        met = ours <= limit
    else:
        met = ratio <= limit if op == "<=" else ratio >= limit
    return {
        "area": area,
        "metric": metric,
        "unit": unit,
        "ours": ours,
        "dask": dask,
        "ratio": ratio,
        "target": target,
        "met": met,
    }


def comm_rows(data: dict) -> list[dict]:
    by_name = {r["transport"]: r for r in data["rows"]}
    ours, theirs = by_name["ours"], by_name["distributed"]
    return [
        _row(
            "comm",
            "200 MB round trip (median)",
            "MB/s",
            ours["median_mb_per_s"],
            theirs["median_mb_per_s"],
            ">= 1.0x",
        )
    ]


def measured_rows(area: str, data: dict) -> list[dict]:
    """Rows of a benchmark that already compares ours with dask per metric; rows
    without a target are context for that benchmark's own table, not the summary."""
    rows = []
    for r in data["rows"]:
        if not r.get("target"):
            continue
        if r["target"].startswith("ours "):
            # An absolute bound in that benchmark's own unit (MiB): its table shows it.
            continue
        dask = r.get("stock", r.get("distributed"))
        rows.append(_row(area, r["metric"], r["unit"], r["ours"], dask, r["target"]))
    return rows


def launcher_rows(data: dict) -> list[dict]:
    rows = data["rows"]

    def median(prefix: str, field: str) -> float:
        return next(r[field] for r in rows if r["contender"].startswith(prefix))

    ours_start = median("ours: Launcher", "start_median_s")
    ours_teardown = max(
        r["teardown_median_s"] for r in rows if r["contender"].startswith("ours: Launcher")
    )
    stock_start = median("dask worker --no-nanny", "start_median_s")
    return [
        _row(
            "launcher", "8 workers up, scheduler running", "s", ours_start, stock_start, "<= 0.5x"
        ),
        _row(
            "launcher",
            "8 workers up vs --nworkers 8",
            "s",
            ours_start,
            median("dask worker --nworkers", "start_median_s"),
            "<= 0.5x",
        ),
        _row(
            "launcher",
            "LocalCluster(n=8) cold start",
            "s",
            median("ours: LocalCluster", "start_median_s"),
            median("distributed.LocalCluster", "start_median_s"),
            "<= 0.5x",
        ),
        _row(
            "launcher",
            "teardown of 8 workers",
            "s",
            ours_teardown,
            median("dask worker --no-nanny", "teardown_median_s"),
            "<= 1 s",
        ),
    ]


def collect() -> list[dict]:
    rows: list[dict] = []
    if data := _load("comm"):
        rows += comm_rows(data)
    for area in ("worker", "client", "surface", "tls"):
        if data := _load(area):
            rows += measured_rows(area, data)
    if data := _load("launcher"):
        rows += launcher_rows(data)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| area | metric | ours | stock dask | ratio | target | met |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['area']} | {r['metric']} | {r['ours']:,.2f} {r['unit']} | "
            f"{r['dask']:,.2f} {r['unit']} | {r['ratio']:.2f}x | {r['target']} | "
            f"{'yes' if r['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def _target_ratio(row: dict) -> float:
    """A row's target as a ratio of stock: "<= 0.5x" is 0.5; an absolute bound such as
    "<= 1 s" is that bound over stock's figure, so every row is drawn on one axis."""
    bound = float(row["target"].split()[1].rstrip("x s"))
    return bound / row["dask"] if row["target"].endswith(" s") else bound


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    labels = [f"{r['area']}: {r['metric']}" for r in rows]
    ratios = [r["ratio"] for r in rows]
    targets = [_target_ratio(r) for r in rows]
    colors = ["tab:green" if r["met"] else "tab:red" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.4))
    y = range(len(rows))
    ax.barh(y, ratios, color=colors)
    ax.scatter(targets, y, marker="|", s=300, color="black", label="target", zorder=3)
    for i, ratio in enumerate(ratios):
        ax.annotate(
            f"{ratio:.2f}x", (ratio, i), xytext=(4, 0), textcoords="offset points", va="center"
        )
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    low = min(ratios + targets) / 1.5
    high = max(ratios + targets) * 2.0  # room for the value labels
    ax.set_xlim(low, high)
    # Few, plainly written ticks: matplotlib's minor labels on a log axis overlap.
    ticks = [t for t in (0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10) if low <= t <= high]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda t, _: f"{t:g}x"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("ours / stock dask (time and memory: lower is better; rates: higher)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    rows = collect()
    if not rows:
        print("no benchmark results found in", RESULTS, file=sys.stderr)
        return 1
    table = markdown(rows)
    (RESULTS / "summary.md").write_text(table)
    print(table)
    try:
        chart(rows, RESULTS / "summary.png")
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
