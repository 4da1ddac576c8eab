"""Faults and hostile input against a real worker process: spilling to a full and to a
read-only tmpfs, a read-only local directory at start, 1,000 idle connections, a
peer that never acknowledges get_data, a sender that declares 1 GB and trickles,
and every RPC handler fed fuzzed fields (hypothesis). After each the worker serves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import tasks
from distributed import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import LocalProcesses, Proc, registered, run_async, wait_for, worker_address
from tasks import MB

from clusterlaunch.comm.rpc import send_recv
from clusterlaunch.comm.tcp import CommClosedError, connect
from clusterlaunch.protocol import dumps, frames_header
from clusterlaunch.protocol import handshake as handshake_protocol

#: The worker's timeouts.tcp for the stalled-sender tests: cut after 2 s, not 30.
SHORT_TCP_TIMEOUT = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "2s"}


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path``; skips the test where mounting is refused."""
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def status(client: Client, address: str) -> str:
    return registered(client).get(address, {}).get("status", "unknown")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_spill_to_unwritable_tmpfs_keeps_values_pauses_and_serves(
    processes: LocalProcesses, tmp_path: Path, fault: str
) -> None:
    with tmpfs(tmp_path / "spill", "1m") as spill:
        proc = processes.start_worker("--memory-limit", "400MB", "--local-directory", str(spill))
        with Client(processes.address, timeout=30) as client:
            address = worker_address(client, proc)
            if fault == "read-only":
                remount_read_only(spill)
            arrays = client.map(tasks.filled_20mb, range(20))  # 400 MB: past the pause fraction
            wait_for(lambda: status(client, address) == "paused", 60, "the worker to pause")
            assert client.run(os.getpid, workers=[address])[address] == proc.pid
            finished = [(i, f) for i, f in enumerate(arrays) if f.status == "finished"]
            assert finished  # the values that ran before the pause, each intact in memory
            for i, value in zip(
                (i for i, _ in finished), client.gather([f for _, f in finished]), strict=True
            ):
                assert value[0] == i % 250
            assert proc.log().count("Spill to disk failed; keeping data in memory") == 1
            del arrays, finished, value  # every reference: the worker may free the values
            wait_for(lambda: status(client, address) == "running", 60, "the worker to resume")
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
        assert "Traceback" not in proc.log()


@pytest.mark.timeout(60)
def test_read_only_local_directory_at_start_is_one_line(
    processes: LocalProcesses, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "ro", "1m") as directory:
        remount_read_only(directory)
        proc = processes.start_worker("--memory-limit", "1GB", "--local-directory", str(directory))
        assert proc.wait(timeout=30) == 1
    lines = [line for line in proc.log().splitlines() if "ERROR" in line]
    assert len(lines) == 1, proc.log()
    assert "not writable: read-only file system" in lines[0]
    assert "Traceback" not in proc.log()


