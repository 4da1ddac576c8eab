"""Our worker processes under the real ``dask scheduler`` and the real ``distributed.Client``.

Every test here runs real subprocesses (see ``procs.py``): a stock scheduler and our
``python -m clusterlaunch.worker`` processes, plus stock ``dask worker`` processes for
the mixed-cluster test. Tests that only compute share one module-scoped cluster; those
that kill, retire or stop workers get a cluster of their own. Task functions live in
``tasks.py`` so that the workers import them by reference without importing this
module (and with it distributed).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import tasks
from distributed import Client, get_task_stream
from procs import LocalProcesses, Proc, free_port, registered, wait_for, worker_address

# Tighter than the suite's default: every test here finishes in seconds; the first
# one using the shared cluster also pays for starting it.
pytestmark = pytest.mark.timeout(60)

RESULT_TIMEOUT = 60


@dataclass
class Running:
    """A scheduler and some worker processes with a client connected to them."""

    procs: LocalProcesses
    client: Client
    workers: list[Proc]
    addresses: list[str]

    def address_of(self, proc: Proc) -> str:
        return self.addresses[self.workers.index(proc)]


def _connect(procs: LocalProcesses) -> Client:
    return Client(procs.address, timeout=30, set_as_default=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Running]:
    """Scheduler + 2 of our workers x 2 threads; the first also has GPU=1."""
    with LocalProcesses() as procs:
        procs.start_scheduler()
        workers = [
            procs.start_worker("--nthreads", "2", "--resources", "GPU=1"),
            procs.start_worker("--nthreads", "2"),
        ]
        client = _connect(procs)
        try:
            addresses = [worker_address(client, w) for w in workers]
            yield Running(procs, client, workers, addresses)
            for proc in workers:
                assert proc.alive(), f"{proc.label} died:\n{procs.logs()}"
        finally:
            client.close()


@pytest.fixture
def client(cluster: Running) -> Client:
    return cluster.client


class Fresh:
    """A scheduler of one test's own; the test starts the workers it needs."""

    def __init__(self, procs: LocalProcesses) -> None:
        self.procs = procs
        self.clients: list[Client] = []

    def connect(self) -> Client:
        client = _connect(self.procs)
        self.clients.append(client)
        return client

    def start(self, *worker_args: list[str]) -> Running:
        """One of our workers per argument list, and a client that sees them all."""
        workers = [self.procs.start_worker(*args) for args in worker_args]
        client = self.connect()
        addresses = [worker_address(client, w) for w in workers]
        return Running(self.procs, client, workers, addresses)


@pytest.fixture
def fresh(processes: LocalProcesses) -> Iterator[Fresh]:
    fresh = Fresh(processes)
    try:
        yield fresh
    finally:
        for client in fresh.clients:
            client.close()


# ---------------------------------------------------------------- computations


def test_stock_client_sees_no_version_mismatch(cluster: Running) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Client(cluster.procs.address, timeout=30, set_as_default=False) as client:
            assert len(registered(client)) == 2
    mismatches = [str(w.message) for w in caught if "Mismatched versions" in str(w.message)]
    assert not mismatches, mismatches[0]


def test_map_gather_thousands(cluster: Running, client: Client) -> None:
    futures = client.map(tasks.inc, range(3000))
    results = client.gather(futures)
    assert results == list(range(1, 3001))
    holders = {w for ws in client.who_has(futures).values() for w in ws}
    assert holders == set(cluster.addresses), "both workers should have taken part"
    total = client.submit(tasks.add, *futures[:100])
    assert total.result(RESULT_TIMEOUT) == sum(range(1, 101))


def test_dask_array_cross_worker(client: Client) -> None:
    x = da.random.default_rng(42).random((800, 800), chunks=(200, 200))
    x = client.persist(x)
    x_np = client.compute(x).result(RESULT_TIMEOUT)
    holders = {w for ws in client.who_has(x).values() for w in ws}
    assert len(holders) == 2, "chunks should be spread over both workers"
    # A matrix product and a transpose make every output chunk read chunks of both.
    result = ((x @ x.T) + x.T).mean(axis=0)
    np.testing.assert_allclose(
        client.compute(result).result(RESULT_TIMEOUT), ((x_np @ x_np.T) + x_np.T).mean(axis=0)
    )
    y = x[::2, 1::2] - x.mean(axis=1)[::2, None]
    np.testing.assert_allclose(
        client.compute(y.sum(axis=0)).result(RESULT_TIMEOUT),
        (x_np[::2, 1::2] - x_np.mean(axis=1)[::2, None]).sum(axis=0),
    )


