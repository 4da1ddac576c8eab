"""Round trips of a large numpy array over loopback: our comm vs distributed's vs memcpy.

    python benchmarks/bench_comm.py [--size-mb 200] [--repeat 5]

Each transport gets an echo server in a process of its own (a worker and its peer
are separate processes too); this process connects, sends the array and receives
it back. After one checked and one warm-up round trip each, the transports and
memcpy take turns, ``--repeat`` rounds, so that load from elsewhere on the machine
hits all three alike:

- ours: ``clusterlaunch.comm.tcp.connect`` + ``send_recv`` to our ``Server``;
- distributed: ``distributed.comm.connect`` + ``distributed.core.send_recv`` to a
  ``distributed.core.Server``.

Both servers decode the array and send it back wrapped for out-of-band
serialization. A round trip moves the payload twice, so its rate is
2 * size / time; memcpy's is size / time for one ``numpy.copyto`` of the same size
into a buffer already touched. Prints a table and writes ``results/comm.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from harness import print_table, rate, run_interleaved_async, summarize, write_results

HERE = Path(__file__).resolve().parent
SERVE_TIMEOUT = 60.0


# ------------------------------------------------------------- echo servers


async def serve_ours() -> None:
    from clusterlaunch.comm.server import Server
    from clusterlaunch.protocol import Serialize

    server = Server({"echo_array": lambda data: Serialize(data)}, name="bench-echo")
    await server.listen("tcp://127.0.0.1:0")
    await _serve_until_stdin_closes(server.address)
    await server.stop()


async def serve_distributed() -> None:
    from distributed.core import Server
    from distributed.protocol import to_serialize

    server = Server({"echo_array": lambda data: to_serialize(data)})
    await server
    await server.listen("tcp://127.0.0.1:0")
    await _serve_until_stdin_closes(server.address)
    await server.close()


async def _serve_until_stdin_closes(address: str) -> None:
    print(address, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


class EchoServer:
    """An echo server of ``kind`` in a child process; ``address`` once it listens."""

    def __init__(self, kind: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.address = self.process.stdout.readline().strip()
        if not self.address.startswith("tcp://"):
            self.stop()
            raise RuntimeError(f"{kind} echo server did not start (got {self.address!r})")

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ------------------------------------------------------------------ clients


async def measure(
    ours_address: str, distributed_address: str, payload: np.ndarray, repeat: int
) -> dict[str, list[float]]:
    """Round trip times of both transports and memcpy times, taking turns."""
    from distributed.comm import connect as distributed_connect
    from distributed.core import send_recv as distributed_send_recv
    from distributed.protocol import to_serialize

    from clusterlaunch.comm.rpc import send_recv
    from clusterlaunch.comm.tcp import connect
    from clusterlaunch.protocol import Serialize

    ours = await connect(ours_address)
    theirs = await distributed_connect(distributed_address)
    target = np.empty_like(payload)
    try:

        async def ours_round_trip() -> np.ndarray:
            return await send_recv(ours, op="echo_array", data=Serialize(payload))

        async def distributed_round_trip() -> np.ndarray:
            return await distributed_send_recv(theirs, op="echo_array", data=to_serialize(payload))

        check(await ours_round_trip(), payload, "ours")
        check(await distributed_round_trip(), payload, "distributed")
        return await run_interleaved_async(
            {
                "ours": ours_round_trip,
                "distributed": distributed_round_trip,
                "memcpy": lambda: np.copyto(target, payload),
            },
            repeat=repeat,
            warmup=1,
        )
    finally:
        await ours.close()
        await theirs.close()


def check(echoed: np.ndarray, payload: np.ndarray, name: str) -> None:
    if echoed.shape != payload.shape or zlib.crc32(echoed) != zlib.crc32(payload):
        raise AssertionError(f"{name}: the echoed array differs from the one sent")


# --------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mb", type=float, default=200, help="payload, 10**6 bytes")
    parser.add_argument("--repeat", type=int, default=5, help="timed round trips per transport")
    parser.add_argument("--serve", choices=["ours", "distributed"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        asyncio.run(serve_ours() if args.serve == "ours" else serve_distributed())
        return

    nbytes = int(args.size_mb * 1e6)
    payload = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)

    with EchoServer("ours") as ours, EchoServer("distributed") as theirs:
        times = asyncio.run(measure(ours.address, theirs.address, payload, args.repeat))

    moved = {"ours": 2 * nbytes, "distributed": 2 * nbytes, "memcpy": nbytes}
    stats = {name: summarize(t) for name, t in times.items()}
    best_rate = {name: rate(moved[name], s["best_s"]) for name, s in stats.items()}
    rows = []
    for name, description in [
        ("ours", "clusterlaunch connect + Server, echo round trip"),
        ("distributed", "distributed connect + Server, echo round trip"),
        ("memcpy", "numpy.copyto, one copy"),
    ]:
        s = stats[name]
        rows.append(
            {
                "transport": name,
                "what": description,
                "payload_mb": nbytes / 1e6,
                "bytes_moved": moved[name],
                "best_s": s["best_s"],
                "median_s": s["median_s"],
                "best_mb_per_s": best_rate[name],
                "median_mb_per_s": rate(moved[name], s["median_s"]),
                "vs_distributed": best_rate[name] / best_rate["distributed"],
                "vs_memcpy": best_rate[name] / best_rate["memcpy"],
                "times_s": s["times_s"],
            }
        )

    print_table(
        rows,
        [
            "transport",
            "best_s",
            "median_s",
            "best_mb_per_s",
            "median_mb_per_s",
            "vs_distributed",
            "vs_memcpy",
        ],
        title=(
            f"{nbytes / 1e6:g} MB numpy array over loopback, best/median of {args.repeat} "
            "(round trip MB/s = 2 x payload / time; memcpy = payload / time)"
        ),
    )
    path = write_results(
        "comm", rows, {"payload_bytes": nbytes, "repeat": args.repeat, "warmup": 1}
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
