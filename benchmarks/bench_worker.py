"""Our worker vs stock ``dask worker --no-nanny``, side by side on one real scheduler.

    python benchmarks/bench_worker.py [--repeat 5] [--latency-n 200] [--pause 0.02]
                                      [--tasks 5000] [--transfer-repeat 11] [--check]

One ``dask scheduler`` subprocess; two of our worker processes and two stock ones
(``--nthreads 1`` each) registered with it at the same time; one
``distributed.Client`` in this process. Work meant for one kind is pinned to it with
``workers=[...]`` and ``allow_other_workers=False``, so both kinds see the same
scheduler, the same client and the same (idle) neighbours, and the rounds of ours
and theirs take turns so that load from elsewhere on the machine hits both alike.

Measured:

- idle RSS of each worker process after registration (psutil), median of the two;
- cold import of ``clusterlaunch.worker.worker`` vs ``distributed.worker`` in a fresh
  interpreter (wall time, minus that of a bare ``python -c pass``), median;
- round trip of one trivial task, submit -> result, median of ``--latency-n``, each
  task ``--pause`` seconds after the previous one: more than distributed.Client's
  10 ms batching window, so that no submit waits out a window the previous task
  opened (back to back, one kind's quick round trip would make the other kind's next
  submit wait); and, for information, the part of it between the scheduler sending
  the task to the worker and hearing that it finished (scheduler's transition log).
  ``latency_breakdown.py`` splits the round trip further;
- throughput: ``--tasks`` trivial tasks through one client (map + gather) over both
  workers of a kind, tasks/s of the median run;
- a 200 MB dependency computed on one worker and read by a task on the other, MB/s
  of the median of ``--transfer-repeat`` runs (the consumer's submit -> result, with
  the producer in memory). Both kinds receive into fresh huge-page memory (numpy
  madvises it for dask's worker, our frames reader for ours). On the VMs here freed
  2 MB blocks go back to the host after about 2 s (virtio-balloon free page
  reporting), and a receive that lands on them faults them back in at ~2 ms/MB:
  300-500 ms added to a run of either kind, at random. More rounds keep those
  outliers out of the median;
- for information, no target: start of a worker process -> listed by the scheduler.

Prints a table with ratios and targets and writes ``results/worker.json``.
"""

from __future__ import annotations

import argparse
import operator
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
import psutil
from harness import LONG_TRANSITION_LOG, print_table, run_interleaved, summarize, write_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from procs import LocalProcesses, Proc, worker_address  # noqa: E402

TRANSFER_BYTES = 200 * 2**20

#: metric -> (direction, target ratio ours/stock). "max": ours/stock must not exceed
#: the target; "min": it must reach it.
TARGETS = {
    "idle RSS": ("max", 0.6),
    "import time": ("max", 0.5),
    "task latency": ("max", 0.7),
    "throughput": ("min", 1.2),
    "transfer": ("min", 1.0),
}


# ------------------------------------------------------------------ task functions
# The trivial task is a builtin, pickled by reference, so that the measurement is the
# worker's overhead and not unpickling a function; the payload functions below travel
# by value (this script runs as __main__).

noop = operator.pos


def make_payload(nbytes: int, tag: int) -> Any:
    import numpy as np

    payload = np.empty(nbytes, dtype=np.uint8)
    payload[:] = tag % 251
    return payload


def payload_nbytes(payload: Any) -> int:
    return int(payload.nbytes)


# ------------------------------------------------------------------ measurements


def import_times(repeat: int) -> dict[str, list[float]]:
    """Wall seconds of fresh interpreters importing each module (and of ``pass``)."""
    commands = {
        "baseline": "pass",
        "ours": "import clusterlaunch.worker.worker",
        "stock": "import distributed.worker",
    }

    def timed(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in commands}
    for code in commands.values():  # warm the page cache
        timed(code)
    for _ in range(repeat):
        for name, code in commands.items():
            times[name].append(timed(code))
    return times


def idle_rss(procs: list[Proc]) -> list[int]:
    return [psutil.Process(p.pid).memory_info().rss for p in procs]