def _frame(n: int = 20_000) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    return pd.DataFrame(
        {
            "k": rng.integers(0, 25, n),
            "x": rng.random(n),
            "y": rng.integers(-100, 100, n),
            "s": rng.choice(["red", "green", "blue"], n),
        }
    )


def test_dataframe_groupby(client: Client) -> None:
    pdf = _frame()
    ddf = dd.from_pandas(pdf, npartitions=8)
    got = client.compute(ddf.groupby("k").agg({"x": "sum", "y": ["mean", "max"]})).result(
        RESULT_TIMEOUT
    )
    want = pdf.groupby("k").agg({"x": "sum", "y": ["mean", "max"]})
    # dask turns object strings into pyarrow strings; values are what matter here.
    pd.testing.assert_frame_equal(
        got.sort_index(), want.sort_index(), check_dtype=False, check_index_type=False
    )

    got = client.compute(ddf.groupby(["s", "k"]).x.count()).result(RESULT_TIMEOUT)
    want = pdf.groupby(["s", "k"]).x.count()
    pd.testing.assert_series_equal(
        got.sort_index(), want.sort_index(), check_dtype=False, check_index_type=False
    )


def test_dataframe_task_shuffle(client: Client) -> None:
    """A task-based shuffle moves every partition's pieces across both workers."""
    pdf = _frame()
    ddf = dd.from_pandas(pdf, npartitions=6)
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        shuffled = ddf.shuffle("k", npartitions=5)
        got = client.compute(shuffled).result(RESULT_TIMEOUT)
        per_partition = client.compute(shuffled.map_partitions(lambda p: set(p.k))).result(
            RESULT_TIMEOUT
        )
    pd.testing.assert_frame_equal(
        got.sort_values(["k", "x"]).reset_index(drop=True),
        pdf.sort_values(["k", "x"]).reset_index(drop=True),
        check_dtype=False,
    )
    seen: set = set()
    for keys in per_partition:
        assert not keys & seen, "each key should land in exactly one partition"
        seen |= keys


def _merge_inputs() -> tuple[dd.DataFrame, dd.DataFrame]:
    left = dd.from_pandas(_frame(2000), npartitions=4)
    right = dd.from_pandas(pd.DataFrame({"k": range(25), "z": range(25)}), npartitions=2)
    return left, right


def test_p2p_fails_clearly(fresh: Fresh) -> None:
    """P2P merges, shuffles and rechunks ask distributed for the worker's shuffle plugin,
    which ours do not have yet: each says what to do instead, with the task's own
    traceback, and the worker carries on."""
    running = fresh.start(["--nthreads", "2"], ["--nthreads", "2"])
    client = running.client
    left, right = _merge_inputs()
    ddf = dd.from_pandas(_frame(2000), npartitions=4)
    x = da.ones((200, 200), chunks=(10, 200))
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        with pytest.raises(NotImplementedError, match=r"'dataframe.shuffle.method': 'tasks'"):
            client.compute(left.merge(right, on="k")).result(RESULT_TIMEOUT)
        with pytest.raises(NotImplementedError, match="P2P shuffles") as caught:
            client.compute(ddf.shuffle("k")).result(RESULT_TIMEOUT)
    assert "get_worker_plugin" in "".join(traceback.format_tb(caught.value.__traceback__))
    with pytest.raises(NotImplementedError, match="'array.rechunk.method': 'tasks'"):
        client.compute(x.rechunk((200, 10), method="p2p").sum()).result(RESULT_TIMEOUT)
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        got = client.compute(left.merge(right, on="k")).result(RESULT_TIMEOUT)
        assert len(client.compute(ddf.shuffle("k")).result(RESULT_TIMEOUT)) == 2000
    assert len(got) == 2000 and (got.z == got.k).all()


