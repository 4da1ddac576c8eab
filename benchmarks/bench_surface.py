"""The dask-worker surface, ours vs stock ``dask worker --no-nanny``, side by side on
one real scheduler.

    python benchmarks/bench_surface.py [--repeat 3] [--tasks 1000] [--check]

One ``dask scheduler``; two of our workers and two stock ones (``--nthreads 2``
each); one ``distributed.Client`` here. Measured:

- the first task that needs the surface (it calls ``get_worker()``) on a fresh worker
  of each kind, against a plain task just before it: what importing distributed and
  setting up the surface costs once (stock has distributed imported from the start);
- ``--tasks`` tasks that each call ``get_client().submit(...)`` and wait for the
  child, seceded (``secede``/``rejoin``), all children pinned to the same kind of
  worker: tasks/s (parents) of the median round; rounds of the two kinds take turns.

Plain workloads (import time, idle RSS) are measured by ``bench_worker.py``: a worker
imports distributed only when a task needs it, so they are unchanged.

Prints a table and writes ``results/surface.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import harness
from harness import print_table, run_interleaved, summarize, write_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from procs import LocalProcesses, worker_address  # noqa: E402

TARGETS = {"get_client().submit tasks": ("min", 1.0)}


# Task functions travel by value (this script runs as __main__); each imports
# distributed in its body, as a task of a notebook would.


def plain(x: int) -> int:
    return x + 1


def uses_surface() -> str:
    from distributed import get_worker

    return get_worker().address


def submit_child(x: int, workers: list[str]) -> int:
    from distributed import get_client, rejoin, secede

    client = get_client()
    future = client.submit(plain, x, workers=workers, allow_other_workers=False, pure=False)
    secede()
    value = future.result()
    rejoin()
    return value


def first_surface_cost(client: Any, address: str) -> tuple[float, float]:
    """Seconds of a plain task and then of the first surface task on ``address``."""
    pinned = {"workers": [address], "allow_other_workers": False, "pure": False}
    client.submit(plain, 0, **pinned).result()  # the worker has run a task before
    start = time.perf_counter()
    client.submit(plain, 1, **pinned).result()
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    assert client.submit(uses_surface, **pinned).result() == address
    return plain_s, time.perf_counter() - start


def nested_round(client: Any, workers: list[str], ntasks: int) -> None:
    futures = [
        client.submit(
            submit_child, i, workers, workers=workers, allow_other_workers=False, pure=False
        )
        for i in range(ntasks)
    ]
    assert client.gather(futures) == [i + 1 for i in range(ntasks)]


def ratio_row(metric: str, ours: float, stock: float, unit: str, **extra: Any) -> dict[str, Any]:
    return harness.ratio_row(metric, ours, stock, unit, TARGETS, **extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the nested tasks")
    parser.add_argument("--tasks", type=int, default=1000, help="parent tasks per round")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 if a target is missed"
    )
    args = parser.parse_args(argv)

    from distributed import Client

    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    with LocalProcesses() as procs:
        procs.start_scheduler()
        ours = [procs.start_worker("--nthreads", "2") for _ in range(2)]
        stock = [procs.start_worker("--nthreads", "2", stock=True) for _ in range(2)]
        with Client(procs.address, timeout=30) as client:
            ours_addr = [worker_address(client, p) for p in ours]
            stock_addr = [worker_address(client, p) for p in stock]

            first = {
                "ours": first_surface_cost(client, ours_addr[0]),
                "stock": first_surface_cost(client, stock_addr[0]),
            }
            raw["first_surface_task_s"] = first
            rows.append(
                {
                    "metric": "first surface task",
                    "unit": "ms",
                    "ours": first["ours"][1] * 1e3,
                    "stock": first["stock"][1] * 1e3,
                    "ratio": first["ours"][1] / first["stock"][1],
                    "target": None,
                    "met": None,
                    "plain task before (ours, stock) ms": (
                        f"{first['ours'][0] * 1e3:.1f}, {first['stock'][0] * 1e3:.1f}"
                    ),
                }
            )

            nested = run_interleaved(
                {
                    "ours": lambda: nested_round(client, ours_addr, args.tasks),
                    "stock": lambda: nested_round(client, stock_addr, args.tasks),
                },
                repeat=args.repeat,
            )
            raw["nested_s"] = {k: summarize(v) for k, v in nested.items()}
            rows.append(
                ratio_row(
                    "get_client().submit tasks",
                    args.tasks / statistics.median(nested["ours"]),
                    args.tasks / statistics.median(nested["stock"]),
                    "tasks/s",
                )
            )

    print_table(rows, title="dask-worker surface: ours vs stock (2 workers x 2 threads each)")
    path = write_results("surface", rows, {"args": vars(args), "raw": raw})
    print(f"\nwrote {path}")
    missed = [row["metric"] for row in rows if row["met"] == "NO"]
    if args.check and missed:
        print(f"missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
