"""``LocalCluster``: a real dask scheduler plus our workers, on this machine.

The embedded scheduler is the unmodified ``distributed.Scheduler``, run in a
subprocess of its own rather than in a thread of the user's process. Reasons:

* isolation: its event loop does not share the GIL with the user's code and the
  ``distributed.Client`` thread, so a busy notebook cannot stall scheduling, and a
  scheduler that crashes or hangs cannot take the user's process with it;
* nothing leaks: closing ends the process, so its port, threads and distributed's
  global state (config, logging, offload executor) are gone for sure -- what the
  pytest fixtures promise between tests;
* the cost is hidden: it boots in parallel with the fork server that starts our
  workers, and on a machine with two or more cores the two overlap.

Like the fork server, the scheduler process is started with a fixed entry point
(never by re-importing ``__main__``), so scripts need no ``if __name__ ==
"__main__":`` guard, and it stops when its parent dies (stdin EOF, parent-death
signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from clusterlaunch.comm.addressing import normalize_address
from clusterlaunch.forkserver import PARENT_DEATH_SIGNAL, set_parent_death_signal
from clusterlaunch.launcher import (
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_START_TIMEOUT,
    Launcher,
    LaunchError,
    _log_level,
    check_scheduler,
)

logger = logging.getLogger(__name__)

#: dask picks P2P shuffles and rechunks once a distributed.Client exists, and those
#: run only on dask's own workers: with ours, the task-based methods do the same job.
TASK_BASED_METHODS = {"dataframe.shuffle.method": "tasks", "array.rechunk.method": "tasks"}


def unchosen_task_methods() -> dict[str, str]:
    """The entries of ``TASK_BASED_METHODS`` whose key the user's dask config leaves unset."""
    import dask

    return {
        key: value
        for key, value in TASK_BASED_METHODS.items()
        if dask.config.get(key, None) is None
    }


# --------------------------------------------------------------------------------------
# The embedded scheduler process
# --------------------------------------------------------------------------------------


def _scheduler_main() -> None:
    """Entry point of the scheduler process: argv = parent pid, host, port, level, sys.path."""
    parent_pid, host, port, level = (
        int(sys.argv[1]),
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
    )
    set_parent_death_signal(PARENT_DEATH_SIGNAL)
    if os.getppid() != parent_pid:
        return
    # The scheduler unpickles task graphs, so it must import what the user's code can.
    sys.path[:] = json.loads(sys.argv[5])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve_scheduler(parent_pid, host, port, level))