def test_bag(client: Client) -> None:
    bag = db.from_sequence(range(10_000), npartitions=20)
    evens = bag.filter(lambda n: n % 2 == 0).map(lambda n: n * n)
    assert client.compute(evens.sum()).result(RESULT_TIMEOUT) == sum(
        n * n for n in range(0, 10_000, 2)
    )
    freq = client.compute(bag.map(lambda n: n % 7).frequencies()).result(RESULT_TIMEOUT)
    assert dict(freq) == {r: len(range(r, 10_000, 7)) for r in range(7)}
    folded = client.compute(
        bag.foldby(lambda n: n % 3, lambda acc, n: acc + n, 0, lambda a, b: a + b, 0)
    ).result(RESULT_TIMEOUT)
    assert dict(folded) == {r: sum(range(r, 10_000, 3)) for r in range(3)}


def test_delayed_diamonds(client: Client) -> None:
    """Layers of diamonds: each layer's two middle tasks both read the layer below."""
    inc, add = dask.delayed(tasks.inc, pure=True), dask.delayed(tasks.add, pure=True)
    expected = top = 0
    node = dask.delayed(0)
    for layer in range(30):
        left, right = inc(node, dask_key_name=f"l-{layer}"), inc(node, dask_key_name=f"r-{layer}")
        node = add(left, right, layer, dask_key_name=f"join-{layer}")
        top = 2 * (top + 1) + layer
    expected = top
    wide = [add(inc(i), inc(i + 1)) for i in range(200)]
    total = add(node, *wide)
    expected += sum((i + 1) + (i + 2) for i in range(200))
    assert client.compute(total).result(RESULT_TIMEOUT) == expected


def test_exception_keeps_type_and_remote_traceback(client: Client) -> None:
    future = client.submit(tasks.fail, 17)
    with pytest.raises(tasks.TaskError, match="code 17") as info:
        future.result(RESULT_TIMEOUT)
    assert info.value.code == 17
    assert future.status == "error"
    assert isinstance(future.exception(), tasks.TaskError)
    remote = "".join(traceback.format_tb(future.traceback()))
    assert "in fail" in remote and "in inner_frame" in remote, remote
    # The re-raised exception carries the remote frames too.
    raised = "".join(traceback.format_tb(info.value.__traceback__))
    assert "in inner_frame" in raised, raised
    # A dependent of a failed task fails with the same exception.
    with pytest.raises(tasks.TaskError):
        client.submit(tasks.inc, future).result(RESULT_TIMEOUT)


def test_story(cluster: Running, client: Client) -> None:
    future = client.submit(tasks.inc, 10, pure=False)
    assert future.result(RESULT_TIMEOUT) == 11
    story = client.story(future.key)
    on_workers = [entry for entry in story if entry[0] in cluster.addresses]
    states = [tuple(entry[2:4]) for entry in on_workers]
    assert ("executing", "memory") in states, story
    assert all(entry[1] == future.key for entry in on_workers)


def test_retries(client: Client, tmp_path: Path) -> None:
    counter = tmp_path / "calls"
    assert client.submit(tasks.flaky, str(counter), 2, retries=2).result(RESULT_TIMEOUT) == 3
    assert len(tasks.calls(str(counter))) == 3

    short = tmp_path / "short"
    with pytest.raises(RuntimeError, match="flaky call 2"):
        client.submit(tasks.flaky, str(short), 2, retries=1).result(RESULT_TIMEOUT)
    assert len(tasks.calls(str(short))) == 2


def test_scatter_and_broadcast(cluster: Running, client: Client) -> None:
    rng = np.random.default_rng(3)
    arrays = [rng.random(50_000) for _ in range(4)]
    scattered = client.scatter(arrays)
    sums = client.gather([client.submit(tasks.array_stats, f) for f in scattered])
    assert [s[0] for s in sums] == pytest.approx([a.sum() for a in arrays])

    matrix = rng.random((300, 400))
    [shared] = client.scatter([matrix], broadcast=True)
    # Both workers stored it (their logs say so; who_has might not for long, as the
    # scheduler's memory manager drops replicas nothing needs).
    story = client.story(shared.key)
    stored = {entry[0] for entry in story if entry[0] in cluster.addresses and entry[3] == "memory"}
    assert stored == set(cluster.addresses), story
    for address, proc in zip(cluster.addresses, cluster.workers):
        total, shape, dtype, pid = client.submit(
            tasks.array_stats, shared, workers=[address], pure=False
        ).result(RESULT_TIMEOUT)
        assert (total, shape, dtype, pid) == (
            pytest.approx(matrix.sum()),
            (300, 400),
            "float64",
            proc.pid,
        )
    np.testing.assert_array_equal(shared.result(RESULT_TIMEOUT), matrix)


