"""``LocalCluster``: a dask scheduler and our workers on this machine, as a dask cluster.

It is a ``distributed.deploy.Cluster``, so what dask users do with a cluster works:
``distributed.Client(cluster)``, ``status``, ``dashboard_link``, the Jupyter widget
(``_repr_html_``), ``scale``, ``adapt`` (the scheduler's adaptive logic,
``distributed.deploy.adaptive``), ``wait_for_workers``, ``get_logs``, ``close``, sync
and async. ``deployment.Deployment`` starts and stops the processes; the blocking
launcher calls run in a ``bridge.LoopThread``'s threads, off the cluster's event loop.

This module imports ``distributed`` (the launcher side may; workers never do), so
``clusterlaunch`` imports it only when ``LocalCluster`` is first used.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from collections.abc import Generator, Iterable
from typing import Any

from distributed.core import Status, rpc
from distributed.deploy import Cluster

from clusterlaunch.bridge import LoopThread
from clusterlaunch.deployment import DEFAULT_DASHBOARD_ADDRESS, Deployment
from clusterlaunch.launcher import DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_START_TIMEOUT, Launcher

logger = logging.getLogger(__name__)


class LocalCluster(Cluster):
    """A dask scheduler and ``n`` of our workers on this machine.

    ``scheduler=None`` starts an embedded ``distributed.Scheduler`` on ``host`` and a
    free port, with its dashboard on ``dashboard_address`` when bokeh is importable
    (``None``: no dashboard); pass an address to add workers to a running scheduler
    instead (it is then left running on close). Use as a context manager -- ``with``
    when synchronous, ``async with`` (or ``await``) when ``asynchronous=True``, in
    which case ``scale``, ``add_workers``, ``remove_workers`` and ``close`` are
    awaitable.

    Workers that die unexpectedly are replaced (``supervise=False`` turns that off).
    Closing terminates the workers, closes the clients from ``get_client`` and stops
    the embedded scheduler.

    While it runs, dask collections in this process shuffle and rechunk with the
    task-based methods (``deployment.TASK_BASED_METHODS``) unless the dask config
    already names a method: our workers can't run P2P.
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
        dashboard_address: str | None = DEFAULT_DASHBOARD_ADDRESS,
        worker_options: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be an integer >= 0, not {n!r}")
        self.n = n
        self.timeout = timeout
        # Bad options raise here, before there is a cluster to close.
        self._deployment = Deployment(
            n,
            scheduler,
            host=host,
            scheduler_port=scheduler_port,
            log_level=log_level,
            dashboard_address=dashboard_address,
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
        self._bridge: LoopThread | None = None  # made by _start, closed by _close
        super().__init__(asynchronous=asynchronous, name=name)
        self._asynchronous = asynchronous
        if not self.called_from_running_loop:
            self._loop_runner.start()
            try:
                self.sync(self._start)
            except BaseException:
                self._loop_runner.stop()
                raise

    # -- start ---------------------------------------------------------------------------

    async def _start(self) -> None:
        if self.status != Status.created:
            return
        self.status = Status.starting
        self._bridge = LoopThread("clusterlaunch-cluster")
        try:
            await self._bridge.run_blocking(self._deployment.start, self.timeout)
            self.scheduler_comm = rpc(self._deployment.scheduler_address)
            await super()._start()
        except BaseException:
            await self._close()
            raise

    def __await__(self) -> Generator[Any, None, LocalCluster]:
        async def started() -> LocalCluster:
            await self._start()
            return self

        return started().__await__()

    # -- introspection ---------------------------------------------------------------------

    @property
    def workers(self) -> list[str]:
        """Addresses of our running workers (each worker's name is its address)."""
        return self._launcher.workers

    @property
    def launcher(self) -> Launcher:
        return self._launcher

    @property
    def scheduler_pid(self) -> int | None:
        return self._deployment.scheduler_pid

    @property
    def dashboard_link(self) -> str:
        """The dashboard's address, or "" when there is none."""
        ours = self._deployment.dashboard_link
        if ours is not None:
            return ours
        link: str = super().dashboard_link
        return link

    def __repr__(self) -> str:
        text = super().__repr__()
        link = self.dashboard_link if self.status == Status.running else ""
        return f"{text[:-1]}, dashboard={link!r})" if link else text

    # -- changing the cluster --------------------------------------------------------------

    async def _blocking(self, fn: Any, *args: Any) -> Any:
        if self._bridge is None or self.status != Status.running:
            raise RuntimeError(f"the cluster is {self.status.name}, not running")
        return await self._bridge.run_blocking(fn, *args)

    def scale(self, n: int) -> Any:
        """Add or remove workers until ``n`` run; returns their addresses."""
        return self.sync(self._blocking, self._launcher.scale, n, self.timeout)

    def scale_down(self, workers: Iterable[str]) -> Any:
        """Stop these workers (names or addresses) of ours; the adaptive logic calls it
        after the scheduler retired them, so those already gone are skipped."""
        return self.sync(self._scale_down, list(workers))

    async def _scale_down(self, workers: list[str]) -> None:
        by_name = {str(info.get("name")): a for a, info in self.scheduler_info["workers"].items()}
        addresses = [by_name.get(w, w) for w in workers]
        ours = [a for a in addresses if self._launcher.owns(a)]
        if ours:
            await self._blocking(self._launcher.stop_addresses, ours, DEFAULT_SHUTDOWN_TIMEOUT)

    def add_workers(self, k: int) -> Any:
        """Start ``k`` more workers; returns the new addresses."""
        return self.sync(self._blocking, self._launcher.add_workers, k, self.timeout)

    def remove_workers(
        self, addresses: Iterable[str], timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    ) -> Any:
        """Terminate these workers and wait until their processes exited."""
        return self.sync(self._blocking, self._launcher.remove_workers, list(addresses), timeout)

    def get_client(self, **kwargs: Any) -> Any:
        """A ``distributed.Client`` of this cluster, closed with it."""
        from distributed import Client

        kwargs.setdefault("asynchronous", self._asynchronous)
        kwargs.setdefault("timeout", self.timeout)
        client = Client(self, **kwargs)
        self._clients.add(client)
        return client

    # -- close -----------------------------------------------------------------------------

    async def _close(self) -> None:
        if self.status == Status.closed:
            return
        for client in list(self._clients):
            if client.status not in ("closed", "closing"):
                with contextlib.suppress(Exception):
                    closing = client.close()
                    if inspect.isawaitable(closing):
                        await closing
        try:
            await super()._close()
        finally:
            if self._bridge is not None:
                try:
                    await self._bridge.run_blocking(self._deployment.close)
                finally:
                    # Its executor is idle now, so this join is short.
                    self._bridge.close()
            else:
                self._deployment.close()
            self.status = Status.closed

    def close(self, timeout: float | None = None) -> Any:
        """Stop workers and the embedded scheduler (awaitable when asynchronous)."""
        closing = super().close(timeout)
        if not self._asynchronous:
            self._loop_runner.stop()
        return closing
