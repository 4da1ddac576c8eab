"""Our own ``clusterlaunch.Client`` against a real ``dask scheduler``.

Every test talks to real subprocesses (see ``procs.py``): a stock scheduler with our
workers, stock ``dask worker --no-nanny`` processes, or both. A ``distributed.Client``
on the same scheduler is the oracle for what the scheduler holds (keys, replicas,
clients). Task functions live in ``tasks.py`` so that workers import them by
reference without importing this module.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import types
from collections.abc import Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import distributed
import numpy as np
import pandas as pd
import pytest
import tasks
from dask._task_spec import TaskRef
from procs import (
    LocalProcesses,
    Proc,
    free_port,
    registered,
    subprocess_env,
    wait_for,
    worker_address,
)

import clusterlaunch
from clusterlaunch.client import Client, Future

RESULT_TIMEOUT = 60
RELEASE_TIMEOUT = 20


@dataclass
class Cluster:
    """A scheduler with some worker processes, and where each worker registered."""

    procs: LocalProcesses
    workers: list[Proc]
    addresses: dict[str, str]  # label -> address

    @property
    def address(self) -> str:
        return self.procs.address

    def address_of(self, proc: Proc) -> str:
        return self.addresses[proc.label]


def _start(procs: LocalProcesses, *specs: tuple[bool, tuple[str, ...]]) -> Cluster:
    """Start one worker per ``(stock, args)`` and wait until all registered."""
    workers = [procs.start_worker("--nthreads", "2", *args, stock=stock) for stock, args in specs]
    with Client(procs.address) as client:
        addresses = {w.label: worker_address(client, w) for w in workers}
    return Cluster(procs, workers, addresses)


OURS = (False, ())
STOCK = (True, ())


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Scheduler + 2 of our workers x 2 threads; the first has GPU=1."""
    with LocalProcesses() as procs:
        procs.start_scheduler()
        running = _start(procs, (False, ("--resources", "GPU=1")), OURS)
        yield running
        for proc in running.workers:
            assert proc.alive(), f"{proc.label} died:\n{procs.logs()}"


@pytest.fixture(scope="module")
def oracle(cluster: Cluster) -> Iterator[distributed.Client]:
    """A ``distributed.Client`` on the same scheduler, to look at the scheduler's state."""
    with distributed.Client(cluster.address, timeout=30, set_as_default=False) as dask_client:
        yield dask_client


@pytest.fixture
def client(cluster: Cluster) -> Iterator[Client]:
    with Client(cluster.address, timeout=30) as ours:
        yield ours


def scheduler_keys(oracle: distributed.Client, keys: Any) -> dict:
    """``{key: state}`` of those ``keys`` the scheduler still knows."""
    keys = list(keys)
    return oracle.run_on_scheduler(
        lambda dask_scheduler: {
            k: dask_scheduler.tasks[k].state for k in keys if k in dask_scheduler.tasks
        }
    )


def who_has(oracle: distributed.Client, key: Any) -> set[str]:
    return set(
        oracle.run_on_scheduler(
            lambda dask_scheduler: [ws.address for ws in dask_scheduler.tasks[key].who_has or ()]
        )
    )


def scheduler_clients(oracle: distributed.Client) -> set[str]:
    return set(oracle.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.clients)))


def wait_released(oracle: distributed.Client, keys: Any, what: str = "release") -> None:
    keys = list(keys)
    wait_for(
        lambda: not scheduler_keys(oracle, keys),
        RELEASE_TIMEOUT,
        f"the scheduler to {what} {keys[:3]}",
        interval=0.05,
    )


def round_trip(client: Client) -> None:
    """Everything this client sent before now has reached the scheduler: the stream is
    ordered, and a task's result comes back only after its update-graph was handled."""
    assert client.submit(tasks.inc, 0, pure=False).result(RESULT_TIMEOUT) == 1


# ---------------------------------------------------------------------- futures