def test_workers_restriction(cluster: Running, client: Client) -> None:
    for address, proc in zip(cluster.addresses, cluster.workers):
        futures = client.map(
            tasks.pid_of, range(20), workers=[address], allow_other_workers=False, pure=False
        )
        assert set(client.gather(futures)) == {proc.pid}
        holders = {w for ws in client.who_has(futures).values() for w in ws}
        assert holders == {address}
    # A task restricted to the second worker reading a value held by the first.
    a, b = cluster.addresses
    value = client.submit(tasks.inc, 41, workers=[a])
    moved = client.submit(tasks.inc, value, workers=[b])
    assert moved.result(RESULT_TIMEOUT) == 43
    assert client.who_has([value])[value.key] and b in client.who_has([moved])[moved.key]


def test_dependency_that_fails_to_load_fails_its_dependent(
    cluster: Running, client: Client
) -> None:
    """A value that can't be unpickled where it's needed: the task needing it fails
    with that error (no hang), and the worker goes on working."""
    a, b = cluster.addresses
    unloadable = client.submit(tasks.make_unloadable, workers=[a], pure=False)
    consumer = client.submit(tasks.type_name, unloadable, workers=[b], allow_other_workers=False)
    with pytest.raises(Exception, match="refuses to be unpickled"):
        consumer.result(RESULT_TIMEOUT)
    assert (
        client.submit(tasks.type_name, 1, workers=[b], pure=False).result(RESULT_TIMEOUT) == "int"
    )


def test_client_run(cluster: Running, client: Client) -> None:
    expected_pids = dict(zip(cluster.addresses, (p.pid for p in cluster.workers)))
    assert client.run(os.getpid) == expected_pids
    assert client.run(tasks.run_plain, 5) == {a: (15, pid) for a, pid in expected_pids.items()}
    assert client.run(tasks.run_with_worker) == {a: (a, pid) for a, pid in expected_pids.items()}
    first = cluster.addresses[0]
    assert client.run(tasks.run_with_worker, workers=[first]) == {
        first: (first, expected_pids[first])
    }
    assert client.run(tasks.run_async, 1) == dict.fromkeys(cluster.addresses, 101)
    with pytest.raises(ZeroDivisionError):
        client.run(lambda: 1 / 0)


def test_cancel_running_task(cluster: Running, client: Client, tmp_path: Path) -> None:
    address, other = cluster.addresses
    started, flag = tmp_path / "started", tmp_path / "stop"
    long = client.submit(tasks.block, str(flag), 60, str(started), workers=[address], pure=False)
    wait_for(started.exists, 30, "the long task to start")
    stacks = client.call_stack(keys=[long.key])
    assert "block" in "".join(stacks[address][long.key]), stacks
    long.cancel()
    wait_for(lambda: long.status == "cancelled", 10, "the cancellation")
    # The other thread takes new work at once.
    quick = client.map(tasks.pid_of, range(8), workers=[address], allow_other_workers=False)
    assert set(client.gather(quick)) == {cluster.workers[0].pid}
    del quick
    # Once the cancelled run ends, its slot and key are gone from the worker.
    flag.write_text("")

    def settled() -> bool:
        summary = client.run(tasks.worker_state_summary, workers=[address])[address]
        return summary["executing"] == 0 and long.key not in summary["tasks"]

    wait_for(settled, 20, "the cancelled task to leave the worker", interval=0.1)
    # Two tasks that each wait for the other to start finish only if both threads run.
    place = str(tmp_path / "both-threads")
    both = client.map(tasks.rendezvous, [place] * 2, count=2, workers=[address], pure=False)
    assert client.gather(both) == [2, 2], "both threads should run again"


