"""Running tasks: the worker's task threads, coroutine tasks, and what a task's outcome
tells the state machine.

``Execution`` carries out the state machine's ``Execute`` instructions: it reads the
inputs, runs the task in one of the worker's ``TaskThreads`` (or, for an ``async def``
task, as a coroutine owned by the worker), and feeds back ``ExecuteSuccess``,
``ExecuteFailure`` or ``RescheduleRequested``; a failure's fields are
``protocol.remote_errors.error_fields``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from clusterlaunch.protocol import Undecodable, pickling
from clusterlaunch.protocol.remote_errors import error_fields
from clusterlaunch.worker import state as sm
from clusterlaunch.worker.memory import sizeof
from clusterlaunch.worker.profiler import TaskThreadMap

if TYPE_CHECKING:
    from clusterlaunch.worker.worker import Worker

logger = logging.getLogger("clusterlaunch.worker")

#: Seconds ``TaskThreads.close`` waits for its idle threads to end.
IDLE_THREADS_JOIN_TIMEOUT = 1.0

#: What a task reports: value, exception, start and stop time, thread id.
Outcome: TypeAlias = tuple[Any, BaseException | None, float, float, int]


class TaskThreads:
    """``size`` threads that run the calls given to ``submit``, started on first use.

    Ours rather than a ``ThreadPoolExecutor`` because close must tell the idle threads
    from the busy ones: an executor's shutdown joins either every thread (and so waits
    on a task that never returns) or none (and leaves idle threads behind). Here
    ``close`` joins the idle threads; one still running a task finishes it and then
    ends by itself. Nothing in Python can interrupt a blocking task sooner: a worker
    process ends such a thread by exiting (``process.exit_now``), and the threads are
    daemons so that no interpreter's exit waits on one either.
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<TaskThreads {self.name}: {len(self._threads)} started, {len(self._busy)} busy>"

    @property
    def alive(self) -> list[threading.Thread]:
        """The threads started and not yet ended."""
        return [thread for thread in self._threads if thread.is_alive()]

    def submit(self, call: Callable[[], None]) -> None:
        """Run ``call()`` in the next free thread; ``RuntimeError`` once closed."""
        if self._closed:
            raise RuntimeError(f"{self.name} threads are closed")
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
                for i in range(self.size)
            ]
            for thread in self._threads:
                thread.start()
        self._calls.put(call)

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            call = self._calls.get()
            with self._lock:
                if call is None or self._closed:
                    return
                self._busy.add(me)
            try:
                call()
            except BaseException:
                # A task that raised SystemExit and such: the thread stays in the pool.
                logger.exception("%s: a task call raised", me.name)
            finally:
                with self._lock:
                    self._busy.discard(me)

    def close(self, timeout: float = IDLE_THREADS_JOIN_TIMEOUT) -> list[threading.Thread]:
        """Take no more calls (queued ones are dropped), join the idle threads within
        ``timeout`` seconds, and return the threads still running a call."""
        with self._lock:
            self._closed = True
            busy = set(self._busy)
        for _ in self._threads:
            self._calls.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread not in busy:
                # Idle: it takes a None (or a dropped call) and returns at once.
                thread.join(max(0.0, deadline - time.monotonic()))
        return self.alive


