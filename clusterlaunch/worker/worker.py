"""The async shell of a worker: sockets, executor and timers around ``WorkerState``.

Everything that happens — a scheduler message, a finished task, a completed transfer —
becomes an event for the state machine; the shell carries out the instructions it
returns and keeps no task bookkeeping of its own. It speaks to the real dask
scheduler, clients and peers (ours or stock dask workers) over ``clusterlaunch.comm``
and never imports distributed or tornado.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Collection, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

from clusterlaunch import __version__
from clusterlaunch.comm.addressing import (
    format_address,
    is_wildcard,
    parse_address,
    routable_ip,
)
from clusterlaunch.comm.batched import BatchedSend
from clusterlaunch.comm.rpc import ConnectionPool, send_recv
from clusterlaunch.comm.server import NO_REPLY, Server
from clusterlaunch.comm.tcp import Comm, CommClosedError, connect
from clusterlaunch.protocol import ProtocolError, Serialize, Undecodable, pickling
from clusterlaunch.protocol.remote_errors import error_message
from clusterlaunch.protocol.versions import versions_info
from clusterlaunch.worker import state as sm
from clusterlaunch.worker.memory import MemoryThresholds, SpillBuffer
from clusterlaunch.worker.metrics import (
    TICK_INTERVAL,
    TICK_LIMIT,
    LoopTicks,
    SchedulerClock,
    TransferBandwidth,
)
from clusterlaunch.worker.options import WorkerOptions

logger = logging.getLogger("clusterlaunch.worker")

#: Concurrent get_data requests we serve before answering "busy" (doubled for peers
#: on our host), as dask's worker does.
TRANSFER_OUTGOING_COUNT_LIMIT = 4
#: Seconds before asking a busy peer again.
BUSY_RETRY_DELAY = 0.15
#: Seconds between asking the scheduler about keys no known peer has.
FIND_MISSING_INTERVAL = 1.0
#: Seconds between checks of the process's memory against the memory limit.
MEMORY_MONITOR_INTERVAL = 0.1
#: Ops the scheduler sends on the worker stream; each becomes a state machine event.
SCHEDULER_STREAM_OPS = (
    "compute-task",
    "free-keys",
    "acquire-replicas",
    "remove-replicas",
    "steal-request",
    "refresh-who-has",
    "cancel-compute",
    "worker-status-change",
    "remove-worker",
    "close",
)
#: Seconds to wait for a peer's get_data reply before counting it as failed.
TRANSFER_TIMEOUT = 300.0
#: CLUSTERLAUNCH_VALIDATE_STATE=1 checks the state machine's invariants after every
#: event: a debug aid, O(tasks) each time.
VALIDATE_STATE = os.environ.get("CLUSTERLAUNCH_VALIDATE_STATE", "") == "1"


def _sizeof(value: Any) -> int:
    from dask.sizeof import sizeof

    try:
        return int(sizeof(value))
    except Exception:
        return 1_000_000


def _is_reschedule(exc: BaseException) -> bool:
    cls = type(exc)
    return cls.__name__ == "Reschedule" and cls.__module__.startswith("distributed")


class _RecentLogs(logging.Handler):
    """Keeps this worker's recent log records for the ``get_logs`` RPC."""

    def __init__(self, maxlen: int = 10_000) -> None:
        super().__init__(logging.INFO)
        self.records: deque[tuple[str, str, float]] = deque(maxlen=maxlen)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, self.format(record), record.created))