@pytest.mark.slow
def test_large_transfer_between_workers(cluster: Running, client: Client) -> None:
    a, b = cluster.addresses
    nbytes = 200 * 2**20
    big = client.submit(tasks.big_array, nbytes, 1, workers=[a], pure=False)
    at_source = client.submit(tasks.checksum, big, workers=[a], pure=False)
    at_peer = client.submit(tasks.checksum, big, workers=[b], pure=False)
    digest_a, size_a, pid_a = at_source.result(RESULT_TIMEOUT)
    digest_b, size_b, pid_b = at_peer.result(RESULT_TIMEOUT)
    assert (size_a, size_b) == (nbytes, nbytes)
    assert (pid_a, pid_b) == (cluster.workers[0].pid, cluster.workers[1].pid)
    assert digest_a == digest_b
    # The scheduler's memory manager may already have dropped one of the two copies
    # (either one: it picks), but the value is still held by one of the workers.
    holders = set(client.who_has([big])[big.key])
    assert holders and holders <= {a, b}
    del big, at_source, at_peer


def _scheduler_bandwidth(dask_scheduler: Any) -> dict:
    return {
        "pairs": [tuple(pair) for pair in dask_scheduler.bandwidth_workers],
        "loop_intervals": [
            ws.metrics.get("event_loop_interval") for ws in dask_scheduler.workers.values()
        ],
    }


def test_transfers_are_measured_for_the_scheduler(cluster: Running, client: Client) -> None:
    a, b = cluster.addresses
    big = client.submit(tasks.big_array, 20 * 2**20, 2, workers=[a], pure=False)
    with get_task_stream(client) as stream:
        at_peer = client.submit(tasks.checksum, big, workers=[b], pure=False)
        at_peer.result(RESULT_TIMEOUT)
    [record] = [r for r in stream.data if r["key"] == at_peer.key]
    [transfer] = [s for s in record["startstops"] if s["action"] == "transfer"]
    assert transfer["source"] == a
    assert 0 < transfer["stop"] - transfer["start"] < RESULT_TIMEOUT
    # The next heartbeat of b reports the transfer's bandwidth from a.
    seen = wait_for(
        lambda: (m := client.run_on_scheduler(_scheduler_bandwidth))["pairs"].count((b, a)) and m,
        timeout=15,
        what=f"the scheduler to learn the bandwidth from {a} to {b}",
        interval=0.2,
    )
    assert all(0 < interval < 5 for interval in seen["loop_intervals"])
    del big, at_peer


def test_async_def_tasks(client: Client) -> None:
    futures = client.map(tasks.async_double, range(20), delay=0.05)
    results = client.gather(futures)
    assert [r[0] for r in results] == [2 * i for i in range(20)]
    # Coroutine tasks run on the worker's event loop, not in its task threads.
    assert {r[1] for r in results} == {"MainThread"}
    assert client.submit(tasks.identity, futures[3]).result(RESULT_TIMEOUT) == (6, "MainThread")


@pytest.mark.timeout(60)
def test_resources_serialise_tasks(cluster: Running, client: Client) -> None:
    gpu_address = cluster.addresses[0]
    futures = [
        client.submit(tasks.timed_sleep, 1.0, i, resources={"GPU": 1}, pure=False) for i in range(2)
    ]
    runs = sorted(client.gather(futures))
    assert {pid for _, _, pid, _ in runs} == {cluster.workers[0].pid}
    (start1, stop1, *_), (start2, stop2, *_) = runs
    assert stop1 <= start2, f"GPU=1 tasks overlapped: {runs}"
    summary = client.run(tasks.worker_state_summary, workers=[gpu_address])[gpu_address]
    assert summary["available_resources"] == {"GPU": 1.0}


def test_worker_never_imports_distributed(cluster: Running, client: Client) -> None:
    x = da.random.random((400, 400), chunks=100)
    assert client.compute((x + x.T).sum()).result(RESULT_TIMEOUT) > 0
    ddf = dd.from_pandas(_frame(2000), npartitions=4)
    assert client.compute(ddf.groupby("k").x.mean()).result(RESULT_TIMEOUT).size == 25
    bag = db.from_sequence(range(100), npartitions=4)
    assert client.compute(bag.map(tasks.inc).sum()).result(RESULT_TIMEOUT) == 5050
    # A lambda from here pickles by value; ``sys`` inside it by reference.
    import sys

    loaded = client.run(
        lambda: [m for m in sys.modules if m.split(".")[0] in ("distributed", "tornado")]
    )
    assert loaded == dict.fromkeys(cluster.addresses, [])