def latency_once(client: Any, workers: list[str], keys: list) -> None:
    future = client.submit(noop, 1, workers=workers, allow_other_workers=False, pure=False)
    future.result()
    keys.append(future.key)


def scheduler_seen_times(dask_scheduler: Any, keys: list) -> list[float]:
    """Runs on the scheduler: for each key, seconds from sending it to a worker
    (-> processing) to hearing it finished (processing -> memory)."""
    wanted = set(keys)
    sent: dict = {}
    times = []
    for entry in dask_scheduler.transition_log:
        key, start, finish, stamp = entry[0], entry[1], entry[2], entry[-1]
        if key not in wanted:
            continue
        if finish == "processing":
            sent[key] = stamp
        elif start == "processing" and finish == "memory" and key in sent:
            times.append(stamp - sent.pop(key))
    return times


def throughput_run(client: Any, workers: list[str], ntasks: int) -> None:
    futures = client.map(
        noop, range(ntasks), workers=workers, allow_other_workers=False, pure=False
    )
    results = client.gather(futures)
    assert len(results) == ntasks


def transfer_run(client: Any, source: str, target: str, tag: list[int]) -> float:
    from distributed import wait

    """Seconds for a task on ``target`` to get a fresh 200 MB value from ``source``."""
    tag[0] += 1
    payload = client.submit(
        make_payload,
        TRANSFER_BYTES,
        tag[0],
        workers=[source],
        allow_other_workers=False,
        pure=False,
    )
    wait([payload])  # in memory on the source (gather would pull it to the client)
    start = time.perf_counter()
    nbytes = client.submit(
        payload_nbytes, payload, workers=[target], allow_other_workers=False, pure=False
    ).result()
    elapsed = time.perf_counter() - start
    assert nbytes == TRANSFER_BYTES
    del payload
    return elapsed


def start_and_stop(procs: LocalProcesses, client: Any, *, stock: bool) -> float:
    """Seconds from starting a worker process until the scheduler lists it; then stop it."""
    start = time.perf_counter()
    proc = procs.start_worker("--nthreads", "1", stock=stock)
    worker_address(client, proc)
    elapsed = time.perf_counter() - start
    proc.kill()
    return elapsed


# ------------------------------------------------------------------ reporting


