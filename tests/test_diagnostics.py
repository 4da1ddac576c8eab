"""Diagnostics of our workers through the real ``distributed.Client``: the profiler
(``client.profile``, per key, with start/stop, the event loop's profile,
``performance_report``), ``dump_cluster_state``, ``benchmark_hardware`` and worker logs.

The shared cluster is mixed: a stock scheduler, two of our workers and one stock
``dask worker``, so every op also runs beside dask's own answers to it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tasks
from distributed import Client, performance_report
from distributed.cluster_dump import DumpArtefact
from procs import LocalProcesses, Proc, run_async, wait_for, worker_address

from clusterlaunch.worker.options import WorkerOptions
from clusterlaunch.worker.worker import Worker

pytestmark = pytest.mark.timeout(120)

RESULT_TIMEOUT = 60
#: dask's benchmark sizes: our workers' results must use the same names.
DISK_SIZES = {"1 kiB", "100 kiB", "1 MiB", "10 MiB", "100 MiB"}
MEMORY_SIZES = {"2 kiB", "10 kiB", "100 kiB", "1 MiB", "10 MiB"}
NETWORK_SIZES = {"1 kiB", "10 kiB", "100 kiB", "1 MiB", "10 MiB", "50 MiB"}


@dataclass
class Mixed:
    procs: LocalProcesses
    client: Client
    ours: list[str]
    stock: str
    workers: list[Proc]


@pytest.fixture(scope="module")
def mixed() -> Iterator[Mixed]:
    with LocalProcesses() as procs:
        procs.start_scheduler()
        workers = [
            procs.start_worker("--nthreads", "2"),
            procs.start_worker("--nthreads", "1"),
            procs.start_worker("--nthreads", "1", stock=True),
        ]
        client = Client(procs.address, timeout=30, set_as_default=False)
        try:
            addresses = [worker_address(client, w) for w in workers]
            yield Mixed(procs, client, addresses[:2], addresses[2], workers)
            for proc in workers:
                assert proc.alive(), f"{proc.label} died:\n{procs.logs()}"
        finally:
            client.close()


def names_in(tree: dict) -> set[str]:
    """The function names anywhere in a profile tree."""
    names = {tree["description"]["name"]}
    for child in tree["children"].values():
        names |= names_in(child)
    return names


def check_tree(tree: dict) -> None:
    """dask's tree format: each node counts at least what its children count."""
    assert set(tree) == {"count", "children", "identifier", "description"}
    assert set(tree["description"]) == {"filename", "name", "line_number", "line"}
    assert tree["count"] >= sum(child["count"] for child in tree["children"].values())
    for ident, child in tree["children"].items():
        assert child["identifier"] == ident
        check_tree(child)


# ------------------------------------------------------------------ the profiler


def _nested(depth: int, ready: threading.Event, release: threading.Event) -> None:
    if depth:
        _nested(depth - 1, ready, release)
    else:
        ready.set()
        release.wait(10)


def test_trees_match_dask_profile_trees() -> None:
    """Our sampling and merging give exactly the trees distributed.profile gives."""
    from distributed import profile

    from clusterlaunch.worker import profiler

    ready, release = threading.Event(), threading.Event()
    thread = threading.Thread(target=_nested, args=(5, ready, release))
    thread.start()
    try:
        assert ready.wait(10)
        frame = sys._current_frames()[thread.ident or 0]
        ours, theirs = profiler.create(), profile.create()
        for _ in range(3):
            profiler.add_sample(ours, frame)
            profile.process(frame, None, theirs)
        assert ours == theirs
        other = profiler.create()
        profiler.add_sample(other, sys._current_frames()[threading.get_ident()])
        assert profiler.merge(ours, other) == profile.merge(theirs, other)
        assert profiler.merge() == profile.merge()
        # Omitted files drop the whole sample, as dask's omit does.
        assert not profiler.add_sample(profiler.create(), frame, omit=("threading.py",))
    finally:
        release.set()
        thread.join(10)


def test_profile_settings_read_dask_config() -> None:
    import dask

    from clusterlaunch.worker.profiler import DiagnosticsSettings

    config = {
        "distributed.worker.profile.interval": 20,  # a bare number is milliseconds
        "distributed.worker.profile.cycle": "3s",
        "distributed.admin.log-length": 7,
    }
    with dask.config.set(config):
        settings = DiagnosticsSettings.from_config()
    assert (settings.interval, settings.cycle, settings.log_length) == (0.02, 3, 7)


