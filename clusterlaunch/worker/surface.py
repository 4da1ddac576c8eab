"""The dask-worker surface: the worker that code written for distributed's finds.

Tasks, plugins and libraries talk to "the worker they run on" through distributed:
``get_worker()``, ``get_client()``, ``worker_client()``, ``secede()``/``rejoin()``,
``Lock``, ``Queue``, actors. Each of those reads distributed's context of the running
task (the ``_worker_cvar`` context variable and ``thread_state``) and then the
worker's public attributes. This module supplies both, and it is the only part of a
worker that imports distributed: the ``DaskWorker`` it builds is plain Python until
an attribute that is distributed's own (the tornado loop, the scheduler rpc, the
client) is first read, and task contexts are set only once something in the process
has imported distributed (``ImportWatcher``). A plain workload never pays for it.

The surface is what real callers use (distributed's own helpers and plugins,
joblib's dask backend, dask-ml, xgboost.dask, lightgbm.dask, prefect-dask): identity
(``address``, ``name``, ``id``, ``nthreads``, ``memory_limit``, ``local_directory``),
``scheduler``, ``loop``, ``client``/``_get_client``, ``data``, ``state``/``tasks``,
``executors``, ``plugins``, ``log_event``, ``handle_stimulus``, ``get_current_task``.
An attribute of distributed's ``Worker`` that we do not have raises an
``AttributeError`` saying so, rather than answering something wrong.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clusterlaunch.worker.execution import TaskThreads
    from clusterlaunch.worker.messages import LongRunningMsg
    from clusterlaunch.worker.worker import Worker

logger = logging.getLogger("clusterlaunch.worker")

#: Seconds a task thread waits for the event loop to hand it something built there.
LOOP_CALL_TIMEOUT = 30.0


class ImportWatcher(importlib.abc.MetaPathFinder):
    """Calls back, once, right after the first import of the package ``name`` in this
    process (at once if it is imported already).

    One finder on ``sys.meta_path`` that answers only for ``name`` and removes itself
    when that import starts: before it, each import costs one string comparison.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._fired = False

    def add(self, callback: Callable[[], None]) -> None:
        with self._lock:
            fired = self._fired or self.name in sys.modules
            if not fired and callback not in self._callbacks:
                self._callbacks.append(callback)
                if self not in sys.meta_path:
                    sys.meta_path.insert(0, self)
        if fired:
            callback()

    def discard(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ThenCall(spec.loader, self._fire)
        return spec

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("setting up the dask-worker surface failed")


class _ThenCall(importlib.abc.Loader):
    """A loader that runs another, then a callback; it puts the real loader back on
    the module, so that nothing after the import sees this one."""

    def __init__(self, loader: Any, then: Callable[[], None]) -> None:
        self.loader = loader
        self.then = then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        module.__loader__ = self.loader
        self.loader.exec_module(module)
        self.then()


#: The process's one watcher for ``distributed``.
distributed_import = ImportWatcher("distributed")


class _PoolState(threading.local):
    """Per thread: what ``distributed.threadpoolexecutor``'s ``secede``/``rejoin`` read
    (``executor``, ``proceed``). Once handed to distributed it replaces that module's
    own thread-local; a thread that set the original's attributes before (one of
    distributed's executor threads) still reads its own values through it."""

    original: threading.local | None = None

    def __getattr__(self, name: str) -> Any:
        original = type(self).original
        if original is None:
            raise AttributeError(name)
        return getattr(original, name)


#: The worker of the task this context runs (``distributed.worker._worker_cvar`` once
#: distributed is imported): set by our task threads for every task from the start, so
#: that a task that was already running when distributed got imported (by another task,
#: say) finds its worker too.
TASK_WORKER: contextvars.ContextVar[DaskWorker] = contextvars.ContextVar(
    "clusterlaunch_task_worker"
)
#: The executor state of each thread (``distributed.threadpoolexecutor.thread_state``
#: once distributed is imported).
POOL_STATE = _PoolState()


@functools.cache
def _dask_thread_state() -> threading.local:
    """dask's thread-local of the running task (key, start time). Imported when the
    first task runs, not with the worker: dask is loaded by then (a task spec is
    dask's), and an idle worker need not hold all of dask."""
    from dask.context import thread_state

    return thread_state


def hand_context_to_distributed() -> None:
    """Make distributed read its context of a running task from ours: right after it is
    first imported in this process (``distributed_import``).

    distributed keeps that context in two module globals, ``_worker_cvar`` in
    ``distributed.worker`` (``get_worker()``) and ``thread_state`` in
    ``distributed.threadpoolexecutor`` (``secede``/``rejoin``), both read at call
    time; the task's key and start time are dask's own ``thread_state``, which our
    threads set directly.
    """
    from distributed import threadpoolexecutor
    from distributed import worker as distributed_worker

    if distributed_worker._worker_cvar is not TASK_WORKER:
        distributed_worker._worker_cvar = TASK_WORKER  # type: ignore[assignment]
    if threadpoolexecutor.thread_state is not POOL_STATE:
        _PoolState.original = threadpoolexecutor.thread_state
        threadpoolexecutor.thread_state = POOL_STATE


#: What to do instead, for attributes of distributed's Worker that well-known code
#: reaches for and ours lacks.
_INSTEAD = {
    "extensions": (
        "distributed's Pub/Sub needs the worker's pubsub extension, which clusterlaunch"
        " workers lack; use distributed.Queue or distributed.Event, which work here, or"
    ),
}


def _no_such_attribute(name: str) -> AttributeError:
    """An ``AttributeError`` (so ``getattr(worker, name, default)`` still works) that
    says what is missing and what to do instead."""
    instead = _INSTEAD.get(name, "run the code that needs it on")
    return AttributeError(
        f"a clusterlaunch worker has no {name!r}: it presents the public surface of"
        f" distributed's Worker that tasks and plugins use, and not this; {instead} a stock"
        " `dask worker`"
    )


class DaskWorker:
    """What ``distributed.get_worker()`` returns on our worker, and what plugins'
    ``setup(worker)`` and ``Client.run``'s ``dask_worker`` receive."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._lock = threading.Lock()
        self._ioloop: Any = None
        self._rpc: Any = None
        self._client: Any = None
        self._executor_view: ThreadPoolView | None = None

    def __repr__(self) -> str:
        return f"<clusterlaunch DaskWorker {self.address or 'not started'}>"

    def __getattr__(self, name: str) -> Any:
        raise _no_such_attribute(name)

    # ---------------------------------------------------------------- identity

    @property
    def address(self) -> str:
        return self._worker.address

    contact_address = address
    worker_address = address

    @property
    def name(self) -> Any:
        return self._worker.name

    @property
    def id(self) -> str:
        return self._worker.id

    @property
    def nthreads(self) -> int:
        return self._worker.nthreads

    @property
    def memory_limit(self) -> int | None:
        return self._worker.memory_limit or None

    @property
    def local_directory(self) -> str:
        return self._worker.local_directory

    @property
    def resources(self) -> dict[str, float]:
        return dict(self._worker.options.resources)

    @property
    def status(self) -> Any:
        """distributed's ``Status`` member of the worker's status."""
        from distributed.core import Status

        return Status.lookup[self._worker.status]  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ state

    @property
    def data(self) -> Any:
        return self._worker.state.data

    @property
    def state(self) -> Any:
        return self._worker.state

    @property
    def plugins(self) -> dict[str, Any]:
        """The worker plugins by name (``worker.plugins``, kept by ``worker/plugins.py``)."""
        return self._worker.plugins

    @property
    def actors(self) -> dict:
        """The hosted actors, key -> instance (2025.1's ``Actor`` reads them here)."""
        return self._worker.state.actors

    async def upload_file(self, filename: str, data: str | bytes, load: bool = True) -> dict:
        """What ``UploadFile`` (``Client.upload_file``) calls: see ``worker/plugins.py``."""
        return self._worker.worker_plugins.upload_file(filename, data, load)

    @property
    def tasks(self) -> dict:
        return self._worker.state.tasks

    @property
    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The RPC ops this worker answers, op -> handler (as a distributed ``Server``)."""
        return self._worker.server.handlers

    @property
    def executing_count(self) -> int:
        return len(self._worker.state.executing)

    def get_current_task(self) -> Any:
        """The key of the task running in this thread (as distributed's)."""
        from distributed.utils import thread_state

        return thread_state.key

    # ------------------------------------------------------ distributed's objects

    @property
    def loop(self) -> Any:
        """The worker's event loop as a tornado ``IOLoop`` (what distributed schedules
        callbacks on: ``loop.add_callback``, ``sync(loop, ...)``)."""
        with self._lock:
            if self._ioloop is None:
                self._ioloop = self.run_in_loop(_current_ioloop)
            return self._ioloop

    io_loop = loop

    @property
    def rpc(self) -> Any:
        """A ``distributed.core.ConnectionPool``, as distributed's code calls peers."""
        with self._lock:
            if self._rpc is None:
                self._rpc = self.run_in_loop(self._start_rpc)
            return self._rpc

    async def _start_rpc(self) -> Any:
        import dask
        from distributed.core import ConnectionPool

        return await ConnectionPool(
            limit=64,
            timeout=dask.config.get("distributed.comm.timeouts.connect"),
            connection_args=self.security.get_connection_args("worker"),
        )

    @property
    def scheduler(self) -> Any:
        """The scheduler as a ``PooledRPCCall`` (``.address``, ``await .op(...)``)."""
        return self.rpc(self._worker.scheduler_address)

    @property
    def security(self) -> Any:
        from distributed.security import Security

        return Security()

    @property
    def executor(self) -> ThreadPoolView:
        view = self._executor_view
        if view is None:
            with self._lock:
                if self._executor_view is None:
                    self._executor_view = ThreadPoolView(self._worker.execution.threads)
                view = self._executor_view
        return view

    @property
    def executors(self) -> dict[str, Any]:
        return {"default": self.executor}

    @property
    def client(self) -> Any:
        return self._get_client()

    def _get_client(self, timeout: float | str | None = None) -> Any:
        """The ``distributed.Client`` of this worker's tasks, made on first use: the
        process's default client if it is for our scheduler, else a new one on the
        worker's loop, shared by every task, closed with the worker (as dask's)."""
        import dask
        from distributed.client import Client, default_client
        from distributed.utils import in_async_call

        if timeout is None:
            timeout = dask.config.get("distributed.comm.timeouts.connect")
        timeout = dask.utils.parse_timedelta(timeout, "s")
        with self._lock:
            if self._client is not None and self._client.status in ("running", "connecting"):
                return self._client
        try:
            client = default_client()
        except ValueError:
            client = None
        if (
            client is not None
            and client.scheduler
            and (client.scheduler.address == self._worker.scheduler_address)
        ):
            self._client = client
            return client
        loop = self.loop
        client = Client(
            self._worker.scheduler_address,
            loop=loop,
            security=self.security,
            set_as_default=True,
            asynchronous=in_async_call(loop),
            direct_to_workers=True,
            name="worker",
            timeout=timeout,
        )
        with self._lock:
            self._client = client
        return client

    # ----------------------------------------------------------------- actions

    def log_event(self, topic: str | Iterable[str], msg: Any) -> None:
        """Send an event to the scheduler's event log (``Client.get_events``)."""
        if not isinstance(topic, str):
            topic = list(topic)
        self.call_soon(
            self._worker.send_to_scheduler, {"op": "log-event", "topic": topic, "msg": msg}
        )

    def handle_stimulus(self, *events: Any) -> None:
        """Feed events of distributed's state machine: those a task sends (secede)."""
        from clusterlaunch.worker import state as sm

        ours = []
        for event in events:
            if type(event).__name__ == "SecedeEvent":
                ours.append(
                    sm.Secede(
                        key=event.key,
                        compute_duration=event.compute_duration,
                        stimulus_id=event.stimulus_id,
                    )
                )
            else:
                raise _no_such_attribute(f"handle_stimulus({type(event).__name__})")
        self._worker.handle_events(*ours)

    def long_running_message(self, msg: LongRunningMsg) -> dict[str, Any]:
        """``msg`` as the scheduler's release reads it: ``run_id`` only from 2025.2.0 on
        (2025.1's handler refuses it). Only a seceded task makes one, so distributed is
        imported; the scheduler's release is taken to be the worker's own, as dask
        requires them to match (it warns at registration when they don't)."""
        import distributed
        from packaging.version import Version

        wire = msg.to_dict()
        if Version(distributed.__version__) < Version("2025.2.0"):
            del wire["run_id"]
        return wire

    async def close(self, reason: str = "worker-close", **_: Any) -> None:
        await self._worker.close(reason)

    # -------------------------------------------------------------- the loop

    def _asyncio_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._worker.asyncio_loop
        if loop is None:
            raise RuntimeError(f"{self!r}: the worker has not started")
        return loop

    def in_loop_thread(self) -> bool:
        return self._worker.asyncio_loop is _running_loop()

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the worker's loop, from any thread."""
        if self.in_loop_thread():
            callback(*args)
        else:
            self._asyncio_loop().call_soon_threadsafe(callback, *args)

    def run_in_loop(self, make: Callable[[], Any]) -> Any:
        """``make()`` (a coroutine function or a plain one) called in the worker's
        loop, from any thread; its result."""
        loop = self._asyncio_loop()
        if self.in_loop_thread():
            result = make()
            return _to_the_end(result) if asyncio.iscoroutine(result) else result

        async def call() -> Any:
            result = make()
            return await result if asyncio.iscoroutine(result) else result

        future = asyncio.run_coroutine_threadsafe(call(), loop)
        try:
            return future.result(LOOP_CALL_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"the worker's event loop did not answer within {LOOP_CALL_TIMEOUT:g} s"
            ) from None

    # ------------------------------------------------------------- task context

    def enter_task(self, key: Any, start: float, actor: bool = False) -> Callable[[], None]:
        """Make this thread's context that of a task running ``key`` here (what
        ``get_worker()``, ``secede()`` and ``worker_client()`` read); returns what
        restores the previous one. Cheap, and no import: it runs for every task.
        ``actor``: an actor's method in the actor thread, marked as dask's worker marks
        it (an ``Actor`` of this worker then calls the instance directly); that thread
        is none of the task threads a task could secede from."""
        token = TASK_WORKER.set(self)
        dask_thread_state = _dask_thread_state()
        previous = (
            dask_thread_state.__dict__.get("key"),
            dask_thread_state.__dict__.get("start_time"),
            dask_thread_state.__dict__.get("actor"),
        )
        dask_thread_state.key = key
        dask_thread_state.start_time = start
        if actor:
            dask_thread_state.actor = True
        else:
            POOL_STATE.executor = self.executor
            POOL_STATE.proceed = True

        def leave() -> None:
            TASK_WORKER.reset(token)
            (
                dask_thread_state.key,
                dask_thread_state.start_time,
                dask_thread_state.actor,
            ) = previous

        return leave

    def enter_coroutine_task(self) -> None:
        """``enter_task`` for an ``async def`` task: its asyncio task has a context of
        its own, and the loop's thread state is not the task's."""
        TASK_WORKER.set(self)

    async def close_surface(self) -> None:
        """Close the client and the connections this surface made (the worker's close)."""
        client, self._client = self._client, None
        if client is not None and client.status not in ("closed", "closing"):
            # As dask's worker: closing from the loop needs the client's async side.
            client._asynchronous = True
            try:
                await client.close()
            except Exception as e:
                logger.info("%s: closing the tasks' client: %r", self.address, e)
        rpc, self._rpc = self._rpc, None
        if rpc is not None:
            await rpc.close()


def _to_the_end(coroutine: Any) -> Any:
    """Run, in this thread, a coroutine that never waits (``ConnectionPool.start``,
    asked for first by an ``Actor`` on the loop); its result."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("run_in_loop of a coroutine that waits, from the loop's own thread")


def actor_class() -> type:
    """distributed's ``Actor``: the proxy of an actor this worker hosts."""
    from distributed.actor import Actor

    return Actor


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _current_ioloop() -> Any:
    from tornado.ioloop import IOLoop

    return IOLoop.current()


class ThreadPoolView:
    """The worker's ``TaskThreads`` as ``distributed.threadpoolexecutor``'s
    ``secede``/``rejoin`` reach into an executor: ``_threads.remove(thread)``,
    ``_adjust_thread_count()``, ``_rejoin_lock``, ``_rejoin_list.append((thread,
    event))`` and ``submit``. Each is mapped onto ``TaskThreads.secede``/``rejoin``."""

    def __init__(self, threads: TaskThreads) -> None:
        self.task_threads = threads
        self._threads = _Seceding(threads)
        self._rejoin_lock = threading.Lock()
        self._rejoin_list = _Rejoining(threads)

    def __repr__(self) -> str:
        return f"<ThreadPoolView of {self.task_threads!r}>"

    def _adjust_thread_count(self) -> None:
        """Nothing: ``TaskThreads.secede`` started the seceded thread's replacement."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Only rejoin submits (a no-op, to wake an idle thread); so does this."""
        self.task_threads.wake()


class _Seceding:
    def __init__(self, threads: TaskThreads) -> None:
        self.threads = threads

    def remove(self, thread: threading.Thread) -> None:
        self.threads.secede(thread)


class _Rejoining:
    def __init__(self, threads: TaskThreads) -> None:
        self.threads = threads

    def append(self, item: tuple[threading.Thread, threading.Event]) -> None:
        thread, event = item
        self.threads.rejoin(thread, event)


__all__ = ["DaskWorker", "ImportWatcher", "ThreadPoolView", "actor_class", "distributed_import"]
