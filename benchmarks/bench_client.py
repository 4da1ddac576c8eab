"""Our ``clusterlaunch.Client`` vs ``distributed.Client``, side by side on one cluster.

    python benchmarks/bench_client.py [--repeat 5] [--import-repeat 7]
                                      [--latency-n 200] [--tasks 5000]

One ``dask scheduler`` subprocess and two of our worker processes (``--nthreads 1``
each); both clients connect to it from this process, so they see the same scheduler
and the same workers, and their rounds take turns so that load from elsewhere on the
machine hits both alike.

Measured:

- cold import of ``clusterlaunch.client`` vs ``distributed`` in a fresh interpreter
  (wall time minus that of a bare ``python -c pass``), median of ``--import-repeat``;
  and of ``dask`` alone (distributed imports it; ours only on first use), for reference;
- round trip of one trivial task, ``submit(...).result()``, median of
  ``--latency-n`` (blocks of 20 consecutive calls per client take turns);
- throughput: ``--tasks`` trivial tasks submitted with ``map`` and collected with
  ``gather``, tasks/s of the median of ``--repeat`` runs. Every run maps fresh inputs
  (no key is ever shared between the clients or with an earlier run), and each run
  starts once the scheduler has forgotten the previous run's tasks.

The trivial task is a builtin (pickled by reference) and ``pure=True`` (the default),
so the clients' own per-task work -- tokenizing, building the graph, encoding it,
tracking futures -- is what differs. Prints a table with ratios and targets and
writes ``results/client.json``.
"""

from __future__ import annotations

import argparse
import itertools
import operator
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import print_table, summarize, write_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from procs import LocalProcesses, wait_for  # noqa: E402

#: metric -> (direction, target ratio ours/stock): "max" must not exceed, "min" reach.
TARGETS = {
    "import time": ("max", 0.3),
    "task latency": ("max", 0.8),
    "throughput": ("min", 1.0),
}

noop = operator.pos


def import_times(repeat: int) -> dict[str, list[float]]:
    """Wall seconds of fresh interpreters importing each client (and of ``pass``).

    Both sides import from bytecode caches, as an installed package does: the children
    write and read them under a private ``PYTHONPYCACHEPREFIX`` (even where the caller
    set ``PYTHONDONTWRITEBYTECODE``, which would otherwise have our source-tree modules
    compiled on every import while distributed's come precompiled from site-packages).
    """
    commands = {
        "baseline": "pass",
        "ours": "import clusterlaunch.client",
        "stock": "import distributed",
        "dask": "import dask",  # distributed imports it; ours only on first use
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def timed(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="bench-client-pycache-") as cache:
        env["PYTHONPYCACHEPREFIX"] = cache
        for code in commands.values():  # write the caches, warm the page cache
            timed(code)
            timed(code)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(repeat):
            for name, code in commands.items():
                times[name].append(timed(code))
    return times


def scheduler_task_count(oracle: Any) -> int:
    return oracle.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))


def throughput_times(
    clients: dict[str, Any], oracle: Any, ntasks: int, repeat: int
) -> dict[str, list[float]]:
    """Seconds of ``map`` + ``gather`` of ``ntasks`` fresh tasks, the clients taking turns."""
    blocks = itertools.count()

    def run(client: Any) -> float:
        start_value = next(blocks) * ntasks
        wait_for(lambda: scheduler_task_count(oracle) == 0, 60, "an idle scheduler", 0.05)
        start = time.perf_counter()
        futures = client.map(noop, range(start_value, start_value + ntasks))
        results = client.gather(futures)
        elapsed = time.perf_counter() - start
        assert results[-1] == start_value + ntasks - 1
        del futures
        return elapsed

    for client in clients.values():  # warm-up
        run(client)
    times: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(repeat):
        for name, client in clients.items():
            times[name].append(run(client))
    return times


