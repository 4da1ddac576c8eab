"""Closing a worker leaves nothing of it running: no asyncio task, no unretrieved task
exception, no thread (but one still inside a user's blocking task, which nothing can
interrupt: it ends when the task returns, or a worker process exits past it).

Our ``Worker`` runs in this process, on an asyncio loop in a thread of its own, against
a real ``dask scheduler`` subprocess; the real ``distributed.Client`` submits work, and
a worker subprocess of ours is the peer of the transfer test. The worker is closed
mid-task, mid-transfer (a peer fetching a large value from it) and mid-heartbeat.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import numpy as np
import pytest
from distributed import Client
from procs import LocalProcesses, Proc, registered, wait_for, worker_address

from clusterlaunch.worker.options import WorkerOptions
from clusterlaunch.worker.worker import Worker

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 30


# ------------------------------------------------------------------ task functions
# Pickled by reference: the worker runs in this process and finds this very module.

TASK_STARTED = threading.Event()
RELEASE_TASK = threading.Event()
TASK_THREAD: list[int] = []


def block_until_released() -> str:
    TASK_THREAD.append(threading.get_ident())
    TASK_STARTED.set()
    RELEASE_TASK.wait(TIMEOUT)
    return "released"


def big_value(nbytes: int) -> np.ndarray:
    return np.ones(nbytes, dtype="u1")


def total(array: np.ndarray) -> int:
    return int(array.sum())


# ------------------------------------------------------------------ the harness


class ThreadOrigins:
    """Which thread started each thread (``Thread.start`` wrapped while a test runs)."""

    def __init__(self) -> None:
        self.started_by: dict[threading.Thread, threading.Thread] = {}

    def descends_from(self, thread: threading.Thread, root: threading.Thread) -> bool:
        parent = self.started_by.get(thread)
        while parent is not None:
            if parent is root:
                return True
            parent = self.started_by.get(parent)
        return False


class InProcessWorker:
    """Our worker on an asyncio loop of its own thread; what closing it left behind."""

    def __init__(self, scheduler: str, origins: ThreadOrigins, name: str) -> None:
        self.origins = origins
        self.options = WorkerOptions(scheduler_address=scheduler, nthreads=2, name=name)
        self.worker: Worker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_errors: list[dict[str, Any]] = []
        self.tasks_left: set[asyncio.Task] | None = None
        self.threads_at_close: list[threading.Thread] | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-worker-loop")
        self.thread.start()
        if not self._started.wait(TIMEOUT):
            raise TimeoutError("the in-process worker did not start")
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self._failure = e
            self._started.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(lambda _, context: self.loop_errors.append(context))
        worker = self.worker = Worker(self.options)
        await worker.start()
        self._started.set()
        await worker.finished()
        await worker.close()  # returns once the closing task itself is done
        self.tasks_left = asyncio.all_tasks() - {asyncio.current_task()}
        # The loop's default executor (its getaddrinfo calls) is the loop's, not the
        # worker's: asyncio.run ends it, and threads_left() checks that afterwards.
        self.threads_at_close = [
            thread for thread in self.threads_left() if not thread.name.startswith("asyncio_")
        ]

    @property
    def address(self) -> str:
        assert self.worker is not None
        return self.worker.address

    def call(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run ``make()`` on the worker's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(TIMEOUT)

    def close(self, reason: str) -> None:
        """Close the worker on its loop; wait for the loop (and its thread) to end."""
        assert self.loop is not None and self.worker is not None
        self.loop.call_soon_threadsafe(self.worker.begin_close, reason)
        self.wait_closed()

    def wait_closed(self) -> None:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the worker's loop did not end"
        gc.collect()  # an unretrieved task exception is reported when its task is freed

    def threads_left(self) -> list[threading.Thread]:
        """The worker's threads still alive: any started from its loop's thread."""
        return [
            thread
            for thread in threading.enumerate()
            if self.origins.descends_from(thread, self.thread)
        ]

    def assert_nothing_left(self, *, but_threads: int = 0) -> list[threading.Thread]:
        """Nothing pending or failed on the loop when close returned, and no thread of
        the worker's alive then or after its loop ended, but ``but_threads``."""
        assert self.tasks_left == set(), self.tasks_left
        assert self.loop_errors == [], self.loop_errors
        threads = self.threads_left()
        assert len(threads) == but_threads, threads
        assert self.threads_at_close == threads, self.threads_at_close
        return threads


@pytest.fixture
def origins(monkeypatch: pytest.MonkeyPatch) -> ThreadOrigins:
    origins = ThreadOrigins()
    start = threading.Thread.start

    def recording_start(self: threading.Thread) -> None:
        origins.started_by[self] = threading.current_thread()
        start(self)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    return origins


