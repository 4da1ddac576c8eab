"""A cluster on this machine: a dask scheduler plus our workers.

``Deployment`` is the one way to start and stop "a scheduler and N workers", used by
``LocalCluster`` and by ``clusterlaunch up``: the fork server boots while our
scheduler starts (or the given one is checked), the workers start, dask is told to
use the task-based shuffle and rechunk while it runs; close undoes that in reverse.

``LocalCluster`` is the dask-style object around it: sync or async, ``scale``,
``get_client``, a context manager.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import Any

from clusterlaunch.bridge import LoopThread
from clusterlaunch.comm.addressing import normalize_address
from clusterlaunch.launcher import (
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_START_TIMEOUT,
    Launcher,
    parse_log_level,
)
from clusterlaunch.scheduler import SchedulerProcess, check_scheduler

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
# Deployment: the one start and stop of a scheduler plus workers
# --------------------------------------------------------------------------------------


class Deployment:
    """A dask scheduler -- ours (``scheduler=None``) or the one at ``scheduler`` -- and a
    ``Launcher``'s workers for it, started by ``start`` and stopped by ``close``.

    ``n`` and ``launcher_options`` are ``Launcher``'s; bad ones raise ``ValueError``
    here. Workers listen on ``host`` (None: where they reach the scheduler from), our
    scheduler on ``host:scheduler_port`` (port 0: a free one). Each step is logged at
    debug level on this module's logger.
    """

    def __init__(
        self,
        n: int,
        scheduler: str | None = None,
        *,
        host: str | None = "127.0.0.1",
        scheduler_port: int = 0,
        log_level: int | str | None = logging.WARNING,
        **launcher_options: Any,
    ) -> None:
        self._given_scheduler = None if scheduler is None else normalize_address(scheduler)
        self._scheduler_host = host or "127.0.0.1"
        self._scheduler_port = scheduler_port
        self.log_level = parse_log_level(log_level) or logging.WARNING
        self.launcher = Launcher(
            self._given_scheduler, n=n, host=host, log_level=self.log_level, **launcher_options
        )
        self._scheduler: SchedulerProcess | None = None
        #: The task-based methods set in dask's config while up (the ones not chosen).
        self.task_methods: dict[str, str] = {}
        self._config: Any = None  # the dask.config.set that close undoes
        self._closed = False

    @property
    def scheduler_address(self) -> str | None:
        return self.launcher.scheduler_address

    @property
    def scheduler_pid(self) -> int | None:
        """The pid of our scheduler (None for a given one)."""
        return self._scheduler.pid if self._scheduler else None

    def scheduler_exit_code(self) -> int | None:
        """The exit code of our scheduler if it has exited, else None."""
        return None if self._scheduler is None else self._scheduler.process.poll()

    def start(
        self,
        timeout: float = DEFAULT_START_TIMEOUT,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Start the scheduler (or check it) and ``n`` workers; their addresses.

        On any failure what started is stopped again before the error propagates.
        """
        try:
            self.launcher.start_fork_server()  # boots while the scheduler does
            logger.debug("fork server started (pid %s)", self.launcher.fork_server_pid)
            if self._given_scheduler is None:
                self._scheduler = SchedulerProcess(
                    self._scheduler_host, self._scheduler_port, self.log_level
                )
                address = self._scheduler.wait_address(timeout)
                logger.debug("scheduler started at %s (pid %s)", address, self._scheduler.pid)
            else:
                address = self._given_scheduler
                check_scheduler(address, timeout)
                logger.debug("scheduler at %s answers", address)
            self.launcher.set_scheduler(address)
            workers = self.launcher.add_workers(self.launcher.n, timeout=timeout, progress=progress)
            logger.debug("%d workers started", len(workers))
            self.task_methods = unchosen_task_methods()
            if self.task_methods:
                import dask

                self._config = dask.config.set(self.task_methods)
            return workers
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Undo ``start`` in reverse: dask's config, workers and fork server, our
        scheduler (a given one is left running). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._config is not None:
            self._config.__exit__(None, None, None)
        try:
            logger.debug("stopping the workers and the fork server")
            self.launcher.close()
        finally:
            if self._scheduler is not None:
                logger.debug("stopping the scheduler (pid %s)", self._scheduler.pid)
                self._scheduler.stop()
            logger.debug("stopped")


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
        self._deployment = Deployment(
            n,
            scheduler,
            host=host,
            scheduler_port=scheduler_port,
            log_level=log_level,
            nthreads=nthreads,
            resources=resources,
            memory_limit=memory_limit,
            death_timeout=death_timeout,
            local_directory=local_directory,
            lifetime=lifetime,
            supervise=supervise,
            env=env,
            worker_options=worker_options,
        )
        self._launcher = self._deployment.launcher
        self._clients: weakref.WeakSet[Any] = weakref.WeakSet()
        # Asynchronous: the blocking launcher calls run in this bridge's threads,
        # which close joins.
        self._bridge = LoopThread("clusterlaunch-cluster") if asynchronous else None
        self._started = False
        if not asynchronous:
            self._start()

    # -- start ---------------------------------------------------------------------------

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._deployment.start(self.timeout)

    async def _start_async(self) -> LocalCluster:
        await self._call(self._start)
        return self

    def __await__(self) -> Generator[Any, None, LocalCluster]:
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
        return self._deployment.scheduler_pid

    def __repr__(self) -> str:
        address = self._launcher.scheduler_address or "not started"
        return f"<clusterlaunch.LocalCluster {address}: {len(self.workers)} workers>"

    # -- changing the cluster --------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or when asynchronous a coroutine running it on our bridge."""
        if self._bridge is not None:
            return self._bridge.run_blocking(fn, *args)
        return fn(*args)

    def scale(self, n: int) -> Any:
        """Add or remove workers until ``n`` run; returns their addresses."""
        return self._call(self._launcher.scale, n, self.timeout)

    def add_workers(self, k: int) -> Any:
        """Start ``k`` more workers; returns the new addresses."""
        return self._call(self._launcher.add_workers, k, self.timeout)

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
        assert self._bridge is not None  # asynchronous clusters have one
        try:
            await self._bridge.run_blocking(self._deployment.close)
        finally:
            # Its executor is idle now, so this join is short; blocking for it here
            # keeps the loop from outliving the cluster.
            self._bridge.close()

    def close(self) -> Any:
        """Stop workers and the embedded scheduler (awaitable when asynchronous)."""
        if self.asynchronous:
            return self._close_async()
        self._close_sync_clients()
        self._deployment.close()
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