def latency_times(clients: dict[str, Any], n: int, block: int = 20) -> dict[str, list[float]]:
    """Seconds of ``n`` round trips per client, in blocks of ``block`` consecutive calls.

    Blocks, not single calls, take turns: what a round trip leaves the scheduler to
    clean up (releasing the key) lands in its own client's next call, as it does in a
    user's loop, instead of in the other client's.
    """
    values = itertools.count()
    times: dict[str, list[float]] = {name: [] for name in clients}

    def one(client: Any) -> float:
        value = next(values)
        start = time.perf_counter()
        assert client.submit(noop, value).result() == value
        return time.perf_counter() - start

    for client in clients.values():  # warm-up
        for _ in range(block):
            one(client)
    while min(len(t) for t in times.values()) < n:
        for name, client in clients.items():
            times[name].extend(one(client) for _ in range(min(block, n - len(times[name]))))
    return times


def ratio_row(metric: str, ours: float, stock: float, unit: str, **extra: Any) -> dict[str, Any]:
    """One row of the table; metrics without a target are for information."""
    direction, target = TARGETS.get(metric, (None, None))
    ratio = ours / stock if stock else float("inf")
    met = None
    if direction is not None:
        met = "yes" if (ratio <= target if direction == "max" else ratio >= target) else "NO"
    return {
        "metric": metric,
        "unit": unit,
        "ours": ours,
        "distributed": stock,
        "ratio": ratio,
        "target": None if target is None else f"{'<=' if direction == 'max' else '>='} {target}x",
        "met": met,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="throughput runs per client")
    parser.add_argument("--import-repeat", type=int, default=7, help="fresh imports per module")
    parser.add_argument("--latency-n", type=int, default=200, help="round trips per client")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per throughput run")
    args = parser.parse_args(argv)

    imports = import_times(args.import_repeat)
    baseline = summarize(imports["baseline"])["median_s"]
    import_ours = summarize(imports["ours"])["median_s"] - baseline
    import_stock = summarize(imports["stock"])["median_s"] - baseline
    import_dask = summarize(imports["dask"])["median_s"] - baseline

    import distributed

    from clusterlaunch.client import Client

    with LocalProcesses() as procs:
        procs.start_scheduler()
        workers = [procs.start_worker("--nthreads", "1") for _ in range(2)]
        theirs = distributed.Client(procs.address, set_as_default=False, timeout=60)
        ours = Client(procs.address, timeout=60)
        try:
            wait_for(
                lambda: len(theirs.scheduler_info(n_workers=-1)["workers"]) == len(workers),
                60,
                "the workers to register",
            )
            clients = {"ours": ours, "distributed": theirs}
            latency = latency_times(clients, args.latency_n)
            throughput = throughput_times(clients, theirs, args.tasks, args.repeat)
        finally:
            ours.close()
            theirs.close()

    lat = {name: summarize(times)["median_s"] for name, times in latency.items()}
    thr = {name: args.tasks / summarize(times)["median_s"] for name, times in throughput.items()}
    rows = [
        ratio_row(
            "import time",
            import_ours * 1e3,
            import_stock * 1e3,
            "ms",
            note=f"minus bare interpreter start ({baseline * 1e3:.0f} ms)",
        ),
        ratio_row(
            "import dask alone",
            import_dask * 1e3,
            import_stock * 1e3,
            "ms",
            note="distributed imports it; our client only on first use",
        ),
        ratio_row(
            "task latency",
            lat["ours"] * 1e3,
            lat["distributed"] * 1e3,
            "ms",
            note=f"median of {args.latency_n} submit -> result",
        ),
        ratio_row(
            "throughput",
            thr["ours"],
            thr["distributed"],
            "tasks/s",
            note=f"{args.tasks} tasks, map + gather, median of {args.repeat}",
        ),
    ]
    print_table(
        rows,
        ["metric", "unit", "ours", "distributed", "ratio", "target", "met", "note"],
        title="clusterlaunch.Client vs distributed.Client (scheduler + 2 of our workers)",
    )
    path = write_results(
        "client",
        rows,
        {
            "args": vars(args),
            "raw": {
                "import_s": imports,
                "latency": {name: summarize(t) for name, t in latency.items()},
                "throughput": {name: summarize(t) for name, t in throughput.items()},
            },
        },
    )
    print(f"wrote {path}")
    return 0 if all(row["met"] in ("yes", None) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
