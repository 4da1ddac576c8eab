"""The async shell of a worker: its life, and the I/O of the state machine ``WorkerState``.

Everything that happens — a scheduler message, a finished task, a completed transfer —
becomes an event for the state machine; the shell carries out the instructions it
returns and keeps no task bookkeeping of its own. It speaks to the real dask
scheduler, clients and peers (ours or stock dask workers) over ``clusterlaunch.comm``
and imports distributed only through the dask-worker surface (``surface``), when a
task or plugin needs it.

``Worker`` here listens, registers (and re-registers after losing the scheduler),
feeds events and carries out instructions, and closes. Each other concept is a
component it holds, in a module of its own: ``execution`` (task threads and coroutine
tasks), ``transfers`` (fetching from peers, serving get_data), ``handlers`` (the RPC
ops), ``heartbeat`` (heartbeat, loop ticks, metrics) and ``memory`` (spilling, the
memory monitor). Every asyncio task and timer any of them starts is owned by the
worker's one ``BackgroundTasks``; close ends all of it before it closes what that
work uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any

from clusterlaunch import __version__
from clusterlaunch.comm.addressing import (
    address_scheme,
    format_address,
    is_wildcard,
    parse_address,
    routable_ip,
)
from clusterlaunch.comm.background import BackgroundTasks
from clusterlaunch.comm.batched import BatchedSend
from clusterlaunch.comm.rpc import ConnectionPool
from clusterlaunch.comm.server import Server
from clusterlaunch.comm.tcp import Comm, CommClosedError, connect
from clusterlaunch.comm.timeouts import wait_for
from clusterlaunch.protocol import ProtocolError
from clusterlaunch.protocol.versions import versions_info
from clusterlaunch.worker import state as sm
from clusterlaunch.worker.actors import ActorHost
from clusterlaunch.worker.execution import Execution
from clusterlaunch.worker.handlers import Handlers, RecentLogs
from clusterlaunch.worker.heartbeat import Heartbeat
from clusterlaunch.worker.memory import MemoryMonitor, MemoryThresholds, SpillBuffer, sizeof
from clusterlaunch.worker.messages import WorkerStatusChangeMsg
from clusterlaunch.worker.metrics import SchedulerClock
from clusterlaunch.worker.options import WorkerOptions
from clusterlaunch.worker.plugins import WorkerPlugins
from clusterlaunch.worker.profiler import Profiler
from clusterlaunch.worker.surface import (
    DaskWorker,
    distributed_import,
    hand_context_to_distributed,
)
from clusterlaunch.worker.transfers import Transfers

logger = logging.getLogger("clusterlaunch.worker")

#: Seconds before asking a busy peer again.
BUSY_RETRY_DELAY = 0.15
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
#: Seconds close gives the scheduler stream to send what is queued.
STREAM_CLOSE_TIMEOUT = 2.0
#: Seconds close gives the background work to end once cancelled.
BACKGROUND_CLOSE_TIMEOUT = 5.0
#: CLUSTERLAUNCH_VALIDATE_STATE=1 checks the state machine's invariants after every
#: event: a debug aid, O(tasks) each time.
VALIDATE_STATE = os.environ.get("CLUSTERLAUNCH_VALIDATE_STATE", "") == "1"


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
        self.worker_plugins = WorkerPlugins(self)
        #: name -> worker plugin, as ``dask_worker.plugins``.
        self.plugins = self.worker_plugins.by_name
        self.tls = options.tls_config()
        self.state = self._new_state()
        #: The owner of every asyncio task and timer of this worker and its components.
        self.background = BackgroundTasks(f"worker {self.id}")
        self.pool = ConnectionPool(limit=512, tls=self.tls)
        self.batched: BatchedSend | None = None
        self.scheduler_clock = SchedulerClock()
        self.logs = RecentLogs()
        self.execution = Execution(self)
        self.profiler = Profiler(
            self.execution.task_threads,
            clock=lambda: self.scheduler_clock.to_scheduler(time.time()),
            busy=lambda: bool(self.state.executing or self.state.long_running),
            on_settings=lambda settings: self.logs.configure(
                settings.log_length, settings.log_format
            ),
        )
        self.transfers = Transfers(self)
        self.heartbeat = Heartbeat(self)
        self.memory_monitor = MemoryMonitor(self)
        self.handlers = Handlers(self)
        self.actor_host = ActorHost(self)
        self._surface = DaskWorker(self)
        #: The event loop the worker runs on (set by ``start``).
        self.asyncio_loop: asyncio.AbstractEventLoop | None = None
        self.server = Server(
            self._rpc_handlers(),
            stream_handlers={
                op: functools.partial(self._on_scheduler_message, op) for op in SCHEDULER_STREAM_OPS
            },
            name="worker",
        )
        #: Bumped on each registration; results of an earlier one are dropped.
        self.session = 0
        self._closed = asyncio.Event()
        self._close_task: asyncio.Task | None = None

    def __repr__(self) -> str:
        counts = ", ".join(f"{state}: {n}" for state, n in self.state.summary().items())
        return (
            f"<Worker {self.address or 'not started'} {self.status}, "
            f"threads: {self.nthreads}, tasks: {{{counts}}}, stored: {len(self.state.data)}>"
        )

    def _rpc_handlers(self) -> dict[str, Callable[..., Any]]:
        handlers = self.handlers
        return {
            "get_data": self.transfers.get_data,
            "update_data": handlers.update_data,
            "free_keys": handlers.free_keys,
            "gather": handlers.gather,
            "terminate": handlers.terminate,
            "close": handlers.terminate,
            "ping": handlers.ping,
            "keys": handlers.keys,
            "run": handlers.run,
            "run_coroutine": handlers.run,
            "versions": handlers.versions,
            "get_logs": handlers.get_logs,
            "get_story": handlers.get_story,
            "call_stack": handlers.call_stack,
            "plugin-add": self.worker_plugins.add,
            "plugin-remove": self.worker_plugins.remove,
            "upload_file": self.worker_plugins.upload_file,
            "actor_execute": self.actor_host.execute,
            "actor_attribute": self.actor_host.attribute,
            "profile": handlers.profile,
            "profile_metadata": handlers.profile_metadata,
            "dump_state": handlers.dump_state,
            "identity": handlers.identity,
            "echo": handlers.echo,
            "benchmark_disk": handlers.benchmark_disk,
            "benchmark_memory": handlers.benchmark_memory,
            "benchmark_network": handlers.benchmark_network,
            "get_monitor_info": handlers.get_monitor_info,
        }

    def dask_surface(self) -> DaskWorker:
        """The worker as code written for distributed's finds it (``get_worker()``,
        plugins' ``setup(worker)``); distributed is imported only by what it reaches."""
        return self._surface

    def send_to_scheduler(self, msg: dict[str, Any]) -> None:
        """Send ``msg`` on the scheduler stream (dropped while there is none)."""
        if self.batched is not None and not self.batched.closed():
            self.batched.send(msg)

    def metrics(self) -> dict[str, Any]:
        """What registration and the heartbeat report about this worker."""
        return self.heartbeat.metrics()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Worker:
        """Listen, register with the scheduler, and start serving.

        Raises ``OSError`` naming the scheduler if it can't be reached within the
        death timeout.
        """
        self.asyncio_loop = asyncio.get_running_loop()
        # Once anything imports distributed, it finds the worker of a task where ours are.
        distributed_import.add(hand_context_to_distributed)
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
            format_address(bind_host, self.options.port, address_scheme(self.scheduler_address)),
            contact_host=contact_host,
            tls=self.tls,
        )
        if self._closing():  # closed (a signal, say) before it listened: stop again
            await self.server.stop()
            return self
        self.address = self.options.contact_address or self.server.address
        self.name = self.name or self.address
        self.background.owner = f"worker {self.address}"
        logging.getLogger().addHandler(self.logs)
        self.state.address = self.address
        await self._register(timeout=self.options.death_timeout)
        if self.status != "running":  # closed while it registered
            return self
        spawn = self.background.spawn
        spawn(self.heartbeat.heartbeat_loop(), name="heartbeat")
        spawn(self.heartbeat.tick_loop(), name="loop ticks")
        spawn(self.profiler.run(), name="profiler")
        spawn(self.transfers.find_missing_loop(), name="find missing keys")
        if self.memory.limit:
            spawn(self.memory_monitor.run(), name="memory monitor")
        if self.options.lifetime:
            spawn(self._close_after_lifetime(self.options.lifetime), name="lifetime")
        return self

    async def __aenter__(self) -> Worker:
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def finished(self) -> None:
        """Wait until the worker has closed."""
        await self._closed.wait()

    def _closing(self) -> bool:
        return self.status in ("closing", "closed")

    async def _register(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        last_error: BaseException | None = None
        while True:
            if self._closing():
                return
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise OSError(
                    f"could not register with the scheduler at {self.scheduler_address} "
                    f"within {timeout:g} s ({last_error}); check that it is running and "
                    "reachable from here, or wait longer with --death-timeout"
                )
            comm = None
            try:
                comm = await connect(
                    self.scheduler_address, timeout=min(remaining or 10.0, 10.0), tls=self.tls
                )
                sent = time.time()
                await comm.write(self._registration())
                response = await wait_for(comm.read(), min(remaining or 30.0, 30.0))
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
        if self._closing():
            comm.abort()
            return
        if not isinstance(response, dict) or response.get("status") != "OK":
            comm.abort()
            reason = response.get("message", response) if isinstance(response, dict) else response
            raise ValueError(f"scheduler at {self.scheduler_address} refused this worker: {reason}")
        if response.get("warning"):
            logger.warning("%s: %s", self.address, response["warning"])
        self.scheduler_clock.observe(sent, time.time(), response.get("time"))
        self.heartbeat.interval = response.get("heartbeat-interval", self.heartbeat.interval)
        self.session += 1
        batched = self.batched = BatchedSend(interval=0.002)
        batched.start(comm)
        self.status = "running"
        # As dask's worker: plugins registered before we joined, set up before any task.
        await self.worker_plugins.add_registered(response.get("worker-plugins") or {})
        if self._closing():
            return
        logger.info("%s: registered with %s", self.address, self.scheduler_address)
        self.background.spawn(
            self._serve_scheduler(comm, batched, self.session), name="scheduler stream"
        )

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

    async def _serve_scheduler(self, comm: Comm, batched: BatchedSend, session: int) -> None:
        try:
            await self.server.handle_stream(comm)
        except ProtocolError as e:
            logger.error("%s: bad message from the scheduler: %s", self.address, e)
        finally:
            comm.abort()
        await batched.close()  # its comm is gone: this only ends its writer task
        if self._closing() or session != self.session:
            return
        if self.options.death_timeout is None:
            logger.info("%s: lost the scheduler; closing", self.address)
            self.begin_close("scheduler-connection-lost", report=False)
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
            self.begin_close("scheduler-unreachable", report=False)

    def _reset_state(self) -> None:
        """A new registration starts empty: the scheduler forgot all we held."""
        self.session += 1
        self.status = "init"
        self._close_data()
        self.state = self._new_state()

    def _new_state(self) -> sm.WorkerState:
        # Without a memory limit nothing is ever spilled: a plain dict is cheapest.
        data: MutableMapping = (
            SpillBuffer(self.local_directory, self.memory.managed_target, sizeof)
            if self.memory.limit
            else {}
        )
        state = sm.WorkerState(
            address=self.address,
            nthreads=self.nthreads,
            resources=self.options.resources,
            data=data,
            validate=VALIDATE_STATE,
        )
        state.on_transition = self.worker_plugins.transition_hook()
        return state

    def _close_data(self) -> None:
        if isinstance(self.state.data, SpillBuffer):
            self.state.data.close()

    async def close(self, reason: str = "", *, report: bool = True) -> None:
        """Stop work, tell the scheduler (unless it's gone), and release everything."""
        await asyncio.shield(self.begin_close(reason, report))

    def begin_close(self, reason: str = "", report: bool = True) -> asyncio.Task:
        """Mark the worker closing at once and start closing it (only the first call);
        returns the closing task, which the worker's ``BackgroundTasks`` owns.

        The status changes before anything else runs, so that what happens meanwhile
        (the end of the scheduler stream that asked us to close, say) sees a worker
        that is closing rather than one that lost its scheduler.
        """
        if self._close_task is None:
            previous = self.status
            if previous != "closed":
                self.status = "closing"
            self._close_task = self.background.spawn(
                self._close(reason, report, previous), name="close"
            )
        return self._close_task

    async def _close(self, reason: str, report: bool, previous: str) -> None:
        """Close in an order where nothing still running uses what was closed: the
        scheduler stream, then what brings work in (the server, whose connection
        handlers are cancelled and awaited), then the background work (cancelled and
        awaited), then what that work used (the pool, the task threads, the data)."""
        if previous == "closed":
            return
        logger.info("%s: closing (%s)", self.address, reason or "requested")
        await self.worker_plugins.close()
        batched = self.batched
        if report and batched is not None and previous == "running" and not batched.closed():
            with contextlib.suppress(CommClosedError):
                closing = WorkerStatusChangeMsg(
                    status="closing", stimulus_id=f"worker-close-{time.time()}"
                )
                batched.send(closing.to_dict(), {"op": "close-stream"})
        if batched is not None:
            await batched.close(timeout=STREAM_CLOSE_TIMEOUT)
        await self.server.stop()
        await self._surface.close_surface()
        await self.background.close(timeout=BACKGROUND_CLOSE_TIMEOUT)
        await self.pool.close()
        self.execution.close()
        self.actor_host.close()
        self._close_data()
        logging.getLogger().removeHandler(self.logs)
        self.status = "closed"
        self._closed.set()

    async def _close_after_lifetime(self, lifetime: float) -> None:
        await asyncio.sleep(lifetime)
        logger.info("%s: lifetime of %g s reached; retiring", self.address, lifetime)
        try:
            await wait_for(
                self.pool(self.scheduler_address).retire_workers(
                    workers=[self.address],
                    close_workers=False,
                    remove=True,
                    stimulus_id=f"worker-lifetime-{time.time()}",
                ),
                30,
            )
        except Exception as e:
            logger.info("%s: retiring failed: %s; closing anyway", self.address, e)
        self.begin_close("lifetime")

    # ---------------------------------------------------------- state machine I/O

    def handle_events(self, *events: sm.Event) -> None:
        """Feed the state machine and carry out what it says."""
        for instruction in self.state.handle(*events, now=time.time()):
            self._carry_out(instruction)

    def feed_if_current(self, session: int, event: sm.Event) -> None:
        """Feed ``event`` unless it belongs to an earlier registration or we're closing."""
        if session == self.session and not self._closing():
            self.handle_events(event)

    def _carry_out(self, instruction: sm.Instruction) -> None:
        if isinstance(instruction, sm.LongRunningMsg):
            self.send_to_scheduler(self._surface.long_running_message(instruction))
        elif isinstance(instruction, sm.SendMessageToScheduler):
            self.send_to_scheduler(instruction.to_dict())
        elif isinstance(instruction, sm.Execute):
            self.execution.start(instruction)
        elif isinstance(instruction, sm.GatherDep):
            self.background.spawn(
                self.transfers.gather_dep(instruction, self.session),
                name=f"gather from {instruction.worker}",
            )
        elif isinstance(instruction, sm.RetryBusyWorkerLater):
            self.background.call_later(
                BUSY_RETRY_DELAY,
                self.feed_if_current,
                self.session,
                sm.RetryBusyWorker(
                    worker=instruction.worker, stimulus_id=f"retry-busy-worker-{time.time()}"
                ),
            )
        elif isinstance(instruction, sm.DropPeer):
            self.pool.remove(instruction.worker)
        elif isinstance(instruction, sm.CloseWorker):
            self.begin_close(instruction.reason, report=False)
        else:
            raise TypeError(f"unknown instruction {instruction!r}")

    def _on_scheduler_message(self, op: str, **msg: Any) -> None:
        try:
            event = sm.scheduler_message_to_event({"op": op, **msg})
        except ValueError as e:
            logger.warning("%s: ignoring scheduler message: %s", self.address, e)
            return
        self.handle_events(event)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


__all__ = ["Worker"]