def test_garbage_bytes_do_not_hurt_the_worker(cluster: Running, client: Client) -> None:
    address = cluster.addresses[1]
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    payloads = [
        os.urandom(4096),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        # A well-formed frame header claiming a 1 TiB frame, then nothing.
        struct.pack("<QQQ", 16, 1, 2**40),
        # A well-formed header with a frame that is not msgpack.
        struct.pack("<QQQ", 16, 1, 64) + b"\xc1" * 64,
    ]
    for payload in payloads:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(15)
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass
        # Whatever it sent first (its half of the handshake), the worker hung up.
        assert len(received) < 4096
    assert (
        client.submit(tasks.pid_of, 0, workers=[address], pure=False).result(RESULT_TIMEOUT)
        == cluster.workers[1].pid
    )
    assert client.run(os.getpid, workers=[address]) == {address: cluster.workers[1].pid}


# ------------------------------------------------------------- destructive tests


def test_retire_workers_moves_data(fresh: Fresh) -> None:
    running = fresh.start(["--nthreads", "2"], ["--nthreads", "2"])
    client = running.client
    leaving, staying = running.addresses
    computed = client.map(tasks.inc, range(50), workers=[leaving], allow_other_workers=False)
    [scattered] = client.scatter([np.arange(100_000)], workers=[leaving])
    client.gather([*computed, scattered])
    keys = [f.key for f in [*computed, scattered]]

    retired = client.retire_workers([leaving])
    assert leaving in retired, retired
    assert running.workers[0].wait(30) == 0, running.workers[0].log()
    who_has = client.who_has([*computed, scattered])
    assert {k: tuple(v) for k, v in who_has.items()} == dict.fromkeys(keys, (staying,))
    assert client.gather(computed) == list(range(1, 51))
    np.testing.assert_array_equal(scattered.result(RESULT_TIMEOUT), np.arange(100_000))
    assert list(registered(client)) == [staying]


@pytest.mark.timeout(90)
def test_kill_9_mid_graph(fresh: Fresh) -> None:
    running = fresh.start(["--nthreads", "2"], ["--nthreads", "2"], ["--nthreads", "2"])
    client = running.client
    victim = running.workers[0]
    victim_address = running.addresses[0]
    layer1 = client.map(tasks.sleep_then, [0.1] * 60, range(60), pure=False)
    layer2 = [
        client.submit(tasks.sleep_then, 0.05, client.submit(tasks.add, layer1[i], layer1[i + 1]))
        for i in range(0, 60, 2)
    ]
    total = client.submit(tasks.add, *layer2)

    def victim_holds_results() -> bool:
        return any(victim_address in ws for ws in client.who_has(layer1).values())

    wait_for(victim_holds_results, 30, "the victim to hold some results", interval=0.05)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    assert total.result(RESULT_TIMEOUT) == sum(range(60))
    assert victim_address not in registered(client)
    for proc in running.workers[1:]:
        assert proc.alive(), proc.log()