async def _serve_scheduler(parent_pid: int, host: str, port: int, level: int) -> None:
    from distributed import Scheduler

    logging.getLogger("distributed").setLevel(level)
    # No dashboard; its HTTP server (health, metrics) gets a free port on our host.
    scheduler = Scheduler(host=host, port=port, dashboard=False, dashboard_address=f"{host}:0")
    await scheduler
    sys.stdout.write(json.dumps({"address": scheduler.address}) + "\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # nothing more for the pipe

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stdin() -> None:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:  # the launcher closed our stdin or died
            loop.remove_reader(0)
            stop.set()

    def on_parent_death_signal() -> None:
        if os.getppid() != parent_pid:
            stop.set()

    loop.add_reader(0, on_stdin)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(PARENT_DEATH_SIGNAL, on_parent_death_signal)
    finished = loop.create_task(scheduler.finished())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({finished, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not finished.done():
        await scheduler.close()
    finished.cancel()


class SchedulerProcess:
    """A ``distributed.Scheduler`` in a subprocess; ``address`` once it listens."""

    ENTRY = "from clusterlaunch.cluster import _scheduler_main; _scheduler_main()"

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, log_level: int = logging.WARNING
    ) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                self.ENTRY,
                str(os.getpid()),
                host,
                str(port),
                str(log_level),
                json.dumps(sys.path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
        )
        self.address: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_address(self, timeout: float) -> str:
        """Block until the scheduler listens; its address."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LaunchError(f"the dask scheduler did not start within {timeout:g} s")
                if not selector.select(remaining):
                    continue
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    code = self.process.wait()
                    raise LaunchError(
                        f"the dask scheduler exited with code {code} before it listened "
                        "(see its error above)"
                    )
                buffer += chunk
        self.address = normalize_address(json.loads(buffer.split(b"\n", 1)[0])["address"])
        self.process.stdout.close()
        return self.address

    def stop(self, timeout: float = 10.0) -> None:
        """Close the scheduler; kill it if it takes longer than ``timeout``."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None and not self.process.stdout.closed:
            self.process.stdout.close()


# --------------------------------------------------------------------------------------
# LocalCluster
# --------------------------------------------------------------------------------------


class LocalCluster:
    """A dask scheduler and ``n`` of our workers on this machine.

    ``scheduler=None`` starts an embedded ``distributed.Scheduler`` on 127.0.0.1 and a
    free port; pass an address to add workers to a running scheduler instead (it is
    then left running on close). Use as a context manager -- ``with`` when
    synchronous, ``async with`` (or ``await``) when ``asynchronous=True``, in which
    case ``scale``, ``add_workers``, ``remove_workers`` and ``close`` are awaitable.

    Workers that die unexpectedly are replaced (``supervise=False`` turns that off).
    Closing terminates the workers, closes the clients from ``get_client`` and stops
    the embedded scheduler.

    While it runs, dask collections in this process shuffle and rechunk with the
    task-based methods (``TASK_BASED_METHODS``) unless the dask config already names
    a method: our workers can't run P2P.
    """

    def __init__(
        self,
        n: int = 4,
        scheduler: str | None = None,
        nthreads: int = 1,
        resources: dict[str, float] | str | None = None,
        memory_limit: str | float | None = "auto",
        asynchronous: bool = False,
        *,
        host: str = "127.0.0.1",
        timeout: float = DEFAULT_START_TIMEOUT,
        supervise: bool = True,
        death_timeout: float | None = None,
        local_directory: str | None = None,
        lifetime: float | None = None,
        env: dict[str, str] | None = None,
        log_level: int | str = logging.WARNING,
        scheduler_port: int = 0,
        worker_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be an integer >= 0, not {n!r}")
        self.n = n
        self.asynchronous = asynchronous
        self.timeout = timeout
        self._host = host
        self._scheduler_port = scheduler_port
        self._log_level = _log_level(log_level) or logging.WARNING
        self._given_scheduler = None if scheduler is None else normalize_address(scheduler)
        self._scheduler: SchedulerProcess | None = None
        self._launcher = Launcher(
            self._given_scheduler,
            n=n,
            nthreads=nthreads,
            resources=resources,
            memory_limit=memory_limit,
            host=host,
            death_timeout=death_timeout,
            local_directory=local_directory,
            lifetime=lifetime,
            supervise=supervise,
            env=env,
            worker_options=worker_options,
            log_level=self._log_level,
        )
        self._clients: weakref.WeakSet[Any] = weakref.WeakSet()
        self._task_methods: Any = None  # the dask.config.set that close undoes
        self._started = False
        self._closed = False
        if not asynchronous:
            self._start()

    # -- start ---------------------------------------------------------------------------

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self._launcher.start_fork_server()  # boots while the scheduler does
            if self._given_scheduler is None:
                self._scheduler = SchedulerProcess(
                    self._host, self._scheduler_port, self._log_level
                )
                address = self._scheduler.wait_address(self.timeout)
            else:
                address = self._given_scheduler
                check_scheduler(address, self.timeout)
            self._launcher.set_scheduler(address)
            self._launcher.add_workers(self.n, timeout=self.timeout)
            methods = unchosen_task_methods()
            if methods:
                import dask

                self._task_methods = dask.config.set(methods)
        except BaseException:
            self._close()
            raise

    async def _start_async(self) -> LocalCluster:
        await asyncio.to_thread(self._start)
        return self

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._start_async().__await__()

    # -- introspection ---------------------------------------------------------------------

    @property
    def scheduler_address(self) -> str:
        address = self._launcher.scheduler_address
        if address is None:
            raise RuntimeError("the cluster has not started yet")
        return address

    @property
    def workers(self) -> list[str]:
        """Addresses of our running workers."""
        return self._launcher.workers

    @property
    def launcher(self) -> Launcher:
        return self._launcher

    @property
    def scheduler_pid(self) -> int | None:
        return self._scheduler.pid if self._scheduler else None

    def __repr__(self) -> str:
        address = self._launcher.scheduler_address or "not started"
        return f"<clusterlaunch.LocalCluster {address}: {len(self.workers)} workers>"

    # -- changing the cluster --------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.asynchronous:
            return asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def scale(self, n: int) -> Any:
        """Add or remove workers until ``n`` run; returns their addresses."""
        return self._call(self._launcher.scale, n, timeout=self.timeout)

    def add_workers(self, k: int) -> Any:
        """Start ``k`` more workers; returns the new addresses."""
        return self._call(self._launcher.add_workers, k, timeout=self.timeout)

    def remove_workers(
        self, addresses: Iterable[str], timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    ) -> Any:
        """Terminate these workers and wait until their processes exited."""
        return self._call(self._launcher.remove_workers, list(addresses), timeout)

    def get_client(self, **kwargs: Any) -> Any:
        """A ``distributed.Client`` connected to this cluster's scheduler."""
        from distributed import Client

        kwargs.setdefault("asynchronous", self.asynchronous)
        kwargs.setdefault("timeout", self.timeout)
        client = Client(self.scheduler_address, **kwargs)
        self._clients.add(client)
        return client

    # -- close -----------------------------------------------------------------------------

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task_methods is not None:
            self._task_methods.__exit__(None, None, None)
        try:
            self._launcher.close()
        finally:
            if self._scheduler is not None:
                self._scheduler.stop()

    def _close_sync_clients(self) -> None:
        for client in list(self._clients):
            if client.status not in ("closed", "closing"):
                with contextlib.suppress(Exception):
                    client.close()

    async def _close_async(self) -> None:
        for client in list(self._clients):
            if client.status not in ("closed", "closing"):
                with contextlib.suppress(Exception):
                    await client.close()
        await asyncio.to_thread(self._close)

    def close(self) -> Any:
        """Stop workers and the embedded scheduler (awaitable when asynchronous)."""
        if self.asynchronous:
            return self._close_async()
        self._close_sync_clients()
        self._close()
        return None

    def __enter__(self) -> LocalCluster:
        if self.asynchronous:
            raise TypeError("use 'async with' for LocalCluster(asynchronous=True)")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    async def __aenter__(self) -> LocalCluster:
        if not self.asynchronous:
            raise TypeError("use 'with' for LocalCluster(asynchronous=False)")
        return await self._start_async()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._close_async()