def test_profile_of_a_busy_task_names_its_function(mixed: Mixed) -> None:
    client, ours = mixed.client, mixed.ours[0]
    before = time.time()
    future = client.submit(tasks.spin_for, 1.5, workers=[ours], pure=False)
    future.result(RESULT_TIMEOUT)
    after = time.time()

    whole = client.profile(workers=[ours])
    check_tree(whole)
    assert whole["count"] > 0
    assert "spin_for" in names_in(whole)
    # Samples start below our worker's own frames, as dask's start below its worker.py.
    assert not any("clusterlaunch" in name for name in _filenames(whole))

    per_key = client.profile(key="spin_for", workers=[ours])
    assert per_key["count"] > 0 and "spin_for" in names_in(per_key)
    assert per_key["count"] <= whole["count"]
    assert client.profile(key="no-such-prefix", workers=[ours])["count"] == 0

    spanned = client.profile(start=before, stop=after, workers=[ours])
    assert "spin_for" in names_in(spanned)
    assert client.profile(start=after + 3600, workers=[ours])["count"] == 0


def _filenames(tree: dict) -> set[str]:
    names = {tree["description"]["filename"]}
    for child in tree["children"].values():
        names |= _filenames(child)
    return names - {""}


def test_profile_merges_ours_and_stock_workers(mixed: Mixed) -> None:
    client = mixed.client
    futures = [
        client.submit(tasks.spin_for, 1.0, workers=[address], pure=False)
        for address in [*mixed.ours, mixed.stock]
    ]
    client.gather(futures)
    merged = client.profile(key="spin_for")
    per_worker = [client.profile(key="spin_for", workers=[a]) for a in [*mixed.ours, mixed.stock]]
    assert all(tree["count"] > 0 for tree in per_worker)
    assert merged["count"] >= max(tree["count"] for tree in per_worker)


def test_server_profile_samples_the_event_loop(mixed: Mixed) -> None:
    client, ours = mixed.client, mixed.ours[0]
    # An async task runs on our worker's event loop: the loop's profile sees it.
    client.submit(tasks.spin_on_loop, 1.0, workers=[ours], pure=False).result(RESULT_TIMEOUT)
    server = client.profile(server=True, workers=[ours])
    check_tree(server)
    assert "spin_on_loop" in names_in(server)


def test_profile_metadata_counts_samples_per_key(mixed: Mixed) -> None:
    client, ours = mixed.client, mixed.ours[1]
    client.submit(tasks.spin_for, 1.0, workers=[ours], pure=False).result(RESULT_TIMEOUT)

    async def metadata(dask_scheduler: Any) -> dict:
        return await dask_scheduler.get_profile_metadata(workers=[ours])

    result = client.run_on_scheduler(metadata)
    assert sum(count for _, count in result["counts"]) > 0
    assert sum(count for _, count in result["keys"]["spin_for"]) > 0


def test_performance_report_has_our_workers_profile(mixed: Mixed, tmp_path: Path) -> None:
    client, ours = mixed.client, mixed.ours[0]
    report = tmp_path / "report.html"
    with client.as_current(), performance_report(filename=str(report)):
        client.submit(tasks.spin_for, 1.0, workers=[ours], pure=False).result(RESULT_TIMEOUT)
    html = report.read_text()
    assert "spin_for" in html


# ------------------------------------------------------------------ state dumps


def test_dump_cluster_state_has_our_workers_states(mixed: Mixed, tmp_path: Path) -> None:
    client = mixed.client
    held = client.submit(tasks.inc, 41, workers=[mixed.ours[0]])
    held.result(RESULT_TIMEOUT)
    client.dump_cluster_state(str(tmp_path / "dump"), format="msgpack")
    dump = DumpArtefact.from_url(str(tmp_path / "dump.msgpack.gz"))
    assert dump.missing_workers() == []
    for address in [*mixed.ours, mixed.stock]:
        state = dump["workers"][address]
        assert isinstance(state, dict), state
        assert state["address"] == address
        assert state["type"] == "Worker"
        assert isinstance(state["logs"], list) and isinstance(state["log"], list)
    ours = dump["workers"][mixed.ours[0]]
    assert ours["tasks"][held.key]["state"] == "memory"
    assert held.key in ours["data"]
    assert held.key in {task["key"] for task in dump.worker_tasks_in_state("memory")}
    assert dump.worker_story(held.key)[held.key]
    # What tools do with a dump: yaml files per worker.
    dump.to_yamls(tmp_path / "yamls")
    assert (tmp_path / "yamls" / ours["id"] / "tasks.yaml").exists()


def test_worker_monitor_info_of_a_mixed_cluster(mixed: Mixed) -> None:
    client = mixed.client

    async def monitor_info(dask_scheduler: Any, recent: bool) -> dict:
        return await dask_scheduler.get_worker_monitor_info(recent=recent)

    def infos(recent: bool = False) -> dict:
        return client.run_on_scheduler(monitor_info, recent=recent)

    wait_for(
        lambda: all(info["count"] >= 2 for info in infos().values()),
        30,
        "two monitor samples of every worker",
    )
    everything = infos()
    assert set(everything) == {*mixed.ours, mixed.stock}
    for address in mixed.ours:
        info = everything[address]
        query = info["range_query"]
        assert {"cpu", "memory", "time", "num_fds"} <= set(query)
        assert len(query["memory"]) == info["count"] and all(m > 0 for m in query["memory"])
    assert infos(recent=True)[mixed.ours[0]]["range_query"]["memory"] > 0


