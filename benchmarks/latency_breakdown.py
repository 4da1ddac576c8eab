"""Where the round trip of one trivial task goes, for our worker and a stock one.

    python benchmarks/latency_breakdown.py [--n 200] [--pause 0.02]

One ``dask scheduler``; one of our workers and one stock ``dask worker --no-nanny``
(``--nthreads 1`` each), both started through this script so that it can note when
each message is received (its decoding starts) and sent (its encoding is done and the
bytes go to the socket: not the end of the write, which on a busy machine returns only
after the scheduler, woken by it, has handled the message); one ``distributed.Client``
submitting one trivial task at a time, to one kind and then the other, ``--pause``
seconds apart so that no batching window of the previous task is still open.

For each task, the client's submit and result times, the scheduler's transition log
and the worker's message times cut the round trip into seven segments; the table shows
the median of each. Two of them are the worker at work (compute-task received ->
task-finished sent, get_data received -> reply sent). The rest is the client, the
scheduler and the way between them and the worker: about what a worker that took no
time at all would still see. Its ratio to the stock round trip is about the best that
any worker could reach against the stock client and scheduler on this machine.

Prints the table and writes ``results/latency_breakdown.json``. Diagnostic, no
targets: ``bench_worker.py`` measures the task latency that has one.
"""

from __future__ import annotations

import argparse
import operator
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness import LONG_TRANSITION_LOG, print_table, write_results

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from procs import LocalProcesses, Proc, worker_address  # noqa: E402

KINDS = ("ours", "stock")

#: (segment, start point, end point); points are scheduler transitions, worker
#: messages and the client's submit/result times, as ``task_points`` names them.
SEGMENTS = [
    ("client -> scheduler (update-graph)", "submit", "processing"),
    ("scheduler -> worker (compute-task)", "processing", "compute-task received"),
    ("worker: run the task", "compute-task received", "task-finished sent"),
    ("worker -> scheduler (task-finished)", "task-finished sent", "memory"),
    ("scheduler -> client -> scheduler -> worker (get_data)", "memory", "get_data received"),
    ("worker: answer get_data", "get_data received", "get_data sent"),
    ("worker -> scheduler -> client (result)", "get_data sent", "result"),
]
WORKER_SEGMENTS = ("worker: run the task", "worker: answer get_data")

noop = operator.pos

# ------------------------------------------------------------ the traced workers
# ``python latency_breakdown.py --traced-worker ours|stock ARGS...`` runs a worker whose
# transport notes each message it receives and sends in the module-level TRACE, which
# the driver reads back with ``client.run``.

TRACE: list[tuple[float, str, str]] = []


def _ops(msg: Any) -> str:
    """The op (or status) of a message; of each message in a batch, comma-separated."""
    if isinstance(msg, (list, tuple)):
        return ",".join(_ops(m) for m in msg)
    if isinstance(msg, dict):
        return str(msg.get("op", msg.get("status", "")))
    return type(msg).__name__


def _trace_ours() -> None:
    from clusterlaunch.comm import tcp

    decode, encode = tcp.loads, tcp.dumps

    def traced_loads(frames: Any) -> Any:
        received = time.time()
        msg = decode(frames)
        TRACE.append((received, "received", _ops(msg)))
        return msg

    def traced_dumps(msg: Any, **kwargs: Any) -> list:
        frames = encode(msg, **kwargs)
        TRACE.append((time.time(), "sent", _ops(msg)))
        return frames

    tcp.loads, tcp.dumps = traced_loads, traced_dumps


def _trace_stock() -> None:
    from distributed.comm import tcp

    decode, encode = tcp.from_frames, tcp.to_frames

    async def traced_from_frames(frames: Any, *args: Any, **kwargs: Any) -> Any:
        received = time.time()
        msg = await decode(frames, *args, **kwargs)
        TRACE.append((received, "received", _ops(msg)))
        return msg

    async def traced_to_frames(msg: Any, *args: Any, **kwargs: Any) -> list:
        frames = await encode(msg, *args, **kwargs)
        TRACE.append((time.time(), "sent", _ops(msg)))
        return frames

    tcp.from_frames, tcp.to_frames = traced_from_frames, traced_to_frames


def run_traced_worker(kind: str, args: list[str]) -> None:
    if kind == "ours":
        _trace_ours()
        from clusterlaunch.cli import app

        app(["worker", *args])
    else:
        _trace_stock()
        from distributed.cli.dask_worker import main

        sys.argv = ["dask worker", *args, "--no-nanny"]
        main()


def read_trace() -> list:
    """Runs on a traced worker: what it noted so far."""
    return list(sys.modules["__main__"].TRACE)