class Worker:
    """One dask worker. ``await worker.start()`` registers it with the scheduler."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.id = f"clusterlaunch-worker-{uuid.uuid4().hex[:12]}"
        self.status = "init"
        self.name: str | None = options.name
        self.address = ""
        self.scheduler_address = options.scheduler_address
        self.nthreads = options.nthreads
        self.memory_limit = options.memory_limit
        # As dask's worker: scratch files (spilled values) go to the temp directory.
        self.local_directory = options.local_directory or tempfile.gettempdir()
        self.memory = MemoryThresholds(options.memory_limit)
        self.state = self._new_state()
        self.server = Server(
            {
                "get_data": self.get_data,
                "update_data": self.update_data,
                "free_keys": self.free_keys,
                "gather": self.gather,
                "terminate": self.terminate,
                "close": self.terminate,
                "ping": self.ping,
                "keys": self.keys,
                "run": self.run,
                "run_coroutine": self.run,
                "versions": self.versions,
                "get_logs": self.get_logs,
                "get_story": self.get_story,
                "call_stack": self.call_stack,
            },
            stream_handlers={
                op: functools.partial(self._on_scheduler_message, op) for op in SCHEDULER_STREAM_OPS
            },
            name="worker",
        )
        self.pool = ConnectionPool(limit=512)
        self.batched: BatchedSend | None = None
        self.transfer_outgoing_count = 0
        self.transfer_outgoing_count_total = 0
        self.transfer_outgoing_bytes = 0
        self.transfer_incoming_count_total = 0
        self.bandwidth = TransferBandwidth()
        self.ticks = LoopTicks(time.monotonic())
        self.scheduler_clock = SchedulerClock()
        self.heartbeat_interval = options.heartbeat_interval
        self.logs = _RecentLogs()
        self._executor = ThreadPoolExecutor(options.nthreads, thread_name_prefix="task")
        self._process = psutil.Process()
        self._background: set[asyncio.Task] = set()
        self._session = 0  # bumped on each registration; stale results are dropped
        self._closed = asyncio.Event()
        self._close_task: asyncio.Task | None = None
        #: Executor thread id -> key of the task it runs.
        self._task_threads: dict[int, Any] = {}
        self._last_io = (time.monotonic(), psutil.net_io_counters(), psutil.disk_io_counters())

    def __repr__(self) -> str:
        counts = ", ".join(f"{state}: {n}" for state, n in self.state.summary().items())
        return (
            f"<Worker {self.address or 'not started'} {self.status}, "
            f"threads: {self.nthreads}, tasks: {{{counts}}}, stored: {len(self.state.data)}>"
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Worker:
        """Listen, register with the scheduler, and start serving.

        Raises ``OSError`` naming the scheduler if it can't be reached within the
        death timeout.
        """
        scheduler_host, _ = parse_address(self.scheduler_address)
        host = self.options.host or ""
        bind_host = host or ("127.0.0.1" if _is_loopback(scheduler_host) else "0.0.0.0")
        if self.options.contact_address:
            contact_host = parse_address(self.options.contact_address)[0]
        elif is_wildcard(bind_host):
            contact_host = routable_ip(scheduler_host)
        else:
            contact_host = bind_host
        await self.server.listen(
            format_address(bind_host, self.options.port), contact_host=contact_host
        )
        self.address = self.options.contact_address or self.server.address
        self.name = self.name or self.address
        logging.getLogger("clusterlaunch").addHandler(self.logs)
        self.state.address = self.address
        await self._register(timeout=self.options.death_timeout)
        self._spawn(self._heartbeat_loop())
        self._spawn(self._tick_loop())
        self._spawn(self._find_missing_loop())
        if self.memory.limit:
            self._spawn(self._memory_monitor_loop())
        if self.options.lifetime:
            self._spawn(self._close_after_lifetime(self.options.lifetime))
        return self

    async def __aenter__(self) -> Worker:
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def finished(self) -> None:
        """Wait until the worker has closed."""
        await self._closed.wait()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _register(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        last_error: BaseException | None = None
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise OSError(
                    f"could not register with the scheduler at {self.scheduler_address} "
                    f"within {timeout:g} s ({last_error}); check that it is running and "
                    "reachable from here, or wait longer with --death-timeout"
                )
            comm = None
            try:
                comm = await connect(self.scheduler_address, timeout=min(remaining or 10.0, 10.0))
                sent = time.time()
                await comm.write(self._registration())
                response = await asyncio.wait_for(comm.read(), min(remaining or 30.0, 30.0))
                break
            except (OSError, asyncio.TimeoutError, ProtocolError) as e:
                if comm is not None:
                    comm.abort()  # a half-done registration leaves nothing behind
                last_error = e
                logger.info(
                    "%s: waiting for the scheduler at %s: %s",
                    self.address,
                    self.scheduler_address,
                    e,
                )
                await asyncio.sleep(0.2)
        if not isinstance(response, dict) or response.get("status") != "OK":
            comm.abort()
            reason = response.get("message", response) if isinstance(response, dict) else response
            raise ValueError(f"scheduler at {self.scheduler_address} refused this worker: {reason}")
        if response.get("warning"):
            logger.warning("%s: %s", self.address, response["warning"])
        self.scheduler_clock.observe(sent, time.time(), response.get("time"))
        self.heartbeat_interval = response.get("heartbeat-interval", self.heartbeat_interval)
        self._session += 1
        self.batched = BatchedSend(interval=0.002)
        self.batched.start(comm)
        self.status = "running"
        logger.info("%s: registered with %s", self.address, self.scheduler_address)
        self._spawn(self._serve_scheduler(comm, self._session))

    def _registration(self) -> dict[str, Any]:
        return {
            "op": "register-worker",
            "reply": False,
            "address": self.address,
            "status": "running",
            "nthreads": self.nthreads,
            "name": self.name,
            "now": time.time(),
            "resources": dict(self.options.resources),
            "memory_limit": self.memory_limit or None,
            "local_directory": self.local_directory,
            "services": {},
            "nanny": None,
            "pid": os.getpid(),
            "versions": versions_info(),
            "metrics": self.metrics(),
            "extra": {"clusterlaunch": __version__},
            "stimulus_id": f"worker-connect-{time.time()}",
            "server_id": self.id,
        }

    async def _serve_scheduler(self, comm: Comm, session: int) -> None:
        try:
            await self.server.handle_stream(comm)
        except ProtocolError as e:
            logger.error("%s: bad message from the scheduler: %s", self.address, e)
        finally:
            comm.abort()
        if self.status in ("closing", "closed") or session != self._session:
            return
        if self.options.death_timeout is None:
            logger.info("%s: lost the scheduler; closing", self.address)
            self._spawn(self.close(reason="scheduler-connection-lost", report=False))
            return
        logger.warning(
            "%s: lost the scheduler; reconnecting for up to %g s",
            self.address,
            self.options.death_timeout,
        )
        self._reset_state()
        try:
            await self._register(timeout=self.options.death_timeout)
        except (OSError, ValueError) as e:
            logger.error("%s: %s; closing", self.address, e)
            self._spawn(self.close(reason="scheduler-unreachable", report=False))

    def _reset_state(self) -> None:
        """A new registration starts empty: the scheduler forgot all we held."""
        self._session += 1
        self.status = "init"
        self._close_data()
        self.state = self._new_state()

    def _new_state(self) -> sm.WorkerState:
        # Without a memory limit nothing is ever spilled: a plain dict is cheapest.
        data: MutableMapping = (
            SpillBuffer(self.local_directory, self.memory.managed_target, _sizeof)
            if self.memory.limit
            else {}
        )
        return sm.WorkerState(
            address=self.address,
            nthreads=self.nthreads,
            resources=self.options.resources,
            data=data,
            validate=VALIDATE_STATE,
        )

    def _close_data(self) -> None:
        if isinstance(self.state.data, SpillBuffer):
            self.state.data.close()

    async def close(self, reason: str = "", *, report: bool = True) -> None:
        """Stop work, tell the scheduler (unless it's gone), and release everything."""
        await asyncio.shield(self._begin_close(reason, report))

    def _begin_close(self, reason: str, report: bool) -> asyncio.Task:
        """Mark the worker closing at once and start closing it (only the first call).

        The status changes before anything else runs, so that what happens meanwhile
        (the end of the scheduler stream that asked us to close, say) sees a worker
        that is closing rather than one that lost its scheduler.
        """
        if self._close_task is None:
            previous = self.status
            if previous != "closed":
                self.status = "closing"
            self._close_task = asyncio.get_running_loop().create_task(
                self._close(reason, report, previous)
            )
        return self._close_task

    async def _close(self, reason: str, report: bool, previous: str) -> None:
        if previous == "closed":
            return
        logger.info("%s: closing (%s)", self.address, reason or "requested")
        batched = self.batched
        if report and batched is not None and previous == "running" and not batched.closed():
            with contextlib.suppress(CommClosedError):
                batched.send(
                    {
                        "op": "worker-status-change",
                        "status": "closing",
                        "stimulus_id": f"worker-close-{time.time()}",
                    },
                    {"op": "close-stream"},
                )
        if batched is not None:
            with contextlib.suppress(Exception):
                await batched.close(timeout=2.0)
        current = asyncio.current_task()
        for task in list(self._background):
            if task is not current:
                task.cancel()
        await self.server.stop()
        await self.pool.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._close_data()
        logging.getLogger("clusterlaunch").removeHandler(self.logs)
        self.status = "closed"
        self._closed.set()

    async def _close_after_lifetime(self, lifetime: float) -> None:
        await asyncio.sleep(lifetime)
        logger.info("%s: lifetime of %g s reached; retiring", self.address, lifetime)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.pool(self.scheduler_address).retire_workers(
                    workers=[self.address],
                    close_workers=False,
                    remove=True,
                    stimulus_id=f"worker-lifetime-{time.time()}",
                ),
                30,
            )
        await self.close(reason="lifetime")

    # ---------------------------------------------------------- state machine I/O

    def handle_events(self, *events: sm.Event) -> None:
        """Feed the state machine and carry out what it says."""
        for instruction in self.state.handle(*events, now=time.time()):
            self._carry_out(instruction)

    def _carry_out(self, instruction: sm.Instruction) -> None:
        if isinstance(instruction, sm.SendMessageToScheduler):
            if self.batched is not None and not self.batched.closed():
                self.batched.send(instruction.to_dict())
        elif isinstance(instruction, sm.Execute):
            self._start_execution(instruction)
        elif isinstance(instruction, sm.GatherDep):
            self._spawn(self._gather_dep(instruction, self._session))
        elif isinstance(instruction, sm.RetryBusyWorkerLater):
            session = self._session
            asyncio.get_running_loop().call_later(
                BUSY_RETRY_DELAY,
                self._feed_if_current,
                session,
                sm.RetryBusyWorker(
                    worker=instruction.worker, stimulus_id=f"retry-busy-worker-{time.time()}"
                ),
            )
        elif isinstance(instruction, sm.DropPeer):
            self.pool.remove(instruction.worker)
        elif isinstance(instruction, sm.CloseWorker):
            self._begin_close(instruction.reason, report=False)
        else:
            raise TypeError(f"unknown instruction {instruction!r}")

    def _feed_if_current(self, session: int, event: sm.Event) -> None:
        if session == self._session and self.status not in ("closing", "closed"):
            self.handle_events(event)

    def _on_scheduler_message(self, op: str, **msg: Any) -> None:
        try:
            event = sm.scheduler_message_to_event({"op": op, **msg})
        except ValueError as e:
            logger.warning("%s: ignoring scheduler message: %s", self.address, e)
            return
        self.handle_events(event)

    # ------------------------------------------------------------------ execution

    def _start_execution(self, instruction: sm.Execute) -> None:
        run_spec = instruction.run_spec
        try:
            if isinstance(run_spec, Undecodable):
                raise _task_decode_error(run_spec.error)
            # Read the inputs now: the next event may release them from data.
            data = {key: self.state.data[key] for key in run_spec.dependencies}
        except Exception as e:
            self.handle_events(self._failure_event(instruction, e, None, None))
            return
        session = self._session
        if _is_coroutine_task(run_spec):
            self._spawn(self._execute_coroutine(instruction, run_spec, data, session))
            return
        loop = asyncio.get_running_loop()
        task_threads = self._task_threads

        def run_and_report() -> None:
            # Straight back to the loop from the task's thread: no asyncio future and
            # no task in between, each of which would cost a turn of the loop.
            outcome = _run_task(run_spec, data, instruction.key, task_threads)
            with contextlib.suppress(RuntimeError):  # the loop closed while it ran
                loop.call_soon_threadsafe(self._execution_done, instruction, session, outcome)

        self._executor.submit(run_and_report)

    async def _execute_coroutine(
        self, instruction: sm.Execute, run_spec: Any, data: dict, session: int
    ) -> None:
        outcome = await _run_coroutine_task(run_spec, data)
        self._execution_done(instruction, session, outcome)

    def _execution_done(
        self,
        instruction: sm.Execute,
        session: int,
        outcome: tuple[Any, BaseException | None, float, float, int],
    ) -> None:
        value, exc, start, stop, thread = outcome
        start, stop = map(self.scheduler_clock.to_scheduler, (start, stop))
        if exc is None:
            event: sm.Event = sm.ExecuteSuccess(
                key=instruction.key,
                run_id=instruction.run_id,
                value=value,
                nbytes=_sizeof(value),
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
            logger.warning("%s: task %r failed: %r", self.address, instruction.key, exc)
            event = self._failure_event(instruction, exc, start, stop, thread)
        self._feed_if_current(session, event)

    @staticmethod
    def _failure_event(
        instruction: sm.Execute,
        exc: BaseException,
        start: float | None,
        stop: float | None,
        thread: int | None = None,
    ) -> sm.ExecuteFailure:
        return sm.ExecuteFailure(
            key=instruction.key,
            run_id=instruction.run_id,
            **_failure_fields(exc),
            start=start,
            stop=stop,
            thread=thread,
            stimulus_id=f"task-erred-{time.time()}",
        )

    # -------------------------------------------------------------- transfers in

    async def _gather_dep(self, instruction: sm.GatherDep, session: int) -> None:
        peer = instruction.worker
        stimulus_id = f"gather-dep-{time.time()}"
        self.transfer_incoming_count_total += 1
        start = time.time()
        try:
            response = await asyncio.wait_for(
                fetch_from_peer(self.pool, peer, instruction.keys, who=self.address),
                TRANSFER_TIMEOUT,
            )
        except (OSError, asyncio.TimeoutError, ProtocolError) as e:
            logger.info("%s: fetching from %s failed: %s", self.address, peer, e)
            event: sm.Event = sm.GatherDepNetworkFailure(worker=peer, stimulus_id=stimulus_id)
        except Exception as e:
            event = sm.GatherDepFailure(worker=peer, **_failure_fields(e), stimulus_id=stimulus_id)
        else:
            if response.get("status") == "busy":
                event = sm.GatherDepBusy(worker=peer, stimulus_id=stimulus_id)
            else:
                data = dict(response.get("data") or {})
                undecodable = {k: v for k, v in data.items() if isinstance(v, Undecodable)}
                if undecodable:
                    error = next(iter(undecodable.values())).error
                    logger.warning(
                        "%s: data from %s could not be decoded: %s", self.address, peer, error
                    )
                    event = sm.GatherDepFailure(
                        worker=peer, **_failure_fields(error), stimulus_id=stimulus_id
                    )
                else:
                    stop = time.time()
                    self._record_bandwidth(peer, data, stop - start)
                    event = sm.GatherDepSuccess(
                        worker=peer,
                        data=data,
                        start=self.scheduler_clock.to_scheduler(start),
                        stop=self.scheduler_clock.to_scheduler(stop),
                        stimulus_id=stimulus_id,
                    )
        self._feed_if_current(session, event)

    def _record_bandwidth(self, peer: str, data: Mapping, seconds: float) -> None:
        tasks = self.state.tasks
        nbytes = sum(tasks[key].get_nbytes() for key in data if key in tasks)
        types = {sm.typename(type(value)) for value in data.values()}
        self.bandwidth.record(peer, nbytes, seconds, types)

    # ------------------------------------------------------------------ RPC handlers

    async def get_data(self, comm: Comm, keys: Collection, who: str | None = None, **_: Any) -> Any:
        limit = TRANSFER_OUTGOING_COUNT_LIMIT
        if _same_host(comm.peer_address, self.address):
            limit *= 2
        if self.state.status == "paused":
            limit = 1
        if self.transfer_outgoing_count >= limit:
            return {"status": "busy"}
        data = {key: self.state.data[key] for key in keys if key in self.state.data}
        nbytes = sum(self.state.tasks[key].get_nbytes() for key in data if key in self.state.tasks)
        self.transfer_outgoing_count += 1
        self.transfer_outgoing_count_total += 1
        self.transfer_outgoing_bytes += nbytes
        try:
            await comm.write(
                {"status": "OK", "data": {key: Serialize(value) for key, value in data.items()}}
            )
            ack = await comm.read()
            if ack != "OK":
                logger.warning(
                    "%s: unexpected get_data acknowledgement %r from %s", self.address, ack, who
                )
        finally:
            self.transfer_outgoing_count -= 1
            self.transfer_outgoing_bytes -= nbytes
        return NO_REPLY

    def update_data(self, data: Mapping, stimulus_id: str | None = None, **_: Any) -> dict:
        bad = [key for key, value in data.items() if isinstance(value, Undecodable)]
        if bad:
            raise ValueError(f"could not decode the values of {bad!r}: {data[bad[0]].error}")
        nbytes = {key: _sizeof(value) for key, value in data.items()}
        self.handle_events(
            sm.UpdateData(
                data=dict(data),
                nbytes=nbytes,
                stimulus_id=stimulus_id or f"update-data-{time.time()}",
            )
        )
        return {"nbytes": nbytes, "status": "OK"}

    def free_keys(self, keys: Collection, stimulus_id: str | None = None, **_: Any) -> str:
        self.handle_events(
            sm.FreeKeys(keys=tuple(keys), stimulus_id=stimulus_id or f"free-keys-{time.time()}")
        )
        return "OK"

    async def gather(self, who_has: Mapping[Any, Collection[str]], **_: Any) -> dict:
        """Fetch ``who_has``'s keys from their holders (the scheduler's replicate/rebalance)."""
        failed = []
        fetched: dict = {}
        by_peer: dict[str, list] = {}
        for key, holders in who_has.items():
            if key in self.state.data:
                continue
            if not holders:
                failed.append(key)
                continue
            by_peer.setdefault(next(iter(holders)), []).append(key)
        for peer, keys in by_peer.items():
            try:
                response = await fetch_from_peer(self.pool, peer, keys, who=self.address)
            except (OSError, ProtocolError):
                failed.extend(keys)
                continue
            data = {
                k: v
                for k, v in (response.get("data") or {}).items()
                if not isinstance(v, Undecodable)
            }
            fetched.update(data)
            failed.extend(k for k in keys if k not in data)
        if fetched:
            self.update_data(fetched, stimulus_id=f"gather-{time.time()}")
        if failed:
            return {"status": "partial-fail", "keys": failed}
        return {"status": "OK"}

    def terminate(self, reason: str = "", **_: Any) -> str:
        """Close soon; the reply goes out first."""
        self._begin_close(reason or "terminate", report=True)
        return "OK"

    def ping(self) -> bytes:
        return b"pong"

    def keys(self) -> list:
        return list(self.state.data)

    async def run(
        self, function: Any, args: Any = (), kwargs: Any = None, wait: bool = True, **_: Any
    ) -> dict:
        """``Client.run``: call ``function`` in this process, outside the task graph."""
        try:
            function = _unpickle_if_bytes(function)
            args = _unpickle_if_bytes(args) or ()
            kwargs = dict(_unpickle_if_bytes(kwargs) or {})
            parameters = inspect.signature(function).parameters
            if "dask_worker" in parameters:
                kwargs["dask_worker"] = self
            result = function(*args, **kwargs)
            if inspect.isawaitable(result):
                if wait:
                    result = await result
                else:
                    self._spawn(result)
                    result = None
        except Exception as e:
            logger.warning("%s: Client.run function failed: %r", self.address, e)
            return error_message(e)
        return {"status": "OK", "result": Serialize(result)}

    def versions(self, **_: Any) -> dict:
        return versions_info()

    def get_logs(self, start: float = 0, n: int | None = None, timestamps: bool = False) -> list:
        records = [r for r in self.logs.records if r[2] > start]
        if n is not None:
            records = records[-n:]
        if timestamps:
            return list(records)
        return [(level, message) for level, message, _ in records]

    def get_story(self, keys_or_stimuli: Collection = (), **_: Any) -> list:
        """``Client.story``: this worker's logged transitions of these keys or stimuli,
        each ``(key, from state, to state, stimulus_id)``."""
        wanted = {_hashable(k) for k in keys_or_stimuli}
        return [list(entry) for entry in self.state.log if entry[0] in wanted or entry[3] in wanted]

    def call_stack(self, keys: Collection | None = None, **_: Any) -> dict:
        """``Client.call_stack``: where each task running in a thread is, as traceback lines."""
        frames = sys._current_frames()
        running = {
            key: frames[tid] for tid, key in list(self._task_threads.items()) if tid in frames
        }
        if keys is not None:
            wanted = {_hashable(k) for k in keys}
            running = {key: frame for key, frame in running.items() if key in wanted}
        return {key: traceback.format_stack(frame) for key, frame in running.items()}

    # --------------------------------------------------------------- periodic work

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if self.status != "running":
                continue
            sent = time.time()
            try:
                response = await asyncio.wait_for(
                    self.pool(self.scheduler_address).heartbeat_worker(
                        address=self.address,
                        now=time.time(),
                        metrics=self.metrics(),
                        executing=self.state.executing_durations(time.time()),
                        extensions={},
                    ),
                    max(10.0, 5 * self.heartbeat_interval),
                )
            except (OSError, asyncio.TimeoutError, ProtocolError) as e:
                logger.info("%s: heartbeat failed: %s", self.address, e)
                continue
            if response.get("status") == "missing":
                logger.warning(
                    "%s: the scheduler no longer knows this worker; closing", self.address
                )
                self._spawn(self.close(reason="heartbeat-missing", report=False))
                return
            self.scheduler_clock.observe(sent, time.time(), response.get("time"))
            self.bandwidth.clear_samples()
            self.heartbeat_interval = response.get("heartbeat-interval", self.heartbeat_interval)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            duration = self.ticks.tick(time.monotonic())
            if duration > TICK_LIMIT:
                logger.info(
                    "%s: event loop was unresponsive for %.2f s; task code holding the GIL "
                    "or moving large values can cause this, and timeouts with it",
                    self.address,
                    duration,
                )

    def _spilled_total(self) -> tuple[int, int]:
        data = self.state.data
        return data.spilled_total if isinstance(data, SpillBuffer) else (0, 0)

    async def _memory_monitor_loop(self) -> None:
        """Spill and pause by process memory, as dask's worker memory monitor does."""
        while True:
            await asyncio.sleep(MEMORY_MONITOR_INTERVAL)
            if self.status != "running":
                continue
            process_bytes = self._process.memory_info().rss
            data = self.state.data
            excess = self.memory.bytes_to_spill(process_bytes)
            if excess and isinstance(data, SpillBuffer) and data.fast_bytes:
                freed = data.evict_until(max(0.0, data.fast_bytes - excess))
                if freed:
                    logger.info(
                        "%s: process memory %d MiB past the spill threshold; spilled %d MiB",
                        self.address,
                        process_bytes >> 20,
                        freed >> 20,
                    )
                process_bytes = self._process.memory_info().rss
            paused = self.state.status == "paused"
            if self.memory.should_pause(process_bytes) != paused:
                if paused:
                    logger.info("%s: memory back under the pause threshold; resuming", self.address)
                    event: sm.Event = sm.Unpause(stimulus_id=f"unpause-{time.time()}")
                else:
                    logger.warning(
                        "%s: process memory %d MiB is past %d%% of the %d MiB limit; pausing",
                        self.address,
                        process_bytes >> 20,
                        int(self.memory.pause_fraction * 100),
                        self.memory.limit >> 20,
                    )
                    event = sm.Pause(stimulus_id=f"pause-{time.time()}")
                self.handle_events(event)

    async def _find_missing_loop(self) -> None:
        while True:
            await asyncio.sleep(FIND_MISSING_INTERVAL)
            if self.status == "running" and self.state.missing:
                self.handle_events(sm.FindMissing(stimulus_id=f"find-missing-{time.time()}"))

    def metrics(self) -> dict[str, Any]:
        """What the heartbeat reports; the scheduler and dashboard read these keys."""
        now = time.monotonic()
        net, disk = psutil.net_io_counters(), psutil.disk_io_counters()
        last_time, last_net, last_disk = self._last_io
        elapsed = max(now - last_time, 1e-3)
        self._last_io = (now, net, disk)

        def rate(new: Any, old: Any, field: str) -> float:
            if new is None or old is None:
                return 0.0
            return max(0.0, (getattr(new, field) - getattr(old, field)) / elapsed)

        with self._process.oneshot():
            memory = self._process.memory_info().rss
            cpu = self._process.cpu_percent()
            num_fds = self._process.num_fds()
        state = self.state
        return {
            "task_counts": state.summary(),
            "bandwidth": self.bandwidth.report(),
            "digests_total_since_heartbeat": {},
            "managed_bytes": state.nbytes,
            "spilled_bytes": dict(zip(("memory", "disk"), self._spilled_total())),
            "transfer": {
                "incoming_bytes": state.transfer_incoming_bytes,
                "incoming_count": len(state.in_flight_workers),
                "incoming_count_total": self.transfer_incoming_count_total,
                "outgoing_bytes": self.transfer_outgoing_bytes,
                "outgoing_count": self.transfer_outgoing_count,
                "outgoing_count_total": self.transfer_outgoing_count_total,
            },
            "event_loop_interval": self.ticks.cycle(now),
            "cpu": cpu,
            "memory": memory,
            "time": time.time(),
            "host_net_io": {
                "read_bps": rate(net, last_net, "bytes_recv"),
                "write_bps": rate(net, last_net, "bytes_sent"),
            },
            "host_disk_io": {
                "read_bps": rate(disk, last_disk, "read_bytes"),
                "write_bps": rate(disk, last_disk, "write_bytes"),
            },
            "num_fds": num_fds,
        }


# ------------------------------------------------------------------ free functions


#: Why some dask work fails on our workers, and what to do instead.
DASK_WORKER_ONLY = (
    "P2P shuffles, merges and rechunks, get_worker() and worker_client() need dask's own"
    " workers; for shuffles and rechunks use dask.config.set("
    "{'dataframe.shuffle.method': 'tasks', 'array.rechunk.method': 'tasks'})"
)


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


def _failure_fields(exc: BaseException) -> dict[str, Any]:
    """The exception fields of a failure event: pickled as dask sends them, and as text."""
    fields = error_message(exc)
    traceback = fields["traceback"]
    return {
        "exception": fields["exception"].data,
        "traceback": traceback.data if traceback is not None else None,
        "exception_text": fields["exception_text"],
        "traceback_text": fields["traceback_text"],
    }


def _run_task(
    run_spec: Any, data: dict, key: Any, task_threads: dict[int, Any]
) -> tuple[Any, BaseException | None, float, float, int]:
    """Run a task in an executor thread; never raises (but for SystemExit and such).

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


async def _run_coroutine_task(
    run_spec: Any, data: dict
) -> tuple[Any, BaseException | None, float, float, int]:
    start = time.time()
    try:
        value, exc = await run_spec(data), None
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        value, exc = None, e
    return value, exc, start, time.time(), threading.get_ident()


async def fetch_from_peer(
    pool: ConnectionPool, peer: str, keys: Collection, *, who: str | None = None
) -> dict:
    """A peer's ``get_data`` reply for ``keys``, acknowledged as dask's peers expect."""
    comm = await pool.connect(peer)
    try:
        # Stock workers then send everything as pickle, which every worker can read.
        response = await send_recv(
            comm, op="get_data", keys=list(keys), who=who, serializers=["pickle"]
        )
        if not isinstance(response, dict):
            raise ProtocolError(f"unexpected get_data reply from {peer}: {response!r:.200}")
        if response.get("status") == "OK":
            await comm.write("OK")
        return response
    finally:
        pool.reuse(peer, comm)


def _hashable(key: Any) -> Any:
    """A key as the state machine holds it: tuple keys may arrive as lists."""
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _unpickle_if_bytes(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return pickling.loads(value)
    if isinstance(value, Undecodable):
        raise value.error
    return value


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _same_host(a: str, b: str) -> bool:
    try:
        return parse_address(a)[0] == parse_address(b)[0]
    except ValueError:
        return False


__all__ = ["Worker", "fetch_from_peer"]