class Execution:
    """Runs the tasks the state machine says to run; each outcome becomes an event."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.threads = TaskThreads(worker.nthreads, name=f"task-{worker.id}")
        #: Task thread id -> key of the task it runs (for ``call_stack`` and the profiler).
        self.task_threads = TaskThreadMap()

    def start(self, instruction: sm.Execute) -> None:
        """Carry out ``instruction``; the outcome is fed to the worker when it comes."""
        worker = self.worker
        run_spec: Any = instruction.run_spec
        try:
            if isinstance(run_spec, Undecodable):
                raise _task_decode_error(run_spec.error)
            # Read the inputs now: the next event may release them from data.
            data = {key: worker.state.data[key] for key in run_spec.dependencies}
        except Exception as e:
            worker.handle_events(failure_event(instruction, e, None, None))
            return
        session = worker.session
        if _is_coroutine_task(run_spec):
            self.task_threads.note_task_started()  # wakes the profiler
            worker.background.spawn(
                self._execute_coroutine(instruction, run_spec, data, session),
                name=f"execute {instruction.key!r}",
            )
            return
        loop = asyncio.get_running_loop()
        task_threads = self.task_threads

        def run_and_report() -> None:
            # Straight back to the loop from the task's thread: no asyncio future and
            # no task in between, each of which would cost a turn of the loop.
            outcome = _run_task(run_spec, data, instruction.key, task_threads)
            with contextlib.suppress(RuntimeError):  # the loop closed while it ran
                loop.call_soon_threadsafe(self._execution_done, instruction, session, outcome)

        self.threads.submit(run_and_report)

    async def _execute_coroutine(
        self, instruction: sm.Execute, run_spec: Any, data: dict, session: int
    ) -> None:
        outcome = await _run_coroutine_task(run_spec, data)
        self._execution_done(instruction, session, outcome)

    def _execution_done(self, instruction: sm.Execute, session: int, outcome: Outcome) -> None:
        value, exc, start, stop, thread = outcome
        start, stop = map(self.worker.scheduler_clock.to_scheduler, (start, stop))
        if exc is None:
            event: sm.Event = sm.ExecuteSuccess(
                key=instruction.key,
                run_id=instruction.run_id,
                value=value,
                nbytes=sizeof(value),
                start=start,
                stop=stop,
                thread=thread,
                stimulus_id=f"task-finished-{time.time()}",
            )
        elif _is_reschedule(exc):
            event = sm.RescheduleRequested(
                key=instruction.key,
                run_id=instruction.run_id,
                stimulus_id=f"reschedule-{time.time()}",
            )
        else:
            exc = _task_error(exc)
            logger.warning("%s: task %r failed: %r", self.worker.address, instruction.key, exc)
            event = failure_event(instruction, exc, start, stop, thread)
        self.worker.feed_if_current(session, event)

    def close(self) -> None:
        """End the idle task threads; log the tasks that keep theirs running."""
        for thread in self.threads.close():
            key = self.task_threads.get(thread.ident or 0)
            logger.info(
                "%s: task %r still running in %s; the thread ends when the task returns",
                self.worker.address,
                key,
                thread.name,
            )


# ------------------------------------------------------------------ free functions


#: Why some dask work fails on our workers, and what to do instead.
DASK_WORKER_ONLY = (
    "P2P shuffles, merges and rechunks, get_worker() and worker_client() need dask's own"
    " workers; for shuffles and rechunks use dask.config.set("
    "{'dataframe.shuffle.method': 'tasks', 'array.rechunk.method': 'tasks'})"
)


def _is_reschedule(exc: BaseException) -> bool:
    cls = type(exc)
    return cls.__name__ == "Reschedule" and cls.__module__.startswith("distributed")


def _task_decode_error(error: Exception) -> Exception:
    """Why a task could not be loaded, as its submitter should read it."""
    if isinstance(error, pickling.RefusedImport):
        package = error.module.partition(".")[0]
        return NotImplementedError(
            f"this task needs {error.module}.{error.name}, and clusterlaunch workers do not"
            f" import {package}: {DASK_WORKER_ONLY}"
        )
    return error


def _task_error(exc: BaseException) -> BaseException:
    """What a failed task reports: its own exception, unless the task failed because
    it asked distributed for the worker running it (``get_worker``, which P2P shuffles
    call): then an error saying so, with the traceback that shows where it asked."""
    seen = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        tb = cause.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if (
                frame.f_code.co_name == "get_worker"
                and frame.f_globals.get("__name__") == "distributed.worker"
            ):
                return NotImplementedError(
                    "this task asked distributed for the worker running it, and a"
                    f" clusterlaunch worker is not a distributed.Worker: {DASK_WORKER_ONLY}"
                ).with_traceback(cause.__traceback__)
            tb = tb.tb_next
        cause = cause.__cause__ or cause.__context__
    return exc


def failure_event(
    instruction: sm.Execute,
    exc: BaseException,
    start: float | None,
    stop: float | None,
    thread: int | None = None,
) -> sm.ExecuteFailure:
    return sm.ExecuteFailure(
        key=instruction.key,
        run_id=instruction.run_id,
        **error_fields(exc),
        start=start,
        stop=stop,
        thread=thread,
        stimulus_id=f"task-erred-{time.time()}",
    )


def _run_task(run_spec: Any, data: dict, key: Any, task_threads: dict[int, Any]) -> Outcome:
    """Run a task in a task thread; never raises (but for SystemExit and such).

    While it runs, ``task_threads`` maps this thread to ``key`` (for ``call_stack``).
    """
    thread = threading.get_ident()
    task_threads[thread] = key
    start = time.time()
    try:
        value, exc = run_spec(data), None
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        value, exc = None, e
    finally:
        task_threads.pop(thread, None)
    return value, exc, start, time.time(), thread


def _is_coroutine_task(run_spec: Any) -> bool:
    """Whether ``run_spec`` is a task whose function is ``async def``.

    Not ``Task.is_coro``: that property imports distributed to answer.
    """
    func = getattr(run_spec, "func", None)
    return func is not None and inspect.iscoroutinefunction(func)


async def _run_coroutine_task(run_spec: Any, data: dict) -> Outcome:
    start = time.time()
    try:
        value, exc = await run_spec(data), None
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        value, exc = None, e
    return value, exc, start, time.time(), threading.get_ident()
