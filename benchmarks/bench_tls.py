"""Our worker vs stock ``dask worker --no-nanny`` over TLS, side by side in one run.

    python benchmarks/bench_tls.py [--transfer-repeat 7] [--start-repeat 3]
                                   [--connections 1000] [--check]

One ``dask scheduler --tls-...`` subprocess with certificates made for the run (the
tests' ``certs.py``), mutual authentication everywhere. Measured:

- a 200 MiB dependency computed on one worker and read by a task on another worker
  of the same kind, MB/s of the median of ``--transfer-repeat`` runs (taking turns);
- 8 worker processes of one kind started at once until the scheduler lists all of
  them (process start, TLS handshake, registration), median of ``--start-repeat``;
- RSS a worker process gains holding ``--connections`` idle TLS connections that
  completed the TLS and dask handshakes (opened by this process with our connect).

Prints a table with ratios and targets and writes ``results/tls.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from bench_worker import TRANSFER_BYTES, ratio_row, transfer_run
from harness import print_table, run_interleaved, summarize, write_results

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from certs import CertAuthority, CertFiles  # noqa: E402
from procs import LocalProcesses, Proc, worker_address  # noqa: E402

from clusterlaunch.comm.tcp import connect  # noqa: E402
from clusterlaunch.comm.tls import TLSConfig  # noqa: E402

#: metric -> (direction, target ratio ours/stock), read by bench_worker.ratio_row.
TARGETS = {
    "TLS transfer": ("min", 1.0),
    "TLS start + register 8": ("max", 0.5),
}
#: Absolute target: MiB that 1,000 idle connections may cost our worker.
IDLE_CONNECTIONS_MIB = 10


def start_many(procs: LocalProcesses, client: Any, flags: list[str], *, stock: bool) -> float:
    start = time.perf_counter()
    started = [procs.start_worker("--nthreads", "1", *flags, stock=stock) for _ in range(8)]
    for proc in started:
        worker_address(client, proc)
    elapsed = time.perf_counter() - start
    for proc in started:
        proc.kill()
    return elapsed


def idle_connection_cost(proc: Proc, address: str, tls: TLSConfig, n: int) -> float:
    """MiB of RSS ``proc`` gains while ``n`` handshaken TLS connections to it sit idle."""

    async def main() -> float:
        for comm in [await connect(address, timeout=30, tls=tls) for _ in range(20)]:
            comm.abort()
        await asyncio.sleep(0.5)
        before = psutil.Process(proc.pid).memory_info().rss
        comms = []
        for _ in range(n // 100):
            comms += await asyncio.gather(
                *(connect(address, timeout=60, tls=tls) for _ in range(100))
            )
        await asyncio.sleep(0.5)
        during = psutil.Process(proc.pid).memory_info().rss
        for comm in comms:
            comm.abort()
        return (during - before) / 2**20

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transfer-repeat", type=int, default=7)
    parser.add_argument("--start-repeat", type=int, default=3)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)

    import bench_worker
    from distributed import Client
    from distributed.security import Security

    bench_worker.TARGETS.update(TARGETS)
    # The scheduler and workers import bench_worker's payload functions by reference.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(HERE), os.environ.get("PYTHONPATH")])
    )
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, LocalProcesses() as procs:
        ca = CertAuthority(Path(tmp))
        procs.start_scheduler(args=ca.issue("scheduler").flags())
        worker_files: CertFiles = ca.issue("worker")
        client_files = ca.issue("client")
        flags = worker_files.flags()
        ours = [procs.start_worker("--nthreads", "1", *flags) for _ in range(2)]
        stock = [procs.start_worker("--nthreads", "1", *flags, stock=True) for _ in range(2)]
        security = Security(
            tls_ca_file=client_files.ca_file,
            tls_client_cert=client_files.cert,
            tls_client_key=client_files.key,
            require_encryption=True,
        )
        with Client(procs.address, security=security, timeout=30) as client:
            ours_addr = [worker_address(client, p) for p in ours]
            stock_addr = [worker_address(client, p) for p in stock]
            tag = [0]
            transfer: dict[str, list[float]] = {"ours": [], "stock": []}

            def run(name: str, pair: list[str]) -> Any:
                return lambda: transfer[name].append(transfer_run(client, pair[0], pair[1], tag))

            run_interleaved(
                {"ours": run("ours", ours_addr), "stock": run("stock", stock_addr)},
                repeat=args.transfer_repeat,
            )
            transfer = {k: v[1:] for k, v in transfer.items()}  # the warm-up
            raw["transfer_s"] = {k: summarize(v) for k, v in transfer.items()}
            rows.append(
                ratio_row(
                    "TLS transfer",
                    TRANSFER_BYTES / 1e6 / statistics.median(transfer["ours"]),
                    TRANSFER_BYTES / 1e6 / statistics.median(transfer["stock"]),
                    "MB/s",
                )
            )

            startup: dict[str, list[float]] = {"ours": [], "stock": []}
            for _ in range(args.start_repeat):
                for name in startup:
                    startup[name].append(start_many(procs, client, flags, stock=name == "stock"))
            raw["start_8_s"] = {k: summarize(v) for k, v in startup.items()}
            rows.append(
                ratio_row(
                    "TLS start + register 8",
                    statistics.median(startup["ours"]),
                    statistics.median(startup["stock"]),
                    "s",
                )
            )

            tls = TLSConfig(
                ca_file=client_files.ca_file, cert=client_files.cert, key=client_files.key
            )
            cost = {
                "ours": idle_connection_cost(ours[0], ours_addr[0], tls, args.connections),
                "stock": idle_connection_cost(stock[0], stock_addr[0], tls, args.connections),
            }
            raw["idle_connections_mib"] = cost
            row = ratio_row(
                f"{args.connections} idle TLS conns", cost["ours"], cost["stock"], "MiB"
            )
            row["target"] = f"ours <= {IDLE_CONNECTIONS_MIB} MiB"
            row["met"] = "yes" if cost["ours"] <= IDLE_CONNECTIONS_MIB else "NO"
            rows.append(row)

    print_table(rows, ["metric", "unit", "ours", "stock", "ratio", "target", "met"], title="TLS")
    write_results("tls", rows, {"raw": raw})
    return 1 if args.check and any(r["met"] == "NO" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