# ------------------------------------------------------------ the driver


def transitions(dask_scheduler: Any, keys: list) -> dict:
    """Runs on the scheduler: key -> {state: time it entered it}."""
    wanted = set(keys)
    times: dict = {}
    for entry in dask_scheduler.transition_log:
        if entry[0] in wanted:
            times.setdefault(entry[0], {})[entry[2]] = entry[-1]
    return times


def task_points(
    submitted: float, finished: float, states: dict, trace: list
) -> dict[str, float] | None:
    """The times of one task's points, or None if one is missing."""
    points = {"submit": submitted, "result": finished}
    for state in ("processing", "memory"):
        if state in states:
            points[state] = states[state]
    for stamp, direction, ops in trace:
        if not submitted <= stamp <= finished:
            continue
        for op in ("compute-task", "task-finished", "get_data"):
            if op in ops.split(","):
                points.setdefault(f"{op} {direction}", stamp)
        if direction == "sent" and ops == "OK" and "get_data received" in points:
            points.setdefault("get_data sent", stamp)
    wanted = {p for _, start, end in SEGMENTS for p in (start, end)}
    return points if wanted <= points.keys() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="tasks per kind")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between tasks")
    args = parser.parse_args(argv)

    from distributed import Client

    with LocalProcesses() as procs:
        procs.start_scheduler(env=LONG_TRANSITION_LOG)
        workers = {}
        for kind in KINDS:
            label = f"traced-{kind}"
            proc = Proc(
                [
                    sys.executable,
                    __file__,
                    "--traced-worker",
                    kind,
                    procs.address,
                    "--nthreads",
                    "1",
                    "--name",
                    label,
                ],
                procs.log_dir,
                label,
            )
            procs.workers.append(proc)
            workers[kind] = proc
        with Client(procs.address, timeout=30) as client:
            address = {kind: worker_address(client, proc) for kind, proc in workers.items()}
            time.sleep(1.0)  # let start-up work (first heartbeats) settle
            runs: dict[str, list[tuple[Any, float, float]]] = {kind: [] for kind in KINDS}
            for i in range(args.n + 10):
                for kind in KINDS:
                    time.sleep(args.pause)
                    submitted = time.time()
                    future = client.submit(
                        noop, 1, workers=[address[kind]], allow_other_workers=False, pure=False
                    )
                    future.result()
                    if i >= 10:  # the first few warm up imports and connections
                        runs[kind].append((future.key, submitted, time.time()))
                    del future
            states = client.run_on_scheduler(
                transitions, keys=[key for kind in KINDS for key, _, _ in runs[kind]]
            )
            traces = {kind: client.run(read_trace, workers=[address[kind]]) for kind in KINDS}
            traces = {kind: traces[kind][address[kind]] for kind in KINDS}

    segments: dict[str, dict[str, list[float]]] = {kind: {} for kind in KINDS}
    for kind in KINDS:
        for key, submitted, finished in runs[kind]:
            points = task_points(submitted, finished, states.get(key, {}), traces[kind])
            if points is None:
                continue  # a heartbeat or another message got in the way of matching
            per = segments[kind]
            for name, start, end in SEGMENTS:
                per.setdefault(name, []).append(points[end] - points[start])
            inside = sum(points[e] - points[s] for n, s, e in SEGMENTS if n in WORKER_SEGMENTS)
            per.setdefault("round trip", []).append(finished - submitted)
            per.setdefault("outside the worker", []).append(finished - submitted - inside)

    def ms(kind: str, name: str) -> float:
        return statistics.median(segments[kind][name]) * 1e3

    names = [name for name, _, _ in SEGMENTS] + ["round trip", "outside the worker"]
    rows = [
        {"segment": name, "ours ms": ms("ours", name), "stock ms": ms("stock", name)}
        for name in names
    ]
    stock_total = ms("stock", "round trip")
    bounds = {kind: ms(kind, "outside the worker") / stock_total for kind in KINDS}
    print_table(rows, title="round trip of one trivial task, medians")
    counted = {kind: len(segments[kind]["round trip"]) for kind in KINDS}
    print(f"tasks matched: {counted}")
    print(f"round trip, ours / stock: {ms('ours', 'round trip') / stock_total:.2f}x")
    print(
        "best ratio a zero-time worker could reach (outside-the-worker time / stock round"
        f" trip): {bounds['ours']:.2f}x measured around ours, {bounds['stock']:.2f}x"
        " around stock"
    )
    path = write_results(
        "latency_breakdown",
        rows,
        {"n": args.n, "pause_s": args.pause, "matched": counted, "zero_worker_ratio": bounds},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--traced-worker":
        run_traced_worker(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(main())