# ------------------------------------------------------------------ benchmarks


def test_benchmark_hardware(mixed: Mixed) -> None:
    client = mixed.client
    result = client.benchmark_hardware()
    assert set(result["disk"]) == DISK_SIZES
    assert set(result["memory"]) == MEMORY_SIZES
    assert all(v > 0 for kind in ("disk", "memory") for v in result[kind].values())


def test_benchmark_ops_of_our_workers(mixed: Mixed) -> None:
    client = mixed.client
    first, second = mixed.ours

    def broadcast(msg: dict, workers: list[str]) -> dict:
        return client.sync(client.scheduler.broadcast, msg=msg, workers=workers)

    memory = broadcast({"op": "benchmark_memory"}, [first])[first]
    assert set(memory) == MEMORY_SIZES and all(v > 0 for v in memory.values())
    # Ours to ours, ours to dask's, and dask's to ours (our echo).
    for source, target in ((first, second), (first, mixed.stock), (mixed.stock, second)):
        network = broadcast({"op": "benchmark_network", "address": target}, [source])[source]
        assert set(network) == NETWORK_SIZES and all(v > 0 for v in network.values())


# ------------------------------------------------------------------ logs


def test_task_logs_show_in_worker_logs(mixed: Mixed) -> None:
    client, ours = mixed.client, mixed.ours[1]
    message = f"mylib says {uuid.uuid4().hex}"
    client.submit(tasks.log_warning, "mylib", message, workers=[ours]).result(RESULT_TIMEOUT)
    logs = client.get_worker_logs(workers=[ours])[ours]
    newest_level, newest = logs[0]
    assert (newest_level, message in newest, "mylib" in newest) == ("WARNING", True, True)
    assert any("registered with" in text for _, text in logs), "our own records are kept too"
    assert list(client.get_worker_logs(n=1, workers=[ours])[ours]) == [logs[0]]
    # Without a handler of its own, the record still reached the worker's stderr.
    proc = mixed.workers[1]
    wait_for(lambda: message in proc.log(), 10, "the warning on the worker's stderr")


def test_log_length_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_DISTRIBUTED__ADMIN__LOG_LENGTH", "3")
    with LocalProcesses() as procs:
        procs.start_scheduler()
        proc = procs.start_worker("--nthreads", "1")
        with Client(procs.address, timeout=30, set_as_default=False) as client:
            address = worker_address(client, proc)
            # The first task loads the config; the worker keeps 3 records from then on.
            client.submit(tasks.inc, 1, workers=[address]).result(RESULT_TIMEOUT)
            for i in range(5):
                client.submit(tasks.log_warning, "mylib", f"record {i}", workers=[address]).result(
                    RESULT_TIMEOUT
                )
            logs = client.get_worker_logs(workers=[address])[address]
            assert [text.rsplit(" ", 1)[-1] for _, text in logs] == ["4", "3", "2"]


# ------------------------------------------------------------------ ownership


def test_profiler_thread_ends_with_the_worker(mixed: Mixed) -> None:
    async def main() -> None:
        worker = Worker(WorkerOptions(scheduler_address=mixed.procs.address, nthreads=1))
        await worker.start()
        try:
            async with Client(
                mixed.procs.address, asynchronous=True, timeout=30, set_as_default=False
            ) as client:
                await client.submit(tasks.spin_for, 0.3, workers=[worker.address], pure=False)
                sampler = worker.profiler.thread
                assert sampler is not None and sampler.is_alive()
                assert worker.profiler.settings is not None, "settings read at the first task"
        finally:
            await worker.close()
        assert not sampler.is_alive()
        assert sampler not in threading.enumerate()

    run_async(main(), timeout=60)


def test_profiler_disabled_by_config(monkeypatch: pytest.MonkeyPatch, mixed: Mixed) -> None:
    import dask

    async def main() -> None:
        worker = Worker(WorkerOptions(scheduler_address=mixed.procs.address, nthreads=1))
        await worker.start()
        try:
            async with Client(
                mixed.procs.address, asynchronous=True, timeout=30, set_as_default=False
            ) as client:
                await client.submit(tasks.spin_for, 0.3, workers=[worker.address], pure=False)
                sampler = worker.profiler.thread
                assert sampler is not None
                await asyncio.to_thread(sampler.join, 10)
                assert not sampler.is_alive(), "a disabled profiler's thread ends"
                tree = await client.profile(workers=[worker.address])
                assert tree["count"] == 0
        finally:
            await worker.close()

    with dask.config.set({"distributed.worker.profile.enabled": False}):
        run_async(main(), timeout=60)