def test_submit_returns_a_future_with_the_result(client: Client) -> None:
    future = client.submit(tasks.inc, 1)
    assert isinstance(future, Future)
    assert isinstance(future, TaskRef)  # so dask treats it as a dependency
    assert future.result(RESULT_TIMEOUT) == 2
    assert future.done() and not future.cancelled()
    assert future.status == "finished"
    assert future.exception() is None and future.traceback() is None
    assert future.key.startswith("inc-")
    assert repr(future) == f"<Future: finished, key: {future.key!r}>"


def test_args_kwargs_and_futures_as_dependencies(client: Client) -> None:
    a = client.submit(tasks.inc, 10)
    b = client.submit(tasks.add, a, 5, extra=100)  # future as a positional argument
    c = client.submit(tasks.total, [a, b, 1], scale=2)  # futures nested in a list
    d = client.submit(tasks.add, 1, extra=c)  # future as a keyword argument
    assert b.result(RESULT_TIMEOUT) == 11 + 5 + 100
    assert c.result(RESULT_TIMEOUT) == (11 + 116 + 1) * 2
    assert d.result(RESULT_TIMEOUT) == 1 + 256


def test_identical_pure_calls_run_once(client: Client, tmp_path: Path) -> None:
    counter = str(tmp_path / "calls")
    first = client.submit(tasks.count_call, counter, "same")
    second = client.submit(tasks.count_call, counter, "same")
    assert first.key == second.key
    assert first.result(RESULT_TIMEOUT) == second.result(RESULT_TIMEOUT) == "same"
    third = client.submit(tasks.count_call, counter, "same")  # after it finished
    assert third.key == first.key and third.done()
    mapped = client.map(tasks.count_call, [counter] * 3, ["same", "m1", "m1"])
    assert mapped[0].key == first.key and mapped[1].key == mapped[2].key
    assert client.gather(mapped) == ["same", "m1", "m1"]
    again = client.map(tasks.count_call, [counter] * 2, ["m1", "m2"])
    assert client.gather(again) == ["m1", "m2"]
    assert sorted(tasks.calls(counter)) == ["'m1'", "'m2'", "'same'"]


def test_keys_are_deterministic_tokens(client: Client) -> None:
    keys = {client.submit(tasks.add, 1, 2, extra=3).key for _ in range(3)}
    assert len(keys) == 1
    other = client.submit(tasks.add, 1, 2, extra=4)
    assert other.key not in keys
    named = client.submit(tasks.inc, 1, key="my-own-key")
    assert named.key == "my-own-key" and named.result(RESULT_TIMEOUT) == 2


def test_impure_calls_run_every_time(client: Client, tmp_path: Path) -> None:
    counter = str(tmp_path / "calls")
    futures = [client.submit(tasks.count_call, counter, 1, pure=False) for _ in range(3)]
    assert len({f.key for f in futures}) == 3
    mapped = client.map(tasks.count_call, [counter] * 2, [2, 2], pure=False)
    assert len({f.key for f in mapped}) == 2
    assert client.gather(futures + mapped) == [1, 1, 1, 2, 2]
    assert sorted(tasks.calls(counter)) == ["1", "1", "1", "2", "2"]


def test_map_and_gather_nested(client: Client) -> None:
    futures = client.map(tasks.add, range(20), range(20), extra=1)
    assert client.gather(futures) == [2 * i + 1 for i in range(20)]
    prefixed = client.map(tasks.inc, [1, 2], key="stage")
    assert all(f.key.startswith("stage-") for f in prefixed)
    listed = client.map(tasks.inc, [1, 2], key=["k-one", "k-two"])
    assert [f.key for f in listed] == ["k-one", "k-two"]
    nested = {"a": futures[0], "b": [futures[1], (listed[0], 7)], "c": "plain"}
    assert client.gather(nested) == {"a": 1, "b": [3, (2, 7)], "c": "plain"}
    assert client.gather(listed[1]) == 3
    assert client.map(tasks.inc, []) == []