def rss(proc: Proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


@pytest.mark.timeout(180)
def test_thousand_idle_connections_cost_little_and_give_it_back(
    processes: LocalProcesses,
) -> None:
    proc = processes.start_worker()
    with Client(processes.address, timeout=30) as client:
        address = worker_address(client, proc)

        async def main() -> tuple[int, int, int]:
            warm = [await connect(address, timeout=30) for _ in range(50)]
            for comm in warm:
                comm.abort()
            before = rss(proc)
            comms = []
            for _ in range(10):
                comms += await asyncio.gather(*(connect(address, timeout=60) for _ in range(100)))
            for comm in comms[:10]:  # each connection is served, not only accepted
                assert await send_recv(comm, op="ping") == b"pong"
            during = rss(proc)
            for comm in comms:
                comm.abort()
            return before, during, rss(proc)

        before, during, after = run_async(main(), timeout=150)
        assert during - before < 10 * 2**20, (before, during)
        assert client.submit(sum, [1, 2], workers=[address]).result(timeout=30) == 3
    assert after - before < 10 * 2**20


@pytest.mark.timeout(120)
def test_peer_that_never_acknowledges_get_data_is_cut(processes: LocalProcesses) -> None:
    proc = processes.start_worker(env=SHORT_TCP_TIMEOUT)
    with Client(processes.address, timeout=30) as client:
        address = worker_address(client, proc)
        future = client.submit(bytes, 1000, workers=[address], pure=False)
        future.result(timeout=30)

        async def main() -> None:
            stalled = []
            for _ in range(8):  # every outgoing slot of a same-host peer
                comm = await connect(address, timeout=30)
                reply = await send_recv(comm, op="get_data", keys=[future.key], who="test")
                assert reply["status"] == "OK"
                stalled.append(comm)  # and never acknowledged
            comm = await connect(address, timeout=30)
            assert (await send_recv(comm, op="get_data", keys=[future.key]))["status"] == "busy"
            for comm in stalled:
                with pytest.raises(CommClosedError):
                    await asyncio.wait_for(comm.read(), 60)
            fresh = await connect(address, timeout=30)
            reply = await send_recv(fresh, op="get_data", keys=[future.key])
            assert reply["status"] == "OK"
            await fresh.write("OK")
            fresh.abort()

        run_async(main(), timeout=100)
    assert "no get_data acknowledgement" in proc.log()


@pytest.mark.timeout(120)
def test_sender_declaring_a_gigabyte_and_trickling_is_cut(processes: LocalProcesses) -> None:
    proc = processes.start_worker(env=SHORT_TCP_TIMEOUT)
    with Client(processes.address, timeout=30) as client:
        address = worker_address(client, proc)
        host, port = address.removeprefix("tcp://").rsplit(":", 1)

        async def main() -> None:
            reader, writer = await asyncio.open_connection(host, int(port))
            handshake = dumps(handshake_protocol.local_info())
            writer.write(frames_header([len(bytes(f)) for f in handshake]))
            for frame in handshake:
                writer.write(bytes(frame))
            writer.write(frames_header([1 << 30]))  # one frame of 1 GiB, then a trickle
            while not reader.at_eof():
                writer.write(b"x")
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(reader.read(1 << 16), 0.2)
            writer.close()

        run_async(main(), timeout=60)
        assert client.submit(sum, [1, 2], workers=[address]).result(timeout=30) == 3
        assert rss(proc) < 500 * MB  # the declared gigabyte was never touched
    assert "stalled mid-message" in proc.log()


#: Field values with no ':' in any text, so no fuzzed value is an address to connect to.
SAFE_TEXT = st.text(alphabet=st.characters(blacklist_characters=":"), max_size=20)
FIELD_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | SAFE_TEXT | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SAFE_TEXT, inner, max_size=4),
    max_leaves=10,
)
#: Ops that stop the worker by design (the scheduler's and the nanny's to send).
STOPPING_OPS = {"terminate", "close", "close_gracefully", "restart"}


@pytest.mark.timeout(300)
def test_every_handler_survives_fuzzed_fields(processes: LocalProcesses) -> None:
    proc = processes.start_worker(env=SHORT_TCP_TIMEOUT)
    with Client(processes.address, timeout=30) as client:
        address = worker_address(client, proc)
        ops = client.run(lambda dask_worker: sorted(dask_worker.handlers), workers=[address])[
            address
        ]
        ops = [op for op in ops if op not in STOPPING_OPS]
        assert "get_data" in ops and "gather" in ops

        async def call(op: str, fields: dict) -> None:
            comm = await connect(address, timeout=30)
            try:
                await asyncio.wait_for(send_recv(comm, op=op, **fields), 10)
            except Exception:  # an error reply, a closed connection: all fine
                pass
            finally:
                comm.abort()

        @settings(
            max_examples=12 * len(ops),
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            op=st.sampled_from(ops),
            fields=st.dictionaries(
                st.sampled_from(
                    [
                        "keys",
                        "who",
                        "data",
                        "who_has",
                        "function",
                        "args",
                        "kwargs",
                        "stimulus_id",
                        "report",
                        "n",
                        "nbytes",
                        "key",
                        "serializers",
                    ]
                )
                | SAFE_TEXT,
                FIELD_VALUES,
                max_size=5,
            ),
        )
        def fuzz(op: str, fields: dict) -> None:
            fields.pop("op", None)
            fields.pop("reply", None)
            run_async(call(op, fields), timeout=30)
            assert proc.alive(), proc.log()[-3000:]

        fuzz()
        assert client.submit(sum, [1, 2], workers=[address]).result(timeout=30) == 3
        x = client.submit(bytes, 100, workers=[address], pure=False)
        assert client.gather(x) == bytes(100)
