"""The one start and stop of "a dask scheduler plus N of our workers".

``Deployment`` is used by ``LocalCluster`` and by ``clusterlaunch up``: the fork
server boots while our scheduler starts (or the given one is checked), the workers
start, dask is told to use the task-based shuffle and rechunk while it runs; close
undoes that in reverse. It does not import ``distributed`` (``up`` stays quick to
start); ``LocalCluster``, the dask cluster object around it, does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from clusterlaunch.comm.addressing import normalize_address
from clusterlaunch.launcher import DEFAULT_START_TIMEOUT, Launcher, parse_log_level
from clusterlaunch.scheduler import SchedulerProcess, check_scheduler

logger = logging.getLogger(__name__)

#: Where dask serves a scheduler's dashboard (an empty host: the scheduler's own).
DEFAULT_DASHBOARD_ADDRESS = ":8787"

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


class Deployment:
    """A dask scheduler -- ours (``scheduler=None``) or the one at ``scheduler`` -- and a
    ``Launcher``'s workers for it, started by ``start`` and stopped by ``close``.

    ``n`` and ``launcher_options`` are ``Launcher``'s; bad ones raise ``ValueError``
    here. Workers listen on ``host`` (None: where they reach the scheduler from), our
    scheduler on ``host:scheduler_port`` (port 0: a free one), with its dashboard on
    ``dashboard_address`` when bokeh is importable (None: no dashboard). Each step is
    logged at debug level on this module's logger.
    """

    def __init__(
        self,
        n: int,
        scheduler: str | None = None,
        *,
        host: str | None = "127.0.0.1",
        scheduler_port: int = 0,
        log_level: int | str | None = logging.WARNING,
        dashboard_address: str | None = DEFAULT_DASHBOARD_ADDRESS,
        **launcher_options: Any,
    ) -> None:
        self._given_scheduler = None if scheduler is None else normalize_address(scheduler)
        self._scheduler_host = host or "127.0.0.1"
        self._scheduler_port = scheduler_port
        self._dashboard_address = dashboard_address
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

    @property
    def dashboard_link(self) -> str | None:
        """Our scheduler's dashboard ("" for none; None: not ours, or not started)."""
        return (
            self._scheduler.dashboard_link if self._scheduler and self._scheduler.address else None
        )

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
                    self._scheduler_host,
                    self._scheduler_port,
                    self.log_level,
                    self._dashboard_address,
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