def test_remote_errors_keep_type_and_traceback(client: Client, tmp_path: Path) -> None:
    future = client.submit(tasks.fail, 7)
    with pytest.raises(tasks.TaskError, match="failed on purpose with code 7") as info:
        future.result(RESULT_TIMEOUT)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-2:] == ["fail", "inner_frame"]  # the remote frames, innermost last
    assert future.status == "error" and future.done()
    error = future.exception()
    assert type(error) is tasks.TaskError and error.code == 7
    assert [f.name for f in traceback.extract_tb(future.traceback())][-1] == "inner_frame"
    # A dependent errs with the same exception, and so does gather.
    dependent = client.submit(tasks.inc, future)
    with pytest.raises(tasks.TaskError):
        dependent.result(RESULT_TIMEOUT)
    with pytest.raises(tasks.TaskError):
        client.gather([client.submit(tasks.inc, 1), future])
    # gather raises the first error without waiting for the rest.
    release = tmp_path / "release"
    blocked = client.submit(tasks.block, str(release), timeout=30, pure=False)
    with pytest.raises(tasks.TaskError):
        client.gather([blocked, client.submit(tasks.fail, 8)], timeout=RESULT_TIMEOUT)
    assert not blocked.done()
    with pytest.raises(TimeoutError, match="no result for 2 futures within 0.2 s"):
        client.gather([blocked, client.submit(tasks.inc, 3)], timeout=0.2)
    assert client.gather([]) == []
    client.cancel([blocked])
    release.touch()  # frees the worker thread


def test_retries(client: Client, tmp_path: Path) -> None:
    flaky = client.submit(tasks.flaky, str(tmp_path / "a"), 2, retries=2)
    assert flaky.result(RESULT_TIMEOUT) == 3
    failing = client.submit(tasks.flaky, str(tmp_path / "b"), 2)
    with pytest.raises(RuntimeError, match="call 1 of 2"):
        failing.result(RESULT_TIMEOUT)


def test_result_timeout(client: Client, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    future = client.submit(tasks.block, str(flag), value="late")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="not done within 0.2"):
        future.result(timeout=0.2)
    assert time.monotonic() - start < 5
    with pytest.raises(TimeoutError):
        future.exception(timeout=0.05)
    assert not future.done()
    flag.touch()
    assert future.result(RESULT_TIMEOUT) == "late"


