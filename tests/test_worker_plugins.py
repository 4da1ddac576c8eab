"""Worker plugins on our workers, through the real scheduler and ``distributed.Client``:
``register_plugin`` / ``unregister_worker_plugin``, ``upload_file``, ``PipInstall``,
``forward_logging``, ``register_worker_callbacks``, on a cluster that mixes our
workers with a stock ``dask worker``.

Plugin classes are in ``plugin_classes.py`` (importing it imports distributed), task
functions in ``tasks.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import plugin_classes
import pytest
import tasks
from distributed import Client
from distributed.diagnostics.plugin import PipInstall
from procs import LocalProcesses, wait_for, worker_address

pytestmark = pytest.mark.timeout(90)

RESULT_TIMEOUT = 60


@dataclass
class Mixed:
    """A scheduler, two of our workers and one stock worker, and a client."""

    procs: LocalProcesses
    client: Client
    ours: list[str]
    stock: str

    @property
    def everyone(self) -> list[str]:
        return [*self.ours, self.stock]


@pytest.fixture(scope="module")
def mixed() -> Iterator[Mixed]:
    with LocalProcesses() as procs:
        procs.start_scheduler()
        workers = [
            procs.start_worker("--nthreads", "1"),
            procs.start_worker("--nthreads", "1"),
            procs.start_worker("--nthreads", "1", stock=True),
        ]
        client = Client(procs.address, timeout=30, set_as_default=False)
        try:
            addresses = [worker_address(client, w) for w in workers]
            yield Mixed(procs, client, addresses[:2], addresses[2])
            for proc in workers:
                assert proc.alive(), f"{proc.label} died:\n{procs.logs()}"
        finally:
            client.close()


@pytest.fixture
def client(mixed: Mixed) -> Iterator[Client]:
    """The mixed cluster's client; the test's plugins are unregistered afterwards."""
    yield mixed.client
    for name in (
        plugin_classes.TransitionRecorder.name,
        plugin_classes.AsyncSetup.name,
        plugin_classes.TeardownMarker.name,
        plugin_classes.EnvironmentSetter.name,
    ):
        with contextlib.suppress(ValueError):  # not registered by this test
            mixed.client.unregister_worker_plugin(name)


def test_a_plugin_counts_the_transitions_of_its_worker_as_a_stock_one_does(
    mixed: Mixed, client: Client
) -> None:
    client.register_plugin(plugin_classes.TransitionRecorder())
    setup_with = client.run(tasks.plugin_state, "transition-recorder", "worker_address")
    assert setup_with == {address: address for address in mixed.everyone}

    keys = {}
    for address in mixed.everyone:
        future = client.submit(tasks.inc, 1, workers=[address], key=f"inc-{uuid.uuid4().hex}")
        assert future.result(RESULT_TIMEOUT) == 2
        keys[address] = future.key
        del future

    def forgotten() -> dict | None:
        seen = client.run(tasks.plugin_state, "transition-recorder", "transitions")
        done = all((keys[address], "released", "forgotten") in seen[address] for address in keys)
        return seen if done else None

    seen = wait_for(forgotten, RESULT_TIMEOUT, "every worker forgetting its task")
    expected = [
        ("released", "waiting"),
        ("waiting", "ready"),
        ("ready", "executing"),
        ("executing", "memory"),
        ("memory", "released"),
        ("released", "forgotten"),
    ]
    for address, key in keys.items():
        of_key = [(start, finish) for k, start, finish in seen[address] if k == key]
        assert of_key == expected, (address, seen[address])


def test_a_plugin_sees_the_transitions_of_a_fetched_dependency(
    mixed: Mixed, client: Client
) -> None:
    client.register_plugin(plugin_classes.TransitionRecorder())
    ours, other = mixed.ours
    x = client.submit(tasks.inc, 1, workers=[other], key=f"x-{uuid.uuid4().hex}")
    y = client.submit(tasks.inc, x, workers=[ours], key=f"y-{uuid.uuid4().hex}")
    assert y.result(RESULT_TIMEOUT) == 3
    [seen] = client.run(
        lambda dask_worker: dask_worker.plugins["transition-recorder"].transitions,
        workers=[ours],
    ).values()
    of_x = [(start, finish) for key, start, finish in seen if key == x.key]
    assert of_x[:3] == [("released", "fetch"), ("fetch", "flight"), ("flight", "memory")]


def test_async_setup_is_awaited_before_register_plugin_returns(
    mixed: Mixed, client: Client
) -> None:
    client.register_plugin(plugin_classes.AsyncSetup())
    ready = client.run(lambda dask_worker: dask_worker.plugins["async-setup"].ready)
    assert ready == dict.fromkeys(mixed.everyone, True)


def test_unregister_tears_the_plugin_down(mixed: Mixed, client: Client, tmp_path: Path) -> None:
    client.register_plugin(plugin_classes.TeardownMarker(str(tmp_path)))
    pids = client.run(lambda: __import__("os").getpid(), workers=mixed.ours)
    assert not list(tmp_path.iterdir())
    client.unregister_worker_plugin(plugin_classes.TeardownMarker.name)
    assert {p.name for p in tmp_path.iterdir()} >= {str(pid) for pid in pids.values()}
    names = client.run(lambda dask_worker: sorted(dask_worker.plugins), workers=mixed.ours)
    assert all(plugin_classes.TeardownMarker.name not in n for n in names.values())


def test_a_failing_setup_is_raised_by_the_client(mixed: Mixed, client: Client) -> None:
    with pytest.raises(ValueError, match="this plugin's setup fails on purpose"):
        client.register_plugin(plugin_classes.FailingSetup())
    # The workers run on.
    assert client.submit(tasks.inc, 1, workers=mixed.ours).result(RESULT_TIMEOUT) == 2
    client.unregister_worker_plugin(plugin_classes.FailingSetup.name)


def test_a_plugin_set_up_reaches_the_tasks(mixed: Mixed, client: Client) -> None:
    client.register_plugin(plugin_classes.EnvironmentSetter("CLUSTERLAUNCH_TEST_PLUGIN", "set"))
    for address in mixed.ours:
        future = client.submit(tasks.getenv, "CLUSTERLAUNCH_TEST_PLUGIN", workers=[address])
        assert future.result(RESULT_TIMEOUT) == "set"


def test_register_worker_callbacks(mixed: Mixed, client: Client) -> None:
    def mark(dask_worker) -> None:
        dask_worker.callback_ran = dask_worker.address

    client.register_worker_callbacks(mark)
    # The callback got the worker that tasks get from get_worker().
    for address in mixed.ours:
        future = client.submit(
            tasks.worker_attribute, "callback_ran", workers=[address], pure=False
        )
        assert future.result(RESULT_TIMEOUT) == address


def test_upload_file_of_a_module_then_imported_by_a_task(
    mixed: Mixed, client: Client, tmp_path: Path
) -> None:
    name = f"uploaded_{uuid.uuid4().hex[:8]}"
    module = tmp_path / f"{name}.py"
    module.write_text("def answer(x):\n    return ('first', x)\n")
    client.upload_file(str(module))
    for address in mixed.everyone:
        future = client.submit(
            tasks.import_and_call, name, "answer", 1, workers=[address], pure=False
        )
        assert future.result(RESULT_TIMEOUT) == ("first", 1)
    # Uploaded again, the module is reloaded.
    module.write_text("def answer(x):\n    return ('second', x)\n")
    client.upload_file(str(module))
    for address in mixed.everyone:
        future = client.submit(
            tasks.import_and_call, name, "answer", 2, workers=[address], pure=False
        )
        assert future.result(RESULT_TIMEOUT) == ("second", 2)


def test_upload_file_of_a_zip_without_loading_it(
    mixed: Mixed, client: Client, tmp_path: Path
) -> None:
    name = f"zipped_{uuid.uuid4().hex[:8]}"
    archive = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(f"{name}/__init__.py", "def answer():\n    return 'from the zip'\n")
    client.upload_file(str(archive), load=False)
    loaded = client.run(lambda: name in sys.modules, workers=mixed.ours)
    assert loaded == dict.fromkeys(mixed.ours, False)
    # Not loaded, and not on sys.path either until loaded: dask adds archives on load.
    client.upload_file(str(archive))
    for address in mixed.everyone:
        future = client.submit(tasks.import_and_call, name, "answer", workers=[address], pure=False)
        assert future.result(RESULT_TIMEOUT) == "from the zip"


def test_pip_install_of_a_local_wheel(mixed: Mixed, client: Client, tmp_path: Path) -> None:
    name = f"cltiny{uuid.uuid4().hex[:8]}"
    wheel = _build_wheel(tmp_path, name)
    try:
        client.register_plugin(PipInstall(packages=[str(wheel)], pip_options=["--no-index"]))
        installers = client.run(
            lambda dask_worker: [n for n in dask_worker.plugins if n.startswith("PipInstall")],
            workers=mixed.ours,
        )
        assert all(len(names) == 1 for names in installers.values()), installers
        for address in mixed.ours:
            future = client.submit(
                tasks.import_and_call, name, "answer", workers=[address], pure=False
            )
            assert future.result(RESULT_TIMEOUT) == 42
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", name], check=False)


def test_forward_logging_brings_task_records_to_the_client(
    mixed: Mixed, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    logger_name = f"clusterlaunch-test-{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.WARNING, logger=logger_name)
    client.forward_logging(logger_name)
    try:
        messages = [f"from {address}" for address in mixed.ours]
        futures = [
            client.submit(tasks.log_warning, logger_name, message, workers=[address], pure=False)
            for address, message in zip(mixed.ours, messages)
        ]
        client.gather(futures)

        def arrived() -> bool:
            forwarded = [r for r in caplog.records if r.name == logger_name]
            return {r.getMessage() for r in forwarded} >= set(messages)

        # The client hands each forwarded record to its own logger of that name.
        wait_for(arrived, RESULT_TIMEOUT, "the forwarded records")
    finally:
        client.unforward_logging(logger_name)


def test_a_plugin_registered_before_a_worker_joins_is_set_up_first(
    processes: LocalProcesses,
) -> None:
    with Client(processes.address, timeout=30, set_as_default=False) as client:
        client.register_plugin(plugin_classes.EnvironmentSetter("CLUSTERLAUNCH_EARLY", "early"))
        client.register_plugin(plugin_classes.TransitionRecorder())
        proc = processes.start_worker("--nthreads", "1")
        address = worker_address(client, proc)
        future = client.submit(tasks.getenv, "CLUSTERLAUNCH_EARLY", workers=[address])
        assert future.result(RESULT_TIMEOUT) == "early"
        seen = client.run(
            lambda dask_worker: dask_worker.plugins["transition-recorder"].transitions,
            workers=[address],
        )[address]
        assert (future.key, "ready", "executing") in seen


def _build_wheel(directory: Path, name: str) -> Path:
    """A wheel of a one-module package ``name`` whose ``answer()`` is 42, written by
    hand (a wheel is a zip with its metadata), so nothing is fetched to build it."""
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": "def answer():\n    return 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{info}/RECORD", record)
    return wheel


def test_closing_worker_tears_its_plugins_down(processes: LocalProcesses, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = processes.start_worker("--nthreads", "1")
    with Client(processes.address, timeout=30, set_as_default=False) as client:
        address = worker_address(client, proc)
        client.register_plugin(plugin_classes.TeardownMarker(str(markers)))
        [pid] = client.run(os.getpid, workers=[address]).values()
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert (markers / str(pid)).read_text() == "torn down"