def test_mixed_cluster_with_stock_worker(fresh: Fresh) -> None:
    ours = fresh.procs.start_worker("--nthreads", "1")
    stock = fresh.procs.start_worker("--nthreads", "1", stock=True)
    client = fresh.connect()
    ours_address, stock_address = worker_address(client, ours), worker_address(client, stock)
    pids = {ours_address: ours.pid, stock_address: stock.pid}

    for src, dst in ((stock_address, ours_address), (ours_address, stock_address)):
        array = client.submit(tasks.big_array, 5_000_000, 9, workers=[src], pure=False)
        frame = client.submit(tasks.make_frame, 3000, 11, workers=[src], pure=False)
        arr_src = client.submit(tasks.checksum, array, workers=[src], pure=False)
        arr_dst = client.submit(tasks.checksum, array, workers=[dst], pure=False)
        frame_src = client.submit(tasks.frame_summary, frame, workers=[src], pure=False)
        frame_dst = client.submit(tasks.frame_summary, frame, workers=[dst], pure=False)
        (d1, n1, p1), (d2, n2, p2) = arr_src.result(RESULT_TIMEOUT), arr_dst.result(RESULT_TIMEOUT)
        assert (d1, n1, p1, p2) == (d2, n2, pids[src], pids[dst])
        *summary_src, p3 = frame_src.result(RESULT_TIMEOUT)
        *summary_dst, p4 = frame_dst.result(RESULT_TIMEOUT)
        assert summary_src == summary_dst and (p3, p4) == (pids[src], pids[dst])
        # And the values themselves reach the client intact from either kind of worker.
        pd.testing.assert_frame_equal(frame.result(RESULT_TIMEOUT), tasks.make_frame(3000, 11))
        np.testing.assert_array_equal(array.result(RESULT_TIMEOUT), tasks.big_array(5_000_000, 9))
        # A copy made by the destination itself travels back to the source.
        copy = client.submit(tasks.identity, frame, workers=[dst], pure=False)
        back = client.submit(tasks.frame_summary, copy, workers=[src], pure=False)
        assert back.result(RESULT_TIMEOUT)[:3] == tuple(summary_src)


def test_sigterm_deregisters_and_exits_0(fresh: Fresh) -> None:
    running = fresh.start(["--nthreads", "1"], ["--nthreads", "1"])
    client = running.client
    [value] = client.scatter([123], workers=[running.addresses[0]])
    running.workers[0].signal(signal.SIGTERM)
    assert running.workers[0].wait(20) == 0, running.workers[0].log()

    def deregistered() -> bool:
        return running.addresses[0] not in registered(client)

    wait_for(deregistered, 20, "the scheduler to drop the worker")
    assert "SIGTERM" in running.workers[0].log()
    # The remaining worker carries on.
    assert (
        client.submit(tasks.pid_of, 1, pure=False).result(RESULT_TIMEOUT) == running.workers[1].pid
    )


@pytest.mark.timeout(90)
def test_scheduler_killed(fresh: Fresh) -> None:
    """Without --death-timeout a worker closes with its scheduler; with it, it waits
    for a scheduler at the same address and serves that one from a clean slate."""
    running = fresh.start(["--nthreads", "1"], ["--nthreads", "1", "--death-timeout", "60"])
    plain, patient = running.workers
    [old] = running.client.scatter([5], workers=[running.addresses[1]])
    old_key = old.key
    running.client.close()
    port = int(fresh.procs.address.rsplit(":", 1)[1])
    os.kill(fresh.procs.scheduler.pid, signal.SIGKILL)
    assert plain.wait(20) == 0, plain.log()
    assert patient.alive(), patient.log()

    fresh.procs.start_scheduler(port=port)
    client = fresh.connect()
    assert worker_address(client, patient) == running.addresses[1]
    new = client.submit(tasks.pid_of, 0, pure=False)
    assert new.result(RESULT_TIMEOUT) == patient.pid
    # What the old scheduler placed here is gone: the new one never heard of it.
    held = client.run(lambda dask_worker: list(dask_worker.state.data))
    assert held == {running.addresses[1]: [new.key]}, (held, old_key)
    assert "reconnecting" in patient.log()


@pytest.mark.timeout(30)
def test_unreachable_scheduler_exits_with_one_clear_line(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens here
    with LocalProcesses(tmp_path) as procs:
        worker = procs.start_worker("--death-timeout", "2", address=address)
        started = time.monotonic()
        rc = worker.wait(20)
        elapsed = time.monotonic() - started
        log = worker.log()
    assert rc != 0, log
    assert elapsed < 15, f"took {elapsed:.1f} s to give up"
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1, log
    assert address in errors[0] and "2 s" in errors[0] and "--death-timeout" in errors[0], errors
    assert "Traceback" not in log, log


def test_workers_under_test_check_their_state_machine(dask_client) -> None:
    # conftest.py sets CLUSTERLAUNCH_VALIDATE_STATE=1 (unless the environment says
    # otherwise) and every worker the tests start must see it.
    wanted = os.environ["CLUSTERLAUNCH_VALIDATE_STATE"] == "1"
    flags = dask_client.run(lambda dask_worker: dask_worker.state.validate_each_event)
    assert flags and set(flags.values()) == {wanted}, flags
