"""Launching and tearing down 8 workers: clusterlaunch vs stock dask, side by side.

1. 8 workers registered with an already running scheduler (a real
   ``distributed.Scheduler`` in its own process), from nothing:
   ours (``Launcher(n=8)``: fork server cold start + 8 forks) vs 8 concurrently
   started ``dask worker --no-nanny`` processes vs ``dask worker --nworkers 8``.
2. Cold start of a whole local cluster to all 8 workers ready: our
   ``LocalCluster(n=8)`` vs ``distributed.LocalCluster(n_workers=8, processes=True)``.
3. Teardown of 8 workers until the processes are gone: ``shutdown(addresses)`` and
   ``Launcher.close()`` for ours (checked to leave no process behind), our
   ``shutdown(addresses)`` on stock workers, and SIGTERM for stock processes.

Rounds are interleaved so that a change in machine load hits every contender alike.
Run: ``python benchmarks/bench_launcher.py [--repeat 3]``; writes
``benchmarks/results/launcher.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
from harness import print_table, run_interleaved, summarize, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from procs import wait_for  # noqa: E402

from clusterlaunch import Launcher, LocalCluster, shutdown
from clusterlaunch.scheduler import SchedulerProcess, check_scheduler

N = 8
MIB = 2**20
DASK_WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]
STOCK_FLAGS = ["--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]


def registered(address: str) -> dict[str, Any]:
    return check_scheduler(address, 10)["workers"]


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
    return left


def wait_exit(procs: list[subprocess.Popen], timeout: float) -> int:
    """Wait for ``procs`` to exit; kill and count those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    hung = 0
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            hung += 1
            proc.kill()
            proc.wait()
    return hung


def uss_mib(pids: list[int]) -> float:
    """Mean unique memory per process: what each one costs beyond shared pages."""
    sizes = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            sizes.append(psutil.Process(pid).memory_full_info().uss / MIB)
    return sum(sizes) / len(sizes) if sizes else float("nan")