def ratio_row(metric: str, ours: float, stock: float, unit: str, **extra: Any) -> dict[str, Any]:
    return harness.ratio_row(metric, ours, stock, unit, TARGETS, **extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds of each measurement")
    parser.add_argument("--latency-n", type=int, default=200, help="tasks per latency round")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between latency tasks")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per throughput round")
    parser.add_argument(
        "--transfer-repeat", type=int, default=11, help="rounds of the 200 MB transfer"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 if a target is missed"
    )
    args = parser.parse_args(argv)

    from distributed import Client

    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}

    imports = import_times(args.repeat)
    base = statistics.median(imports["baseline"])
    ours_imp = statistics.median(imports["ours"]) - base
    stock_imp = statistics.median(imports["stock"]) - base
    raw["import_s"] = imports
    rows.append(ratio_row("import time", ours_imp * 1e3, stock_imp * 1e3, "ms"))

    with LocalProcesses() as procs:
        procs.start_scheduler(env=LONG_TRANSITION_LOG)
        ours = [procs.start_worker("--nthreads", "1") for _ in range(2)]
        stock = [procs.start_worker("--nthreads", "1", stock=True) for _ in range(2)]
        with Client(procs.address, timeout=30) as client:
            ours_addr = [worker_address(client, p) for p in ours]
            stock_addr = [worker_address(client, p) for p in stock]

            # Let start-up work (first heartbeats, lazy imports) settle before measuring.
            time.sleep(2.0)
            rss_ours, rss_stock = idle_rss(ours), idle_rss(stock)
            raw["rss_bytes"] = {"ours": rss_ours, "stock": rss_stock}
            rows.append(
                ratio_row(
                    "idle RSS",
                    statistics.median(rss_ours) / 2**20,
                    statistics.median(rss_stock) / 2**20,
                    "MiB",
                )
            )

            # One task at a time, ours and theirs alternating task by task, with a pause
            # before each (see the module docstring).
            keys: dict[str, list] = {"ours": [], "stock": []}
            latency = run_interleaved(
                {
                    "ours": lambda: latency_once(client, ours_addr[:1], keys["ours"]),
                    "stock": lambda: latency_once(client, stock_addr[:1], keys["stock"]),
                },
                repeat=args.latency_n,
                warmup=20,
                pause=args.pause,
            )
            # The part of the round trip spent with the worker, as the scheduler sees it
            # (two network hops and the worker's own handling): the rest of the round
            # trip is client and scheduler, the same for both kinds.
            seen = {
                name: client.run_on_scheduler(scheduler_seen_times, keys=k[20:])
                for name, k in keys.items()
            }
            raw["worker_share_s"] = {k: summarize(v) for k, v in seen.items()}
            raw["latency_s"] = {k: summarize(v) for k, v in latency.items()}
            rows.append(
                ratio_row(
                    "task latency",
                    statistics.median(latency["ours"]) * 1e3,
                    statistics.median(latency["stock"]) * 1e3,
                    "ms",
                )
            )

            rows.append(
                ratio_row(
                    "worker share of latency",
                    statistics.median(seen["ours"]) * 1e3,
                    statistics.median(seen["stock"]) * 1e3,
                    "ms",
                )
            )

            tput = run_interleaved(
                {
                    "ours": lambda: throughput_run(client, ours_addr, args.tasks),
                    "stock": lambda: throughput_run(client, stock_addr, args.tasks),
                },
                repeat=args.repeat,
            )
            raw["throughput_s"] = {k: summarize(v) for k, v in tput.items()}
            rows.append(
                ratio_row(
                    "throughput",
                    args.tasks / statistics.median(tput["ours"]),
                    args.tasks / statistics.median(tput["stock"]),
                    "tasks/s",
                )
            )

            tag = [0]
            transfer: dict[str, list[float]] = {"ours": [], "stock": []}

            def move(name: str, pair: list[str]) -> Any:
                return lambda: transfer[name].append(transfer_run(client, pair[0], pair[1], tag))

            run_interleaved(
                {"ours": move("ours", ours_addr), "stock": move("stock", stock_addr)},
                repeat=args.transfer_repeat,
            )
            for name in transfer:
                transfer[name] = transfer[name][1:]  # the warm-up
            raw["transfer_s"] = {k: summarize(v) for k, v in transfer.items()}
            rows.append(
                ratio_row(
                    "transfer",
                    TRANSFER_BYTES / 1e6 / statistics.median(transfer["ours"]),
                    TRANSFER_BYTES / 1e6 / statistics.median(transfer["stock"]),
                    "MB/s",
                )
            )

            rss_after = {"ours": idle_rss(ours), "stock": idle_rss(stock)}
            raw["rss_after_bytes"] = rss_after

            startup: dict[str, list[float]] = {"ours": [], "stock": []}
            for _ in range(max(2, args.repeat // 2)):
                for name in startup:
                    startup[name].append(start_and_stop(procs, client, stock=name == "stock"))
            raw["startup_s"] = {k: summarize(v) for k, v in startup.items()}
            rows.append(
                ratio_row(
                    "start to registered",
                    statistics.median(startup["ours"]) * 1e3,
                    statistics.median(startup["stock"]) * 1e3,
                    "ms",
                )
            )

    columns = ["metric", "unit", "ours", "stock", "ratio", "target", "met"]
    print_table(rows, columns, title="clusterlaunch worker vs dask worker --no-nanny")
    path = write_results(
        "worker",
        rows,
        {
            "repeat": args.repeat,
            "latency_n": args.latency_n,
            "latency_pause_s": args.pause,
            "tasks": args.tasks,
            "transfer_bytes": TRANSFER_BYTES,
            "raw": raw,
        },
    )
    print(f"wrote {path}")
    missed = [row["metric"] for row in rows if row["met"] == "NO"]
    if missed:
        print(f"targets missed: {', '.join(missed)}")
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