def test_done_callbacks(client: Client, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    future = client.submit(tasks.block, str(flag), value=1)
    seen: list[Any] = []
    called = threading.Event()

    def callback(f: Future) -> None:
        # A callback may wait on the client: it runs in a thread of its own.
        seen.append((f, f.status, f.result(RESULT_TIMEOUT), threading.current_thread().name))
        called.set()

    future.add_done_callback(callback)
    assert not called.wait(0.1)
    flag.touch()
    assert called.wait(RESULT_TIMEOUT)
    assert seen[0][:3] == (future, "finished", 1)
    assert seen[0][3] != threading.current_thread().name
    # Added once done: called all the same.
    again = threading.Event()
    future.add_done_callback(lambda f: again.set())
    assert again.wait(RESULT_TIMEOUT)
    erred = client.submit(tasks.fail, 1)
    errors: list[BaseException | None] = []
    done = threading.Event()
    erred.add_done_callback(lambda f: (errors.append(f.exception()), done.set()))
    assert done.wait(RESULT_TIMEOUT) and isinstance(errors[0], tasks.TaskError)
    # A callback that raises is logged; later ones still run, and the client still works.
    future.add_done_callback(lambda f: 1 / 0)
    last = threading.Event()
    future.add_done_callback(lambda f: last.set())
    assert last.wait(RESULT_TIMEOUT)
    assert client.submit(tasks.inc, 1).result(RESULT_TIMEOUT) == 2


def test_as_completed_yields_in_finishing_order(client: Client, tmp_path: Path) -> None:
    flags = {name: tmp_path / name for name in "abc"}
    futures = {
        name: client.submit(tasks.block, str(flag), value=name) for name, flag in flags.items()
    }
    erred = client.submit(tasks.fail, 3)
    assert erred.exception(RESULT_TIMEOUT) is not None
    order = client.as_completed([*futures.values(), erred], timeout=RESULT_TIMEOUT)
    assert next(order) is erred
    for name in "cab":
        flags[name].touch()
        assert next(order) is futures[name]
    assert list(order) == []
    pending = client.submit(tasks.block, str(tmp_path / "later"), value="late", pure=False)
    with pytest.raises(TimeoutError):
        next(client.as_completed([pending], timeout=0.2))
    (tmp_path / "later").touch()
    assert pending.result(RESULT_TIMEOUT) == "late"


def test_cancel_stops_releases_and_allows_resubmit(
    client: Client, oracle: distributed.Client, tmp_path: Path
) -> None:
    flag, started = tmp_path / "go", str(tmp_path / "started")
    future = client.submit(tasks.block, str(flag), started=started, value="v")
    waiting = client.submit(tasks.inc, future)  # depends on it: cancelled with it
    wait_for(lambda: tasks.calls(started), RESULT_TIMEOUT, "the task to start")
    client.cancel([future])
    assert future.cancelled() and future.done() and future.status == "cancelled"
    with pytest.raises(CancelledError):
        future.result(1)
    with pytest.raises(CancelledError):
        client.gather([future])
    wait_released(oracle, [future.key, waiting.key], "forget the cancelled keys")
    wait_for(waiting.cancelled, RELEASE_TIMEOUT, "the scheduler to cancel the dependent")
    # The same pure call again is computed anew, not handed the cancelled future.
    again = client.submit(tasks.block, str(flag), started=started, value="v")
    assert again.key == future.key and not again.cancelled()
    flag.touch()
    assert again.result(RESULT_TIMEOUT) == "v"
    # Future.cancel
    other = client.submit(tasks.inc, 41)
    assert other.result(RESULT_TIMEOUT) == 42
    other.cancel()
    assert other.cancelled()
    wait_released(oracle, [other.key])


# ---------------------------------------------------------------- key lifetime


def test_key_released_when_last_future_dropped(client: Client, oracle: distributed.Client) -> None:
    first = client.submit(tasks.inc, 1000)
    second = client.submit(tasks.inc, 1000)
    key = first.key
    assert first.result(RESULT_TIMEOUT) == 1001
    assert scheduler_keys(oracle, [key]) == {key: "memory"}
    del first
    gc.collect()
    round_trip(client)
    assert scheduler_keys(oracle, [key]) == {key: "memory"}, "released while still held"
    del second
    gc.collect()
    wait_released(oracle, [key])
    mapped = client.map(tasks.inc, range(50))
    keys = [f.key for f in mapped]
    client.gather(mapped)
    del mapped
    gc.collect()
    wait_released(oracle, keys)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_releases_keys_and_unregisters(cluster: Cluster, oracle: distributed.Client) -> None:
    threads, fds = set(threading.enumerate()), _open_fds()
    with Client(cluster.address) as ours:
        assert ours.id in scheduler_clients(oracle)
        future = ours.submit(tasks.inc, 2000)
        assert future.result(RESULT_TIMEOUT) == 2001
        called = threading.Event()
        future.add_done_callback(lambda f: called.set())  # starts the callback thread
        assert called.wait(RESULT_TIMEOUT)
    assert ours.status == "closed"
    wait_for(lambda: ours.id not in scheduler_clients(oracle), RELEASE_TIMEOUT, "unregister")
    wait_released(oracle, [future.key])
    with pytest.raises(OSError, match="closed"):
        ours.submit(tasks.inc, 1)
    with pytest.raises(OSError, match="closed"):
        ours.scheduler_info()
    ours.close()  # again: nothing happens
    del future  # after close: no message, no error
    assert set(threading.enumerate()) <= threads, "close left a thread running"
    assert _open_fds() <= fds, "close left a file descriptor open"


# ------------------------------------------------------------------- scatter


def test_scatter(client: Client, cluster: Cluster, oracle: distributed.Client) -> None:
    single = client.scatter(41)
    assert single.done() and single.key.startswith("int-")
    assert client.scatter(41).key == single.key  # hashed: deterministic
    assert client.scatter(41, hash=False).key != single.key
    assert client.submit(tasks.inc, single).result(RESULT_TIMEOUT) == 42
    many = client.scatter([1, 2, 3])
    assert isinstance(many, list) and client.gather(many) == [1, 2, 3]
    assert client.submit(tasks.add, *many).result(RESULT_TIMEOUT) == 6
    assert isinstance(client.scatter((1, 2)), tuple)
    named = client.scatter({"x-scattered": np.arange(5), "y-scattered": "text"})
    assert set(named) == {"x-scattered", "y-scattered"}
    assert named["x-scattered"].result(RESULT_TIMEOUT).tolist() == [0, 1, 2, 3, 4]
    # Placement: on the named worker, or on every worker with broadcast.
    first, second = (cluster.address_of(w) for w in cluster.workers)
    placed = client.scatter("only-on-second", workers=[second])
    assert who_has(oracle, placed.key) == {second}
    everywhere = client.scatter(np.ones(100), broadcast=True)
    key = everywhere.key
    wait_for(
        lambda: who_has(oracle, key) == {first, second}, RESULT_TIMEOUT, "a replica on each worker"
    )
    del everywhere
    gc.collect()
    wait_released(oracle, [key])


# ---------------------------------------------------------------- placement


def test_workers_and_resources_restrictions(client: Client, cluster: Cluster) -> None:
    gpu, plain = cluster.workers
    on_plain = client.map(tasks.pid_of, range(6), workers=[cluster.address_of(plain)])
    assert set(client.gather(on_plain)) == {plain.pid}
    # Other arguments: the same pure calls would be the keys already computed above.
    on_gpu = client.map(tasks.pid_of, range(10, 16), resources={"GPU": 1})
    assert set(client.gather(on_gpu)) == {gpu.pid}
    one = client.submit(tasks.pid_of, "x", workers=cluster.address_of(gpu))
    assert one.result(RESULT_TIMEOUT) == gpu.pid


# ------------------------------------------------------------------ collections


def test_dask_collections_through_client_get(client: Client) -> None:
    x = da.arange(10_000, chunks=1_000)
    assert dask.compute(x.sum(), scheduler=client.get) == (x.sum().compute(scheduler="sync"),)
    m = da.arange(10_000, chunks=10_000).reshape(100, 100).rechunk(25)
    y = (m @ m.T).mean()
    assert y.compute(scheduler=client.get) == y.compute(scheduler="sync")
    bag = db.from_sequence(range(100), npartitions=7).map(tasks.inc).filter(lambda v: v % 2)
    assert bag.sum().compute(scheduler=client.get) == sum(v for v in range(1, 101) if v % 2)
    frame = pd.DataFrame({"g": np.arange(1000) % 7, "v": np.arange(1000.0)})
    ddf = dd.from_pandas(frame, npartitions=4)
    got = ddf.groupby("g").v.sum().compute(scheduler=client.get)
    pd.testing.assert_series_equal(got.sort_index(), frame.groupby("g").v.sum())
    delayed = [dask.delayed(tasks.inc)(i) for i in range(5)]
    total = dask.delayed(sum)(delayed)
    assert dask.compute(total, delayed[0], scheduler=client.get) == (15, 1)
    assert dask.compute(total, scheduler=client) == (15,)  # the client itself works too
    with pytest.raises(tasks.TaskError):
        dask.delayed(tasks.fail)(1).compute(scheduler=client.get)


def test_get_on_a_plain_graph(client: Client) -> None:
    graph = {"a": 1, "b": (tasks.inc, "a"), "c": (tasks.add, "a", "b"), ("t", 0): (tasks.inc, "c")}
    assert client.get(graph, "c") == 3
    assert client.get(graph, ["b", ["c", ("t", 0)]]) == [2, [3, 4]]


def test_futures_inside_dask_collections_are_dependencies(client: Client) -> None:
    future = client.submit(tasks.inc, 40)
    assert dask.delayed(tasks.inc)(future).compute(scheduler=client.get) == 42
    total = dask.delayed(tasks.total)([future, dask.delayed(tasks.inc)(future)], scale=1)
    assert dask.compute(total, scheduler=client.get) == (41 + 42,)


# ------------------------------------------------------------ sharing the scheduler


def test_coexists_with_a_distributed_client(client: Client, oracle: distributed.Client) -> None:
    ours = client.submit(tasks.inc, 5000, key="wanted-by-both")
    theirs = oracle.submit(tasks.inc, 5000, key="wanted-by-both")  # one task, two clients
    assert ours.result(RESULT_TIMEOUT) == theirs.result(RESULT_TIMEOUT) == 5001
    own = client.submit(tasks.add, 1, 2, extra=3, pure=False)
    their_own = oracle.submit(tasks.add, 1, 2, extra=4, pure=False)
    assert (own.result(RESULT_TIMEOUT), their_own.result(RESULT_TIMEOUT)) == (6, 7)
    # Our dropped future leaves their key alone, and theirs ours.
    key = ours.key
    del ours
    gc.collect()
    round_trip(client)
    assert scheduler_keys(oracle, [key]) == {key: "memory"}
    assert theirs.result(RESULT_TIMEOUT) == 5001
    their_key = their_own.key
    del their_own
    wait_released(oracle, [their_key])
    assert own.result(RESULT_TIMEOUT) == 6
    # A key they scattered is a dependency our tasks can use (a distributed Future is
    # a TaskRef, like ours).
    scattered = oracle.scatter(np.arange(10))
    assert client.submit(tasks.total, scattered).result(RESULT_TIMEOUT) == 45
    assert client.submit(tasks.total, TaskRef(scattered.key)).result(RESULT_TIMEOUT) == 45
    # And theirs can use ours.
    mine = client.scatter(np.arange(4))
    assert oracle.submit(tasks.total, TaskRef(mine.key)).result(RESULT_TIMEOUT) == 6


# -------------------------------------------------------------- construction


def test_client_from_a_cluster_object_and_env(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(types.SimpleNamespace(scheduler_address=cluster.address)) as ours:
        assert ours.scheduler_address == cluster.address
        assert ours.submit(tasks.inc, 1).result(RESULT_TIMEOUT) == 2
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.address)
    with clusterlaunch.Client() as ours:
        assert ours.status == "running"
        assert ours.scheduler_info()["address"] == cluster.address
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS")
    with pytest.raises(ValueError, match="DASK_SCHEDULER_ADDRESS"):
        Client()


def test_client_on_a_local_cluster() -> None:
    with clusterlaunch.LocalCluster(n=1, nthreads=1) as local, clusterlaunch.Client(local) as ours:
        assert ours.scheduler_address == local.scheduler_address
        assert ours.submit(sum, [1, 2, 3]).result(RESULT_TIMEOUT) == 6


def test_bad_input_gets_a_one_line_error(client: Client) -> None:
    for bad in ["foo", "tcp://", "inproc://x", "tcp://127.0.0.1:99999", 12]:
        with pytest.raises(ValueError, match="invalid address") as info:
            Client(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="callable"):
        client.submit(42)
    with pytest.raises(TypeError, match="callable"):
        client.map("not a function", [1])


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "clusterlaunch-client"]