class Trial:
    """One contender's state between its start and its teardown."""

    def __init__(self) -> None:
        self.start_s: list[float] = []
        self.stop_s: list[float] = []
        self.uss: list[float] = []
        self.left_behind = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # version-mismatch warnings of the stock client

    scheduler = SchedulerProcess()
    address = scheduler.wait_address(60)
    trials: dict[str, Trial] = {}

    def record(name: str, start: float, stop: float, uss: float, left: int) -> None:
        trial = trials.setdefault(name, Trial())
        trial.start_s.append(start)
        trial.stop_s.append(stop)
        trial.uss.append(uss)
        trial.left_behind += left

    def wait_empty() -> None:
        wait_for(lambda: not registered(address), 30, "the scheduler to have no workers")

    # -- 1 + 3: workers for a running scheduler ------------------------------------------

    def ours_launcher() -> None:
        t0 = time.perf_counter()
        launcher = Launcher(address, n=N)
        launcher.start()
        started = time.perf_counter() - t0
        assert len(registered(address)) == N
        pids = [*launcher.pids.values(), launcher.fork_server_pid]
        uss = uss_mib(list(launcher.pids.values()))
        t0 = time.perf_counter()
        launcher.close()
        stopped = time.perf_counter() - t0
        record("ours: Launcher(n=8), close()", started, stopped, uss, len(alive(pids)))
        wait_empty()

    def ours_shutdown() -> None:
        launcher = Launcher(address, n=N)
        t0 = time.perf_counter()
        launcher.start()
        started = time.perf_counter() - t0
        pids = list(launcher.pids.values())
        uss = uss_mib(pids)
        t0 = time.perf_counter()
        shutdown(launcher.workers)
        stopped = time.perf_counter() - t0
        left = len(alive(pids))
        record("ours: Launcher(n=8), shutdown(addrs)", started, stopped, uss, left)
        launcher.close()
        wait_empty()

    def stock_no_nanny() -> None:
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [*DASK_WORKER, address, "--no-nanny", *STOCK_FLAGS],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(N)
        ]
        workers = wait_for(lambda: len(w := registered(address)) == N and w, 120, "8 stock workers")
        started = time.perf_counter() - t0
        pids = [p.pid for p in procs]
        uss = uss_mib(pids)
        t0 = time.perf_counter()
        shutdown(list(workers), timeout=60)  # our shutdown() on foreign workers
        hung = wait_exit(procs, 120)
        stopped = time.perf_counter() - t0
        record("dask worker --no-nanny x8, shutdown(addrs)", started, stopped, uss, hung)
        wait_empty()

    def stock_nanny() -> None:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [*DASK_WORKER, address, "--nworkers", str(N), *STOCK_FLAGS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: len(registered(address)) == N, 120, "8 nanny workers")
        started = time.perf_counter() - t0
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        uss = uss_mib(children)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        hung = wait_exit([proc], 120)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not alive(children), 30, "nanny workers to exit")
        stopped = time.perf_counter() - t0
        record(
            "dask worker --nworkers 8 (nannies), SIGTERM",
            started,
            stopped,
            uss,
            hung + len(alive(children)),
        )
        wait_empty()

    run_interleaved(
        {
            "ours_launcher": ours_launcher,
            "ours_shutdown": ours_shutdown,
            "stock_no_nanny": stock_no_nanny,
            "stock_nanny": stock_nanny,
        },
        repeat=args.repeat,
        warmup=0,
    )
    scheduler.stop()

    # -- 2: whole local clusters, cold ------------------------------------------------------

    def ours_cluster() -> None:
        t0 = time.perf_counter()
        cluster = LocalCluster(n=N, nthreads=1)
        started = time.perf_counter() - t0
        launcher = cluster.launcher
        pids = [*launcher.pids.values(), launcher.fork_server_pid, cluster.scheduler_pid]
        uss = uss_mib(list(launcher.pids.values()))
        t0 = time.perf_counter()
        cluster.close()
        stopped = time.perf_counter() - t0
        record("ours: LocalCluster(n=8)", started, stopped, uss, len(alive(pids)))

    def stock_cluster() -> None:
        import distributed

        t0 = time.perf_counter()
        cluster = distributed.LocalCluster(
            n_workers=N, threads_per_worker=1, processes=True, dashboard_address=None
        )
        started = time.perf_counter() - t0
        # The worker processes the nannies spawned (not multiprocessing's resource
        # tracker, which lives as long as this process).
        children = [
            c.pid
            for c in psutil.Process().children(recursive=True)
            if "spawn_main" in " ".join(c.cmdline())
        ]
        uss = uss_mib(children)
        t0 = time.perf_counter()
        cluster.close()
        wait_for(lambda: not alive(children), 30, "stock cluster processes to exit")
        stopped = time.perf_counter() - t0
        record("distributed.LocalCluster(n_workers=8)", started, stopped, uss, 0)

    run_interleaved(
        {"ours_cluster": ours_cluster, "stock_cluster": stock_cluster},
        repeat=args.repeat,
        warmup=0,
    )

    rows = []
    for name, trial in trials.items():
        start, stop = summarize(trial.start_s), summarize(trial.stop_s)
        rows.append(
            {
                "contender": name,
                "start_median_s": start["median_s"],
                "start_best_s": start["best_s"],
                "teardown_median_s": stop["median_s"],
                "teardown_best_s": stop["best_s"],
                "uss_per_worker_mib": sum(trial.uss) / len(trial.uss),
                "left_behind": trial.left_behind,  # stock: still running 2 min after
                "start_times_s": start["times_s"],
                "teardown_times_s": stop["times_s"],
            }
        )
    print_table(
        rows,
        [
            "contender",
            "start_median_s",
            "start_best_s",
            "teardown_median_s",
            "teardown_best_s",
            "uss_per_worker_mib",
            "left_behind",
        ],
        title=f"{N} workers: start until all registered, teardown until processes gone",
    )
    path = write_results(
        "launcher",
        rows,
        {"workers": N, "repeat": args.repeat, "notes": __doc__.split("\n\n")[1:3]},
    )
    print(f"\nwrote {path}")
    ours_teardown = [r for r in rows if r["contender"].startswith("ours")]
    if any(r["left_behind"] for r in ours_teardown):
        sys.exit("ours left processes behind")


if __name__ == "__main__":  # distributed.LocalCluster spawns processes: it needs this guard
    main()
