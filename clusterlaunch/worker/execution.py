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

from clusterlaunch.protocol import Undecodable
from clusterlaunch.protocol.remote_errors import error_fields
from clusterlaunch.worker import state as sm
from clusterlaunch.worker.memory import sizeof
from clusterlaunch.worker.profiler import TaskThreadMap

if TYPE_CHECKING:
    from clusterlaunch.worker.surface import DaskWorker
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
        #: Threads whose task seceded: each ends when its task returns, unless it rejoins.
        self._seceded: set[threading.Thread] = set()
        #: Seceded threads waiting to take the slot of the next pool thread to come free.
        self._rejoining: list[tuple[threading.Thread, threading.Event]] = []
        self._started = 0
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<TaskThreads {self.name}: {len(self._threads)} started, {len(self._busy)} busy>"

    @property
    def alive(self) -> list[threading.Thread]:
        """The threads started and not yet ended (seceded ones included)."""
        with self._lock:
            threads = [*self._threads, *self._seceded]
        return [thread for thread in threads if thread.is_alive()]

    def submit(self, call: Callable[[], None]) -> None:
        """Run ``call()`` in the next free thread; ``RuntimeError`` once closed."""
        if self._closed:
            raise RuntimeError(f"{self.name} threads are closed")
        if not self._started:
            with self._lock:
                for _ in range(self.size - len(self._threads)):
                    self._start_thread()
        self._calls.put(call)

    def _start_thread(self) -> None:
        """Start one more pool thread (with the lock held)."""
        thread = threading.Thread(
            target=self._work, name=f"{self.name}-{self._started}", daemon=True
        )
        self._started += 1
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                if self._rejoining and me in self._threads:
                    # Hand this slot to a seceded thread that asked for one back.
                    thread, rejoined = self._rejoining.pop(0)
                    self._threads.remove(me)
                    self._threads.append(thread)
                    rejoined.set()
                    return
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
                    seceded = me in self._seceded
                    self._seceded.discard(me)
            if seceded:
                return

    def secede(self, thread: threading.Thread) -> None:
        """``thread``, running a task, leaves the pool (``distributed.secede``): a new
        thread takes its place, and ``thread`` ends when its task returns."""
        with self._lock:
            if thread not in self._threads:
                raise KeyError(f"{thread.name} is not one of the {self.name} threads")
            self._threads.remove(thread)
            self._seceded.add(thread)
            if not self._closed:
                self._start_thread()

    def rejoin(self, thread: threading.Thread, rejoined: threading.Event) -> None:
        """``thread`` (seceded) asks for a slot back (``distributed.rejoin``): the next
        pool thread to come free leaves and sets ``rejoined``."""
        with self._lock:
            if thread not in self._seceded:
                raise KeyError(f"{thread.name} has not seceded from the {self.name} threads")
            self._seceded.discard(thread)
            self._rejoining.append((thread, rejoined))
            if self._closed:
                self._rejoining.remove((thread, rejoined))
                self._threads.append(thread)
                rejoined.set()

    def wake(self) -> None:
        """Wake an idle thread, so that it sees a thread waiting to rejoin."""
        self._calls.put(_nothing)

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


def _nothing() -> None:
    """What ``wake`` gives an idle thread to run."""


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
                raise run_spec.error
            # Read the inputs now: the next event may release them from data.
            if worker.state.actors:
                data = worker.actor_host.task_inputs(run_spec.dependencies)
            else:
                data = {key: worker.state.data[key] for key in run_spec.dependencies}
        except Exception as e:
            worker.handle_events(failure_event(instruction, e, None, None))
            return
        session = worker.session
        task_context = worker.dask_surface()
        if _is_coroutine_task(run_spec):
            self.task_threads.note_task_started()  # wakes the profiler
            worker.background.spawn(
                self._execute_coroutine(instruction, run_spec, data, session, task_context),
                name=f"execute {instruction.key!r}",
            )
            return
        loop = asyncio.get_running_loop()
        task_threads = self.task_threads

        def run_and_report() -> None:
            # Straight back to the loop from the task's thread: no asyncio future and
            # no task in between, each of which would cost a turn of the loop.
            outcome = _run_task(run_spec, data, instruction.key, task_threads, task_context)
            with contextlib.suppress(RuntimeError):  # the loop closed while it ran
                loop.call_soon_threadsafe(self._execution_done, instruction, session, outcome)

        self.threads.submit(run_and_report)

    async def _execute_coroutine(
        self,
        instruction: sm.Execute,
        run_spec: Any,
        data: dict,
        session: int,
        task_context: DaskWorker,
    ) -> None:
        outcome = await _run_coroutine_task(run_spec, data, task_context)
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


#: Why P2P shuffles fail on our workers, and what to do instead.
P2P_UNSUPPORTED = (
    "P2P shuffles, merges and rechunks run only on dask's own workers so far; on clusterlaunch"
    " workers use dask.config.set({'dataframe.shuffle.method': 'tasks',"
    " 'array.rechunk.method': 'tasks'})"
)


def _is_reschedule(exc: BaseException) -> bool:
    cls = type(exc)
    return cls.__name__ == "Reschedule" and cls.__module__.startswith("distributed")


def _task_error(exc: BaseException) -> BaseException:
    """What a failed task reports: its own exception, unless it failed because it asked
    distributed for the worker's P2P shuffle plugin: then an error saying so, with the
    traceback that shows where it asked."""
    seen = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        tb = cause.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_name == "get_worker_plugin" and str(
                frame.f_globals.get("__name__")
            ).startswith("distributed.shuffle"):
                return NotImplementedError(P2P_UNSUPPORTED).with_traceback(cause.__traceback__)
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


def _run_task(
    run_spec: Any,
    data: dict,
    key: Any,
    task_threads: dict[int, Any],
    task_context: DaskWorker,
) -> Outcome:
    """Run a task in a task thread; never raises (but for SystemExit and such).

    While it runs, ``task_threads`` maps this thread to ``key`` (for ``call_stack``),
    and the thread's context is that of a task of ``task_context`` (``get_worker()``).
    """
    thread = threading.get_ident()
    task_threads[thread] = key
    start = time.time()
    leave = task_context.enter_task(key, start)
    try:
        value, exc = run_spec(data), None
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        value, exc = None, e
    finally:
        task_threads.pop(thread, None)
        leave()
    return value, exc, start, time.time(), thread


def _is_coroutine_task(run_spec: Any) -> bool:
    """Whether ``run_spec`` is a task whose function is ``async def``.

    Not ``Task.is_coro``: that property imports distributed to answer.
    """
    func = getattr(run_spec, "func", None)
    return func is not None and inspect.iscoroutinefunction(func)


async def _run_coroutine_task(run_spec: Any, data: dict, task_context: DaskWorker) -> Outcome:
    start = time.time()
    task_context.enter_coroutine_task()
    try:
        value, exc = await run_spec(data), None
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        value, exc = None, e
    return value, exc, start, time.time(), threading.get_ident()
