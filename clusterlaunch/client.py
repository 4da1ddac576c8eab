"""A small dask client of our own: futures on any dask scheduler, without distributed.

``Client`` registers with the scheduler as a client over its batched stream and
submits work as task graphs in the scheduler's own format (``dask._task_spec`` tasks).
Pure calls get deterministic keys (``dask.tokenize``), so a repeated submit returns a
future on the same key and the function runs once. Keys are released on the scheduler
when the last future for them is dropped or cancelled.

The public API is synchronous; the client's event loop runs on a bridge of its own
(``bridge.LoopThread``), and every task it starts there is owned by one
``BackgroundTasks``, cancelled and awaited on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import threading
import types
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from clusterlaunch.bridge import LoopThread
from clusterlaunch.comm.addressing import normalize_address
from clusterlaunch.comm.background import BackgroundTasks
from clusterlaunch.comm.batched import BatchedSend
from clusterlaunch.comm.rpc import ConnectionPool, PooledRPC
from clusterlaunch.comm.tcp import CommClosedError, connect
from clusterlaunch.comm.timeouts import wait_for
from clusterlaunch.futures import (
    FutureMethods,
    FutureState,
    call_quietly,
    collect_futures,
    future_class,
    substitute,
)
from clusterlaunch.protocol import ProtocolError, Serialize, ToPickle, Undecodable
from clusterlaunch.protocol.versions import versions_info
from clusterlaunch.security import tls_config

# Lean import: this module imports neither dask nor packaging at load time (dask alone
# costs more than the rest of the client). They load on first real use -- creating a
# Future, connecting, submit/map/get/scatter -- and ``Future``, a subclass of dask's
# ``TaskRef``, is built then by ``future_class()`` (see ``futures.py``).
if TYPE_CHECKING:
    from packaging.version import Version

    from clusterlaunch.futures import Future


def __getattr__(name: str) -> Any:
    if name == "Future":  # its public home beside Client, as dask's is
        return future_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "Future"})


logger = logging.getLogger(__name__)

#: From this distributed release on, update-graph carries a dask expression.
EXPR_GRAPHS_SINCE = "2025.4.0"
#: From this release on, cancel-keys requires a reason and a message (2025.2.0 and
#: older refuse them).
CANCEL_REASON_SINCE = "2025.3.0"
#: Seconds a key release waits for another message to the scheduler to go out with.
RELEASE_DELAY = 0.05
#: Seconds ``close`` waits for the goodbye to the scheduler and the client's tasks.
CLOSE_TIMEOUT = 10.0

T = TypeVar("T")
F = TypeVar("F", bound="FutureMethods")


class Client:
    """Connect to a dask scheduler: ``Client("tcp://host:port")`` or ``Client(cluster)``.

    With no address, ``DASK_SCHEDULER_ADDRESS`` is used, as dask's client does.
    ``security`` (a ``distributed.security.Security``, or dask's configuration when
    None) authenticates the client to a ``tls://`` scheduler.
    """

    #: dask.compute(..., scheduler=client) checks this before using ``client.get``.
    asynchronous = False

    def __init__(self, address: Any = None, *, timeout: float = 30.0, security: Any = None) -> None:
        if address is None:
            address = os.environ.get("DASK_SCHEDULER_ADDRESS")
            if not address:
                raise ValueError("no scheduler address: pass one or set DASK_SCHEDULER_ADDRESS")
        if security is None:
            security = getattr(address, "security", None)
        address = getattr(address, "scheduler_address", address)
        self.scheduler_address = normalize_address(address)
        self._tls = tls_config(security, "client")
        self.id = f"Client-{uuid.uuid4()}"
        self.timeout = timeout
        self.status = "connecting"
        self._states: dict[Any, FutureState] = {}
        self._refcount: defaultdict[Any, int] = defaultdict(int)
        self._lock = threading.RLock()
        self._bridge = LoopThread("clusterlaunch-client")
        self._loop = self._bridge.loop
        self._tasks = BackgroundTasks(f"client {self.id}")
        self._pool: ConnectionPool | None = None
        self._stream: BatchedSend | None = None
        self._releases: list[Any] = []
        self._release_timer: asyncio.TimerHandle | None = None
        self._callbacks: ThreadPoolExecutor | None = None
        self._scheduler_version = _version("0")
        try:
            self._run(self._connect_within(timeout))
        except BaseException:
            self._bridge.close()
            raise

    def __repr__(self) -> str:
        return f"<clusterlaunch.Client {self.scheduler_address} {self.status}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # --------------------------------------------------------------- the loop thread

    def _run(
        self, coro: Coroutine[Any, Any, T], timeout: float | None = None, timeout_message: str = ""
    ) -> T:
        """Run ``coro`` in the loop and return its result; after ``timeout`` seconds,
        cancel it and raise ``TimeoutError(timeout_message)``."""
        if self._bridge.closed:
            coro.close()
            raise CommClosedError(f"client is {self.status}")
        return self._bridge.run(coro, timeout, timeout_message)

    def _scheduler(self) -> PooledRPC:
        """Calls to the scheduler over the client's connection pool."""
        if self._pool is None:
            raise CommClosedError(f"client is {self.status}")
        return self._pool(self.scheduler_address)

    async def _connect_within(self, timeout: float) -> None:
        """Connect, or raise one ``OSError`` naming the address within ``timeout``."""
        address = self.scheduler_address
        try:
            await wait_for(self._connect(), timeout)
        except BaseException as e:
            if self._pool is not None:
                await self._pool.close()
            if isinstance(e, asyncio.TimeoutError):
                raise OSError(
                    f"could not connect to the scheduler at {address} within {timeout:g} s;"
                    " is a dask scheduler running there?"
                ) from None
            if isinstance(e, ProtocolError):
                raise OSError(f"{address} does not answer as a dask scheduler: {e}") from None
            raise

    async def _connect(self) -> None:
        self._pool = ConnectionPool(limit=64, timeout=self.timeout, tls=self._tls)
        try:
            versions = await self._scheduler().versions()
        except OSError as e:
            raise OSError(f"could not reach the scheduler at {self.scheduler_address}: {e}") from e
        version = versions.get("packages", {}).get("distributed")
        self._scheduler_version = _version(version or "0")
        comm = await connect(self.scheduler_address, timeout=self.timeout, tls=self._tls)
        try:
            await self._register(comm)
        except BaseException:
            comm.abort()
            raise
        self._stream = BatchedSend(interval=0.002)
        self._stream.start(comm)
        self.status = "running"
        self._tasks.spawn(self._listen(comm), name="listen")

    async def _register(self, comm: Any) -> None:
        await comm.write(
            {
                "op": "register-client",
                "client": self.id,
                "reply": False,
                "versions": versions_info(),
            }
        )
        start = await wait_for(comm.read(), self.timeout)
        first = start[0] if isinstance(start, (list, tuple)) and start else start
        if not isinstance(first, dict) or first.get("op") != "stream-start":
            raise OSError(f"unexpected answer from {self.scheduler_address}: {start!r:.200}")
        if first.get("error"):
            raise ImportError(first["error"])
        if first.get("warning"):
            logger.warning("%s", first["warning"])

    async def _listen(self, comm: Any) -> None:
        handlers: dict[str, Callable[..., None]] = {
            "key-in-memory": self._on_key_in_memory,
            "task-erred": self._on_task_erred,
            "lost-data": self._on_lost_data,
            "cancelled-keys": self._on_cancelled_keys,
            "task-retried": self._on_task_retried,
            "restart": self._on_restart,
        }
        try:
            while True:
                batch = await comm.read()
                for msg in batch if isinstance(batch, (list, tuple)) else (batch,):
                    if not isinstance(msg, dict):
                        continue
                    op = msg.pop("op", None)
                    if op == "stream-closed":
                        return
                    handler = handlers.get(op)
                    if handler is not None:
                        try:
                            handler(**msg)
                        except Exception:
                            logger.exception("handling %r from the scheduler failed", op)
        except (CommClosedError, OSError):
            pass
        finally:
            if self.status == "running":
                logger.warning("lost the connection to the scheduler at %s", self.scheduler_address)
                self.status = "disconnected"
                for state in list(self._states.values()):
                    if not state.done():
                        state.cancel("because the scheduler connection was lost")

    def _on_key_in_memory(self, key: Any = None, type: Any = None, **_: Any) -> None:
        state = self._states.get(key)
        if state is not None:
            state.finish(_unpickle_type(type))

    def _on_task_erred(
        self, key: Any = None, exception: Any = None, traceback: Any = None, **_: Any
    ) -> None:
        state = self._states.get(key)
        if state is not None:
            state.set_error(exception, traceback)

    def _on_lost_data(self, key: Any = None, **_: Any) -> None:
        state = self._states.get(key)
        if state is not None:
            state.lose()

    def _on_cancelled_keys(self, keys: Iterable = (), reason: Any = None, **_: Any) -> None:
        for key in keys:
            state = self._states.get(key)
            if state is not None:
                state.cancel(f"({reason})" if reason else "")

    def _on_task_retried(self, key: Any = None, **_: Any) -> None:
        state = self._states.get(key)
        if state is not None:
            state.reset()

    def _on_restart(self, **_: Any) -> None:
        for state in list(self._states.values()):
            state.cancel("because the scheduler restarted")

    def _send(self, *msgs: dict[str, Any]) -> None:
        if self._stream is None or self.status != "running":
            raise CommClosedError(f"client is {self.status}")
        self._bridge.call_soon(self._send_in_loop, msgs)

    def _send_in_loop(self, msgs: tuple[dict[str, Any], ...]) -> None:
        self._flush_releases()
        if self._stream is not None:
            with contextlib.suppress(CommClosedError):
                self._stream.send(*msgs)

    def _release_in_loop(self, key: Any) -> None:
        # Releases ride along with the next message to the scheduler (see
        # _send_in_loop), or go out after RELEASE_DELAY: a release written on its own
        # would make the submit that typically follows it wait out the batch interval.
        # Futures dropped together release their keys in one message.
        if not self._releases:
            self._release_timer = self._loop.call_later(RELEASE_DELAY, self._flush_releases)
        self._releases.append(key)

    def _flush_releases(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if self._releases and self._stream is not None:
            keys, self._releases = self._releases, []
            with contextlib.suppress(CommClosedError):
                self._stream.send({"op": "client-releases-keys", "keys": keys, "client": self.id})

    # ----------------------------------------------------------- futures and keys

    def _acquire(self, key: Any) -> FutureState:
        with self._lock:
            self._refcount[key] += 1
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = FutureState(key)
            return state

    def _release(self, key: Any) -> None:
        with self._lock:
            self._refcount[key] -= 1
            if self._refcount[key] > 0:
                return
            del self._refcount[key]
            state = self._states.pop(key, None)
            # Queued under the lock: a submit of the same key in another thread must
            # reach the scheduler after this release, not before it.
            if self.status == "running":
                self._bridge.call_soon(self._release_in_loop, key)
        if state is not None and not state.done():
            state.cancel("because its last future was released")

    # ------------------------------------------------------------------ submitting

    def submit(
        self,
        fn: Callable,
        *args: Any,
        key: Any = None,
        workers: Any = None,
        resources: dict | None = None,
        retries: int = 0,
        pure: bool = True,
        allow_other_workers: bool = False,
        priority: int = 0,
        **kwargs: Any,
    ) -> Future:
        """Run ``fn(*args, **kwargs)`` on the cluster; identical pure calls run once."""
        if not callable(fn):
            raise TypeError(f"submit needs a callable, not {type(fn).__name__}")
        from dask.utils import funcname

        Future = future_class()
        if key is None:
            key = _task_keys(funcname(fn), fn, kwargs, [args], pure)[0]
        with self._lock:
            if key in self._states:
                return Future(key, self)
            future = Future(key, self)
        self._update_graph(
            {key: _task(key, fn, args, kwargs)},
            [key],
            internal_priority={key: 0},
            workers=workers,
            resources=resources,
            retries=retries,
            allow_other_workers=allow_other_workers,
            priority=priority,
        )
        return future

    def map(
        self,
        fn: Callable,
        *iterables: Iterable,
        key: str | list | None = None,
        workers: Any = None,
        resources: dict | None = None,
        retries: int = 0,
        pure: bool = True,
        allow_other_workers: bool = False,
        priority: int = 0,
        **kwargs: Any,
    ) -> list[Future]:
        """``submit`` for each element of ``zip(*iterables)``, as one graph."""
        if not callable(fn):
            raise TypeError(f"map needs a callable, not {type(fn).__name__}")
        from dask.utils import funcname

        Future = future_class()
        arg_tuples = list(zip(*iterables))
        if isinstance(key, list):
            keys = key
        else:
            keys = _task_keys(key or funcname(fn), fn, kwargs, arg_tuples, pure)
        futures = [Future(k, self) for k in keys]
        graph = {}
        for k, args in zip(keys, arg_tuples):
            if k not in graph:
                graph[k] = _task(k, fn, args, kwargs)
        self._update_graph(
            graph,
            list(graph),
            internal_priority={k: i for i, k in enumerate(graph)},
            workers=workers,
            resources=resources,
            retries=retries,
            allow_other_workers=allow_other_workers,
            priority=priority,
        )
        return futures

    def _update_graph(
        self,
        graph: dict,
        keys: list,
        *,
        internal_priority: dict | None = None,
        workers: Any = None,
        resources: dict | None = None,
        retries: int = 0,
        allow_other_workers: bool = False,
        priority: int = 0,
    ) -> None:
        annotations: dict[str, Any] = {}
        if priority:
            annotations["priority"] = priority
        if workers is not None:
            annotations["workers"] = [workers] if isinstance(workers, str) else list(workers)
            if allow_other_workers:
                annotations["allow_other_workers"] = True
        if retries:
            annotations["retries"] = retries
        if resources:
            annotations["resources"] = dict(resources)
        msg: dict[str, Any] = {
            "op": "update-graph",
            "keys": set(keys),
            "internal_priority": internal_priority,
            "submitting_task": None,
            "user_priority": priority,
            "fifo_timeout": 0,
            "actors": None,
            "code": ToPickle(()),
            "annotations": ToPickle(annotations),
            "span_metadata": ToPickle({"collections": [{"type": "Future"}]}),
            "stimulus_id": f"update-graph-{uuid.uuid4().hex}",
        }
        if self._scheduler_version >= _version(EXPR_GRAPHS_SINCE):
            from dask._expr import LLGExpr

            msg["expr_ser"] = Serialize(LLGExpr(graph, _determ_token=uuid.uuid4().hex))
        else:
            from dask.highlevelgraph import HighLevelGraph

            # Older schedulers read ``.data`` of the unpickled graph payload.
            hlg = HighLevelGraph.from_collections(f"clusterlaunch-{uuid.uuid4().hex}", graph)
            msg["graph_header"] = {"serializer": "pickle", "writeable": ()}
            msg["graph_frames"] = [_pickle(types.SimpleNamespace(data=hlg))]
        self._send(msg)

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """Compute ``keys`` of the graph ``dsk``: ``dask.compute(x, scheduler=client.get)``."""
        from dask._task_spec import convert_legacy_graph
        from dask.core import flatten

        # dask hands schedulers a graph mapping or, in newer releases, an expression.
        if hasattr(dsk, "__dask_graph__"):
            dsk = dsk.__dask_graph__()
        graph = convert_legacy_graph(dict(dsk))
        wanted = list(flatten(keys))
        Future = future_class()
        futures = {k: Future(k, self) for k in wanted}
        self._update_graph(
            graph,
            wanted,
            workers=kwargs.get("workers"),
            resources=kwargs.get("resources"),
            retries=kwargs.get("retries") or 0,
        )
        results = self.gather(futures)
        return _pack_like(keys, results)

    # ------------------------------------------------------------------ results

    def gather(self, futures: Any, timeout: float | None = None) -> Any:
        """Values of futures in a (nested) list, tuple, dict or a single Future."""
        found: list[Future] = []
        cls = future_class()
        collect_futures(futures, found, cls)
        return substitute(futures, self._gather_futures(found, timeout), cls)

    def _gather_futures(
        self, futures: Sequence[FutureMethods], timeout: float | None
    ) -> dict[Any, Any]:
        """Values by key once all ``futures`` are done; raises the first error.

        Waiting and fetching happen in one go in the event loop, which starts the
        fetch as soon as the last key is reported, without a round through this thread.
        """
        states = list({f.key: f._state for f in futures}.values())
        if not states:
            return {}
        while True:
            values = self._run(
                self._wait_and_gather(states),
                timeout,
                f"no result for {len(states)} futures within {timeout} s"
                if len(states) > 1
                else f"future {states[0].key!r} not done within {timeout} s",
            )
            if values is not None:
                return values
            for state in states:
                if state.status == "error" and state.exception is not None:
                    raise state.exception.with_traceback(state.traceback)
                if state.status == "cancelled":
                    reason = state.cancel_reason
                    raise CancelledError(f"{state.key!r} was cancelled {reason}".strip())
            # A key was lost or retried since it was reported: wait for it again.

    async def _wait_and_gather(self, states: list[FutureState]) -> dict | None:
        """The values, or None if a state failed (or is no longer finished)."""
        await self._until_done(states)
        if any(state.status != "finished" for state in states):
            return None
        return await self._gather_remote([state.key for state in states])

    async def _until_done(self, states: list[FutureState]) -> None:
        """Return once every state is done, or one failed."""
        if any(s.status in ("error", "cancelled") for s in states):
            return
        pending = [state for state in states if not state.done()]
        if not pending:
            return
        waiter = self._loop.create_future()
        remaining = len(pending)

        def settled(state: FutureState) -> None:
            nonlocal remaining
            remaining -= 1
            if not waiter.done() and (remaining == 0 or state.status in ("error", "cancelled")):
                waiter.set_result(None)

        for state in pending:

            def callback(state: FutureState = state) -> None:
                if self._bridge.in_loop_thread():
                    settled(state)
                else:
                    self._loop.call_soon_threadsafe(settled, state)

            state.add_callback(callback)
        await waiter

    async def _gather_remote(self, keys: list, attempts: int = 5) -> dict:
        for attempt in range(attempts):
            response = await self._scheduler().gather(keys=keys)
            if response.get("status") == "OK":
                data = response["data"]
                bad = [k for k, v in data.items() if isinstance(v, Undecodable)]
                if bad:
                    raise data[bad[0]].error
                return data
            missing = response.get("keys", keys)
            logger.info("gather: %d keys not found yet (attempt %d)", len(missing), attempt + 1)
            await asyncio.sleep(0.1 * 2**attempt)
        raise OSError(f"could not gather {len(missing)} keys, e.g. {missing[:3]}")

    def scatter(
        self, data: Any, workers: Any = None, broadcast: bool = False, hash: bool = True
    ) -> Any:
        """Send local values to workers; returns futures shaped like ``data``."""
        single = not isinstance(data, (list, tuple, dict))
        items = {"": data} if single else data
        if isinstance(items, dict) and not single:
            named = dict(items)
        else:
            from dask.tokenize import tokenize

            values = list(items.values()) if single else list(items)
            names = [
                f"{type(v).__name__}-{tokenize(v) if hash else uuid.uuid4().hex}" for v in values
            ]
            named = dict(zip(names, values))
        if workers is not None:
            workers = [workers] if isinstance(workers, str) else list(workers)
        self._run(
            self._scheduler().scatter(
                data={k: Serialize(v) for k, v in named.items()},
                workers=workers,
                client=self.id,
                broadcast=broadcast,
                timeout=self.timeout,
            )
        )
        Future = future_class()
        futures = {k: Future(k, self) for k in named}
        for k, v in named.items():
            futures[k]._state.finish(type(v))
        if single:
            return next(iter(futures.values()))
        if isinstance(data, dict):
            return futures
        return type(data)(futures[k] for k in named)

    def cancel(self, futures: Any, force: bool = False) -> None:
        """Stop computing these futures' keys and forget them."""
        found: list[Future] = []
        collect_futures(futures, found, future_class())
        keys = list({f.key: None for f in found})
        msg: dict[str, Any] = {"op": "cancel-keys", "keys": keys, "force": force}
        if self._scheduler_version >= _version(CANCEL_REASON_SINCE):
            msg.update(reason="cancelled by the client", msg=None)
        self._send(msg)
        with self._lock:
            # Forget the cancelled states: submitting the same call again computes it
            # anew instead of handing out a cancelled future. Live futures keep theirs.
            for key in keys:
                self._states.pop(key, None)
        for future in found:
            future._state.cancel("by the client")

    def as_completed(
        self, futures: Iterable[Future], timeout: float | None = None
    ) -> Iterator[Future]:
        """Yield ``futures`` in the order they finish (or fail)."""
        pending = list(futures)
        done: queue.Queue[Future] = queue.Queue()
        for future in pending:
            future._state.add_callback(functools.partial(done.put, future))
        for _ in pending:
            try:
                yield done.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no future finished within {timeout} s") from None

    def _run_callback(self, fn: Callable[[F], Any], future: F) -> None:
        # Not in the event loop's thread: a callback that waits for the loop (as
        # future.result() does) would wait forever there.
        with self._lock:
            if self.status == "closed":
                executor = None
            elif self._callbacks is None:
                executor = self._callbacks = ThreadPoolExecutor(
                    1, thread_name_prefix="clusterlaunch-callback"
                )
            else:
                executor = self._callbacks
        if executor is None:
            call_quietly(lambda: fn(future))
        else:
            executor.submit(call_quietly, lambda: fn(future))

    # ------------------------------------------------------------------ cluster

    def scheduler_info(self) -> dict:
        return self._run(self._scheduler().identity())

    def shutdown(self) -> None:
        """Retire every worker of the scheduler, then close this client.

        A worker holding the only copy of some data can't hand it over when every
        worker leaves, so the scheduler keeps it; such workers are then removed and
        closed all the same.
        """
        if self.status == "running":
            self._run(
                self._retire_all(),
                self.timeout,
                f"the workers did not retire within {self.timeout} s",
            )
        self.close()

    async def _retire_all(self) -> None:
        scheduler = self._scheduler()
        workers = set((await scheduler.identity()).get("workers", {}))
        if not workers:
            return
        retired = await scheduler.retire_workers(
            workers=list(workers), close_workers=True, remove=True
        )
        for address in workers - set(retired or ()):
            await scheduler.unregister(
                address=address, stimulus_id=f"client-shutdown-{uuid.uuid4().hex}", close=True
            )

    def close(self) -> None:
        """Release all keys, disconnect, and end the client's tasks and threads."""
        if self.status in ("closing", "closed"):
            return
        running = self.status == "running"
        self.status = "closing"
        # Failing here (the scheduler is gone, or close() was called in the loop's own
        # thread) leaves the tasks to the bridge's close, which cancels and awaits them.
        with contextlib.suppress(Exception):
            self._run(self._close_in_loop(running), CLOSE_TIMEOUT)
        for state in list(self._states.values()):
            if not state.done():
                state.cancel("because the client closed")
        with self._lock:
            self.status = "closed"
            executor, self._callbacks = self._callbacks, None
        if executor is not None:
            # A callback that closes the client runs in the executor's thread, which
            # can't join itself: it ends on its own once that callback returns.
            in_callback = threading.current_thread().name.startswith("clusterlaunch-callback")
            executor.shutdown(wait=not in_callback)
        self._bridge.close()

    async def _close_in_loop(self, running: bool) -> None:
        """Say goodbye on the stream, then end our tasks, the release timer, the pool."""
        try:
            if running and self._stream is not None:
                self._send_in_loop(({"op": "close-client"}, {"op": "close-stream"}))
                with contextlib.suppress(OSError, asyncio.TimeoutError):  # scheduler gone
                    await self._stream.close(timeout=2)
        finally:
            await self._tasks.close()
            if self._release_timer is not None:
                self._release_timer.cancel()
                self._release_timer = None
            if self._pool is not None:
                await self._pool.close()


def _task(key: Any, fn: Callable, args: tuple, kwargs: dict) -> Any:
    """The dask task calling ``fn(*args, **kwargs)``; futures among them become
    dependencies."""
    from dask._task_spec import Task, parse_input

    parsed: dict[str, Any] = {name: parse_input(v) for name, v in kwargs.items()}
    return Task(key, fn, *(parse_input(a) for a in args), **parsed)


def _task_keys(prefix: str, fn: Callable, kwargs: dict, arg_tuples: list, pure: bool) -> list:
    """Keys of the calls ``fn(*args, **kwargs)``, one per tuple in ``arg_tuples``.

    A pure call's key is a token of the call, the same from ``submit`` and ``map``;
    the function and keywords are tokenized once for all of them.
    """
    if not pure:
        return [f"{prefix}-{uuid.uuid4().hex}" for _ in arg_tuples]
    from dask.tokenize import tokenize

    common = tokenize(fn, kwargs)
    return [f"{prefix}-{tokenize(common, args)}" for args in arg_tuples]


@functools.cache
def _version(text: str) -> Version:
    from packaging.version import Version

    return Version(text)


def _pickle(value: Any) -> bytes:
    from clusterlaunch.protocol import pickling

    return pickling.dumps(value)


def _unpickle_type(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        from clusterlaunch.protocol import pickling

        try:
            return pickling.loads(value)  # a small pickle of a type
        except Exception:
            return None
    return value


def _pack_like(keys: Any, results: dict) -> Any:
    if isinstance(keys, list):
        return [_pack_like(k, results) for k in keys]
    return results[keys]