@pytest.fixture
def errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """ERROR records from clusterlaunch and asyncio while the test runs."""
    with caplog.at_level(logging.INFO):
        records: list[logging.LogRecord] = []
        yield records
        records.extend(
            r
            for r in caplog.records
            if r.levelno >= logging.ERROR and r.name.split(".")[0] in ("clusterlaunch", "asyncio")
        )
    assert records == [], [r.getMessage() for r in records]


@pytest.fixture(scope="module")
def procs() -> Iterator[LocalProcesses]:
    with LocalProcesses() as procs:
        procs.start_scheduler()
        yield procs


@pytest.fixture(scope="module")
def client(procs: LocalProcesses) -> Iterator[Client]:
    with Client(procs.address, timeout=TIMEOUT, set_as_default=False) as client:
        yield client


def wait_gone(client: Client, address: str) -> None:
    wait_for(lambda: address not in registered(client), TIMEOUT, f"the scheduler to drop {address}")


# ------------------------------------------------------------------ the tests


def test_close_mid_task(procs, client, origins, errors_logged) -> None:
    TASK_STARTED.clear()
    RELEASE_TASK.clear()
    TASK_THREAD.clear()
    ours = InProcessWorker(procs.address, origins, "mid-task")
    try:
        wait_for(lambda: ours.address in registered(client), TIMEOUT, "the worker to register")
        client.submit(block_until_released, workers=[ours.address], pure=False)
        assert TASK_STARTED.wait(TIMEOUT), "the task never started"
        ours.close("test: mid-task")
        # The thread inside the blocking task is the one thing left: of the worker's
        # two task threads the idle one is gone.
        [thread] = ours.assert_nothing_left(but_threads=1)
        assert thread.ident == TASK_THREAD[0]
    finally:
        RELEASE_TASK.set()
    # Its task returned: the thread ends by itself, and reports to no loop.
    thread.join(TIMEOUT)
    assert ours.threads_left() == []
    wait_gone(client, ours.address)


def test_close_mid_transfer(procs, client, origins, errors_logged) -> None:
    """A peer fetches a 64 MB value from our worker; the peer is stopped (SIGSTOP)
    as its request arrives, so the value is still being written when close cuts it."""
    peer = procs.start_worker("--nthreads", "1")
    ours = InProcessWorker(procs.address, origins, "mid-transfer")
    interrupted: list[str] = []
    try:
        peer_address = worker_address(client, peer)
        wait_for(lambda: ours.address in registered(client), TIMEOUT, "the worker to register")
        big = client.submit(big_value, 64 * 2**20, workers=[ours.address], pure=False)
        big.result(TIMEOUT)
        assert ours.worker is not None
        worker = ours.worker
        serve = worker.transfers.get_data

        async def get_data_stopping_the_peer(comm: Any, **msg: Any) -> Any:
            os.kill(peer.pid, signal.SIGSTOP)
            worker.begin_close("test: mid-transfer")
            try:
                return await serve(comm, **msg)
            except BaseException as e:
                interrupted.append(type(e).__name__)
                raise

        async def install() -> None:
            worker.server.handlers["get_data"] = get_data_stopping_the_peer

        ours.call(install)
        client.submit(total, big, workers=[peer_address], pure=False)
        ours.wait_closed()
        ours.assert_nothing_left()
        assert interrupted == ["CancelledError"]
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    wait_gone(client, ours.address)
    assert peer.alive(), peer.log()


def test_close_mid_heartbeat(procs, client, origins, errors_logged) -> None:
    """The scheduler is stopped (SIGSTOP) so that a heartbeat sent to it waits for its
    reply; the worker is closed while it waits."""
    scheduler = procs.scheduler
    assert isinstance(scheduler, Proc)
    ours = InProcessWorker(procs.address, origins, "mid-heartbeat")
    heartbeat_sent = threading.Event()
    try:
        wait_for(lambda: ours.address in registered(client), TIMEOUT, "the worker to register")
        assert ours.worker is not None
        heartbeat = ours.worker.heartbeat
        metrics = heartbeat.metrics

        def metrics_of_a_heartbeat() -> dict[str, Any]:
            heartbeat_sent.set()  # the request is being built: it goes out next
            return metrics()

        os.kill(scheduler.pid, signal.SIGSTOP)
        heartbeat.metrics = metrics_of_a_heartbeat  # type: ignore[method-assign]
        assert heartbeat_sent.wait(TIMEOUT), "no heartbeat was sent"
        ours.close("test: mid-heartbeat")
        ours.assert_nothing_left()
    finally:
        os.kill(scheduler.pid, signal.SIGCONT)
    wait_gone(client, ours.address)
