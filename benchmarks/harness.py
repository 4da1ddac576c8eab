"""Shared helpers for the benchmark scripts: timing, a table, JSON results.

A benchmark script lives next to this file as ``bench_<name>.py``, runs as
``python benchmarks/bench_<name>.py`` (the script's directory is then on ``sys.path``,
so ``import harness`` works), measures ours and stock dask side by side in one run,
prints a table with ``print_table`` and saves its rows with ``write_results``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1e6
#: Environment for a scheduler whose transition log a benchmark reads: by default it
#: keeps the last 1000 transitions, those of about 125 trivial tasks.
LONG_TRANSITION_LOG = {"DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH": "100000"}


def run_timed(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> list[float]:
    """Seconds taken by each of ``repeat`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


async def run_timed_async(
    fn: Callable[[], Awaitable[Any]], repeat: int = 5, warmup: int = 1
) -> list[float]:
    """``run_timed`` for a coroutine function, on the running event loop."""
    for _ in range(warmup):
        await fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return times


def run_interleaved(
    fns: dict[str, Callable[[], Any]], repeat: int = 5, warmup: int = 1, pause: float = 0.0
) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, taking turns: round ``i`` times every
    function once, so a change in machine load hits all of them alike, and every other
    round goes in reverse order, so none always follows the same one. ``pause``
    seconds pass, untimed, before each call."""
    for _ in range(warmup):
        for fn in fns.values():
            time.sleep(pause)
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_number in range(repeat):
        order = list(fns.items())
        if round_number % 2:
            order.reverse()
        for name, fn in order:
            time.sleep(pause)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


async def run_interleaved_async(
    fns: dict[str, Callable[[], Any]], repeat: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """``run_interleaved`` on the running event loop; ``fns`` may be sync or async."""

    async def call(fn: Callable[[], Any]) -> None:
        result = fn()
        if inspect.isawaitable(result):
            await result

    for _ in range(warmup):
        for fn in fns.values():
            await call(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            await call(fn)
            times[name].append(time.perf_counter() - start)
    return times


def ratio_row(
    metric: str,
    ours: float,
    stock: float,
    unit: str,
    targets: Mapping[str, tuple[str, float]],
    **extra: Any,
) -> dict[str, Any]:
    """One row of a table: ours, stock, their ratio, and whether it meets ``metric``'s
    target in ``targets`` (``("max", x)``: ours/stock must not exceed x; ``("min", x)``:
    it must reach it). Metrics without a target are for information."""
    direction, target = targets.get(metric, (None, None))
    ratio = ours / stock if stock else float("inf")
    met = None
    if direction == "max":
        met = ratio <= target
    elif direction == "min":
        met = ratio >= target
    target_text = None if target is None else f"{'<=' if direction == 'max' else '>='} {target}x"
    return {
        "metric": metric,
        "unit": unit,
        "ours": ours,
        "stock": stock,
        "ratio": ratio,
        "target": target_text,
        "met": None if met is None else ("yes" if met else "NO"),
        **extra,
    }


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Best, median and all of ``times`` (seconds)."""
    return {
        "n": len(times),
        "best_s": min(times),
        "median_s": statistics.median(times),
        "times_s": list(times),
    }


def rate(nbytes: float, seconds: float) -> float:
    """MB/s (10**6 bytes per second)."""
    return nbytes / seconds / MB if seconds > 0 else float("inf")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(packages: Sequence[str] = ("clusterlaunch", "distributed", "dask")) -> dict:
    """What the figures depend on: host, CPU, Python and package versions."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpus": cpus,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "packages": {name: package_version(name) for name in packages},
    }


def write_results(
    name: str, rows: Sequence[dict], meta: dict | None = None, *, directory: Path | None = None
) -> Path:
    """Save ``rows`` as ``results/<name>.json`` with the machine's details; return the path."""
    directory = directory or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    document = {"benchmark": name, "machine": machine_info(), **(meta or {}), "rows": list(rows)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return f"{value:.3g}"
    return "" if value is None else str(value)


def print_table(
    rows: Sequence[dict],
    columns: Sequence[str] | None = None,
    *,
    title: str | None = None,
    file: Any = None,
) -> None:
    """Print ``rows`` (dicts) as an aligned text table; ``columns`` picks and orders keys."""
    file = file or sys.stdout
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric)
        ).rstrip()

    if title:
        print(title, file=file)
    print(line(columns), file=file)
    print(line(["-" * w for w in widths]), file=file)
    for row in cells:
        print(line(row), file=file)