def test_unreachable_scheduler_is_an_oserror_within_the_timeout() -> None:
    before = len(_client_threads())
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(OSError, match=address) as info:
        Client(address, timeout=1)
    assert time.monotonic() - start < 5
    assert "\n" not in str(info.value)
    # Something listens but never answers the handshake.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(OSError, match=address):
            Client(address, timeout=1)
        assert time.monotonic() - start < 5
    assert len(_client_threads()) == before, "a failed Client left its loop thread running"


def test_never_imports_distributed(cluster: Cluster) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        import clusterlaunch
        import dask
        import tasks
        client = clusterlaunch.Client({cluster.address!r})
        assert client.submit(tasks.inc, 1).result(60) == 2
        assert client.gather(client.map(tasks.inc, [1, 2])) == [2, 3]
        assert client.gather(client.scatter([5])) == [5]
        assert dask.compute(dask.delayed(tasks.inc)(2), scheduler=client.get) == (3,)
        client.close()
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
                                ("distributed", "tornado"))))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=RESULT_TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_import_is_lean_and_future_is_built_on_first_use() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        import clusterlaunch.client
        from clusterlaunch import Client
        lean = "dask" not in sys.modules
        import clusterlaunch
        from dask._task_spec import TaskRef
        from clusterlaunch.client import Future
        print(json.dumps([
            lean,
            clusterlaunch.client.Future is clusterlaunch.Future is Future,
            issubclass(Future, TaskRef),
        ]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=RESULT_TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, True, True]


# --------------------------------------------------- stock and mixed workers


@pytest.fixture(scope="module", params=["stock", "mixed"])
def other_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Scheduler + one stock worker (``stock``), or + one of ours and one stock (``mixed``)."""
    with LocalProcesses() as procs:
        procs.start_scheduler()
        specs = [STOCK] if request.param == "stock" else [OURS, STOCK]
        yield _start(procs, *specs)


def test_workload_on_stock_and_mixed_workers(other_cluster: Cluster, tmp_path: Path) -> None:
    counter = str(tmp_path / "calls")
    with Client(other_cluster.address) as client:
        first = client.submit(tasks.count_call, counter, 1)
        assert client.submit(tasks.count_call, counter, 1).result(RESULT_TIMEOUT) == 1
        assert first.result(RESULT_TIMEOUT) == 1 and tasks.calls(counter) == ["1"]
        assert client.gather(client.map(tasks.inc, range(50))) == list(range(1, 51))
        with pytest.raises(tasks.TaskError) as info:
            client.submit(tasks.fail, 2).result(RESULT_TIMEOUT)
        assert [f.name for f in traceback.extract_tb(info.value.__traceback__)][-1] == "inner_frame"
        x = da.arange(4000, chunks=500)
        assert (x * 2).sum().compute(scheduler=client.get) == 2 * sum(range(4000))
        scattered = client.scatter(np.arange(1000), broadcast=True)
        assert client.submit(tasks.total, scattered).result(RESULT_TIMEOUT) == sum(range(1000))
        # Data moves between every pair of workers, whatever their kind.
        workers = [other_cluster.address_of(w) for w in other_cluster.workers]
        parts = [client.submit(np.arange, 10 * (i + 1), workers=[w]) for i, w in enumerate(workers)]
        pids = {
            client.submit(tasks.pid_of, *parts, workers=[w], pure=False).result(RESULT_TIMEOUT)
            for w in workers
        }
        assert pids == {w.pid for w in other_cluster.workers}
        sums = [client.submit(tasks.total, p, workers=[w]) for p in parts for w in workers]
        assert client.gather(sums) == [
            sum(range(10 * (i + 1))) for i in range(len(parts)) for _ in workers
        ]


def test_shutdown_retires_every_worker_and_closes(processes: LocalProcesses) -> None:
    running = _start(processes, OURS, STOCK)
    client = Client(running.address)
    # Held data: with every worker leaving, it has nowhere to go.
    held = client.map(tasks.inc, range(10))
    assert client.gather(held) == list(range(1, 11))
    client.shutdown()
    assert client.status == "closed"
    for proc in running.workers:
        proc.wait(30)
    assert processes.scheduler.alive()
    with Client(running.address) as check:
        assert registered(check) == {}


def test_losing_the_scheduler_fails_futures_instead_of_hanging(
    processes: LocalProcesses, tmp_path: Path
) -> None:
    _start(processes, OURS)
    client = Client(processes.address)
    try:
        pending = client.submit(tasks.block, str(tmp_path / "never"), timeout=30)
        processes.scheduler.kill()
        start = time.monotonic()
        with pytest.raises(CancelledError, match="connection was lost"):
            pending.result(RESULT_TIMEOUT)
        assert time.monotonic() - start < 10
        assert client.status == "disconnected"
        with pytest.raises(OSError, match="disconnected"):
            client.submit(tasks.inc, 1)
    finally:
        client.close()
    assert client.status == "closed"
