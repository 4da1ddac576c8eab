"""``Launcher``: start, track and stop the worker processes of one scheduler.

A ``Launcher`` owns one fork server (``forkserver.py``) and the workers it forked for
one scheduler. It keeps pid <-> address for every worker, adds and removes workers at
any time and, when supervising, replaces a worker that dies unexpectedly. Every
launcher alive in this process is closed when the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from clusterlaunch.bridge import LoopThread
from clusterlaunch.comm.addressing import normalize_address
from clusterlaunch.forkserver import ForkServer
from clusterlaunch.scheduler import check_scheduler
from clusterlaunch.spawn import LaunchError
from clusterlaunch.terminate import ask_to_terminate
from clusterlaunch.worker.options import WorkerOptions, parse_memory_limit, parse_resources

logger = logging.getLogger(__name__)

#: Seconds to wait for new workers to register, unless told otherwise.
DEFAULT_START_TIMEOUT = 60.0
#: Seconds ``shutdown`` waits for workers to go before it gives up (or kills ours).
DEFAULT_SHUTDOWN_TIMEOUT = 10.0


def parse_log_level(level: int | str | None) -> int | None:
    """A level of ``logging`` from a number or a name (``"info"``); None stays None."""
    if level is None or isinstance(level, int):
        return level
    value = getattr(logging, str(level).upper(), None)
    if not isinstance(value, int):
        raise ValueError(f"invalid log level {level!r}: use debug, info, warning or error")
    return value


def default_n_workers() -> int:
    """How many workers ``up``/``Launcher`` start when not told: the usable CPUs."""
    import loky  # imported here: loky is heavy and workers never need it

    return max(1, int(loky.cpu_count()))


@dataclass
class WorkerProcess:
    """One worker process a launcher started."""

    id: int
    pid: int | None = None
    address: str | None = None
    state: str = "starting"  # starting -> running -> stopping -> exited
    exit_code: int | None = None
    error: str | None = None
    replaced: bool = False
    #: A signal asked for before the fork server told us the pid; sent once it does.
    pending_signal: int | None = None

    @property
    def alive(self) -> bool:
        return self.state != "exited"


class Launcher:
    """Starts worker processes for the scheduler at ``scheduler_address`` and tracks them.

    ``n`` workers start on ``start()`` (default: ``loky.cpu_count()``); ``add_workers``,
    ``remove_workers`` and ``scale`` change that at any time. With ``supervise``, a
    running worker that exits with a non-zero code or a signal without being asked to
    is replaced; one that exits cleanly (the scheduler retired it, its lifetime ended)
    is not. Use as a context manager, or call ``close()``.
    """

    #: Every launcher of this process not yet closed (for ``shutdown`` and exit).
    _live: ClassVar[weakref.WeakSet[Launcher]] = weakref.WeakSet()

    @classmethod
    def live(cls) -> list[Launcher]:
        """The launchers of this process not yet closed."""
        return list(cls._live)

    def __init__(
        self,
        scheduler_address: str | None,
        n: int | None = None,
        *,
        nthreads: int = 1,
        resources: dict[str, float] | str | None = None,
        memory_limit: str | float | None = "auto",
        host: str | None = None,
        name_prefix: str | None = None,
        death_timeout: float | None = None,
        local_directory: str | None = None,
        lifetime: float | None = None,
        supervise: bool = False,
        env: dict[str, str] | None = None,
        worker_options: dict[str, Any] | None = None,
        log_level: int | str | None = logging.WARNING,
        target: str | None = None,
    ) -> None:
        if n is None:
            n = default_n_workers()
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"number of workers must be an integer >= 0, not {n!r}")
        self.scheduler_address = (
            None if scheduler_address is None else normalize_address(scheduler_address)
        )
        self.n = n
        self.name_prefix = name_prefix
        self.supervise = supervise
        self.env = dict(env or {})
        self._scratch: str | None = None
        self.log_level = parse_log_level(log_level)
        self._target = target  # tests may run a stand-in instead of the worker
        self._options: dict[str, Any] = {
            "scheduler_address": self.scheduler_address,
            "nthreads": nthreads,
            "resources": parse_resources(resources),
            "memory_limit": parse_memory_limit(memory_limit, nworkers=max(n, 1)),
            "host": host,
            "death_timeout": death_timeout,
            "local_directory": local_directory,
            "lifetime": lifetime,
            **(worker_options or {}),
        }
        # Reject bad settings now, with a one-line message.
        WorkerOptions(**{**self._options, "scheduler_address": "tcp://127.0.0.1:0"})
        # Re-entrant: a progress callback may read `workers` while add_workers waits.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._procs: dict[int, WorkerProcess] = {}
        self._ids = itertools.count()
        self._server: ForkServer | None = None
        self._server_gone = False
        self._closing = False
        self._closed = False
        Launcher._live.add(self)

    # -- introspection ---------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"<Launcher {self.scheduler_address}: {len(self.workers)} running, "
            f"supervise={self.supervise}>"
        )

    @property
    def workers(self) -> list[str]:
        """Addresses of the running (registered) workers, oldest first."""
        with self._lock:
            return [p.address for p in self._procs.values() if p.state == "running" and p.address]

    @property
    def processes(self) -> list[WorkerProcess]:
        """Every worker process not yet exited, oldest first (copies)."""
        with self._lock:
            return [WorkerProcess(**vars(p)) for p in self._procs.values() if p.alive]

    @property
    def pids(self) -> dict[str, int]:
        """address -> pid of the running workers."""
        with self._lock:
            return {
                p.address: p.pid
                for p in self._procs.values()
                if p.state == "running" and p.address and p.pid
            }

    @property
    def scratch_directory(self) -> str | None:
        """Where workers not given a ``local_directory`` keep files; removed on close."""
        return self._scratch

    @property
    def fork_server_pid(self) -> int | None:
        return self._server.pid if self._server else None

    @property
    def closing(self) -> bool:
        """``close()`` has begun: no more workers start."""
        return self._closing

    def owns(self, address: str) -> bool:
        with self._lock:
            return any(p.address == address and p.alive for p in self._procs.values())

    # -- starting ----------------------------------------------------------------------

    def start(
        self,
        timeout: float = DEFAULT_START_TIMEOUT,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Start the fork server and the first ``n`` workers; returns their addresses.

        Raises ``SchedulerUnreachable`` naming the scheduler if it does not answer
        within ``timeout`` seconds.
        """
        if self.scheduler_address is None:
            raise LaunchError("the launcher has no scheduler address")
        try:
            self._ensure_server()  # boots while we check the scheduler
            check_scheduler(self.scheduler_address, timeout)
            return self.add_workers(self.n, timeout=timeout, progress=progress)
        except BaseException:
            self.close()
            raise

    def set_scheduler(self, address: str) -> None:
        """Point workers started from now on at the scheduler at ``address``."""
        self.scheduler_address = self._options["scheduler_address"] = normalize_address(address)

    def start_fork_server(self) -> None:
        """Start the fork server now (it boots while you do something else)."""
        self._ensure_server()

    def _ensure_server(self) -> ForkServer:
        with self._lock:
            if self._closing:
                raise LaunchError("this launcher is closed")
            if self._server_gone:
                raise LaunchError("the fork server of this launcher died; start a new launcher")
            if self._server is None:
                # Workers not told where to keep files (spilled data and the like) use a
                # directory of ours, removed when the fork server stops -- with what
                # killed workers left in it, and even if this process was killed.
                self._scratch = tempfile.mkdtemp(prefix="clusterlaunch-")
                try:
                    self._server = ForkServer(self._on_event, self._on_server_gone, self._scratch)
                except BaseException:
                    shutil.rmtree(self._scratch, ignore_errors=True)
                    raise
            return self._server

    def _spawn(self, k: int) -> list[int]:
        """Ask the fork server for ``k`` workers; called with or without the lock held."""
        server = self._server
        assert server is not None
        ids = []
        for _ in range(k):
            wid = next(self._ids)
            options = dict(self._options)
            options["local_directory"] = options["local_directory"] or self._scratch
            if self.name_prefix is not None:
                options["name"] = f"{self.name_prefix}-{wid}"
            request = {
                "cmd": "spawn",
                "id": wid,
                "options": options,
                "sys_path": list(sys.path),
                "cwd": os.getcwd(),
                "env": self.env,
            }
            if self.log_level is not None:
                request["log_level"] = self.log_level
            if self._target:
                request["target"] = self._target
            self._procs[wid] = WorkerProcess(wid)
            try:
                server.send(request)
            except OSError as e:
                self._procs[wid].state = "exited"
                raise LaunchError(f"the fork server is gone: {e}") from None
            ids.append(wid)
        return ids

    def add_workers(
        self,
        k: int,
        timeout: float = DEFAULT_START_TIMEOUT,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Start ``k`` more workers and wait until they registered; returns their addresses.

        Raises ``LaunchError`` if any exits first or they are not all registered within
        ``timeout`` seconds (those still starting are then stopped).
        """
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"number of workers must be an integer >= 0, not {k!r}")
        if k == 0:
            return []
        if self.scheduler_address is None:
            raise LaunchError("the launcher has no scheduler address")
        self._ensure_server()
        deadline = time.monotonic() + timeout
        with self._lock:
            ids = self._spawn(k)
            reported = -1
            while True:
                procs = [self._procs[i] for i in ids]
                ready = sum(p.state != "starting" for p in procs)
                if progress is not None and ready != reported:
                    reported = ready
                    progress(sum(p.address is not None for p in procs), k)
                if ready == k:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            pending = [p for p in procs if p.state == "starting"]
            failed = [p for p in procs if p.address is None and p.state == "exited"]
            for proc in pending:
                proc.state = "stopping"
            self._kill(pending)
        if pending:
            raise LaunchError(
                f"{len(pending)} of {k} workers did not register with the scheduler at "
                f"{self.scheduler_address} within {timeout:g} s"
            )
        if failed:
            why = next((p.error for p in failed if p.error), None)
            if why is None:
                why = f"exit code {failed[0].exit_code}"
            raise LaunchError(
                f"{len(failed)} of {k} workers exited before registering with the scheduler "
                f"at {self.scheduler_address}: {why}"
            )
        return [p.address for p in procs if p.address]

    # -- events from the fork server and the workers (reader thread) ------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        with self._lock:
            proc = self._procs.get(event.get("id"))  # type: ignore[arg-type]
            if kind == "hello" or proc is None:
                return
            if kind in ("spawned", "ready") and proc.pid is None:
                proc.pid = event["pid"]
                if proc.pending_signal is not None:
                    self._kill([proc], proc.pending_signal)
            if kind == "ready":
                proc.address = normalize_address(event["address"])
                if proc.state == "starting":
                    proc.state = "running"
            elif kind == "failed":
                proc.error = event.get("error")
            elif kind == "exit":
                self._on_exit(proc, event.get("code"))
            self._changed.notify_all()

    def _on_exit(self, proc: WorkerProcess, code: int | None) -> None:
        was = proc.state
        proc.state = "exited"
        proc.exit_code = code
        if was == "stopping" or self._closing or was != "running":
            return
        if code == 0:
            logger.info("worker %s (pid %s) exited", proc.address, proc.pid)
            return
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if not self.supervise:
            logger.warning("worker %s (pid %s) died with %s", proc.address, proc.pid, how)
            return
        logger.warning(
            "worker %s (pid %s) died with %s; starting a replacement", proc.address, proc.pid, how
        )
        proc.replaced = True
        try:
            self._spawn(1)
        except LaunchError as e:
            logger.error("could not replace worker %s: %s", proc.address, e)

    def _on_server_gone(self) -> None:
        with self._lock:
            self._server_gone = True
            lost = [p for p in self._procs.values() if p.alive]
            for proc in lost:
                proc.state = "exited"  # the kernel killed them with the server
            self._changed.notify_all()
        if lost and not self._closing:
            logger.error(
                "the fork server (pid %s) died; its %d workers went with it",
                self.fork_server_pid,
                len(lost),
            )

    # -- stopping ----------------------------------------------------------------------

    def _kill(self, procs: Iterable[WorkerProcess], sig: int = signal.SIGKILL) -> None:
        server = self._server
        if server is None:
            return
        for proc in procs:
            if not proc.pid:
                proc.pending_signal = int(sig)
                continue
            with contextlib.suppress(OSError):
                server.send({"cmd": "signal", "pid": proc.pid, "signal": int(sig)})

    def stop_addresses(self, addresses: list[str], timeout: float) -> list[str]:
        """Terminate our workers at ``addresses`` and wait for their processes to exit.

        Overstaying workers are killed; returns the addresses still not gone.
        """
        deadline = time.monotonic() + timeout
        wanted = set(addresses)
        with self._lock:
            procs = [p for p in self._procs.values() if p.address in wanted and p.alive]
            for proc in procs:
                proc.state = "stopping"
        running = [p.address for p in procs if p.address]

        async def ask_all() -> None:
            await asyncio.gather(*(ask_to_terminate(a, max(timeout, 0.1)) for a in running))

        # Ask over the wire on a bridge while this thread watches the processes;
        # leaving the block cancels asks still going (their workers are gone).
        with contextlib.ExitStack() as stack:
            try:
                bridge = stack.enter_context(LoopThread("clusterlaunch-terminate"))
            except RuntimeError:
                # At interpreter exit (Python 3.12+) no thread may start: SIGTERM,
                # which our workers take as terminate, instead.
                self._kill(procs, signal.SIGTERM)
            else:
                bridge.submit(ask_all())
            if not self._wait_exited(procs, deadline):
                with self._lock:
                    left = [p for p in procs if p.alive]
                logger.warning(
                    "%d worker(s) did not exit within %g s of terminate; killing them",
                    len(left),
                    timeout,
                )
                self._kill(left)
                self._wait_exited(procs, time.monotonic() + 5.0)
        with self._lock:
            return [p.address for p in procs if p.alive and p.address]

    def _wait_exited(self, procs: list[WorkerProcess], deadline: float) -> bool:
        with self._lock:
            while any(p.alive for p in procs):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def remove_workers(
        self, addresses: Iterable[str], timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    ) -> None:
        """Terminate the given workers of this launcher and wait until they exited."""
        addresses = [normalize_address(a) for a in addresses]
        unknown = [a for a in addresses if not self.owns(a)]
        if unknown:
            raise ValueError(f"not a worker of this launcher: {', '.join(unknown)}")
        still_up = self.stop_addresses(addresses, timeout)
        if still_up:
            raise TimeoutError(f"worker(s) still up after {timeout:g} s: {', '.join(still_up)}")

    def scale(
        self,
        n: int,
        timeout: float = DEFAULT_START_TIMEOUT,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Add or remove (newest first) workers until ``n`` run; returns all addresses."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"number of workers must be an integer >= 0, not {n!r}")
        with self._lock:
            alive = [p for p in self._procs.values() if p.state in ("starting", "running")]
        self.n = n
        if len(alive) < n:
            self.add_workers(n - len(alive), timeout=timeout, progress=progress)
        elif len(alive) > n:
            surplus = alive[n:]
            starting = [p for p in surplus if p.state == "starting" or not p.address]
            with self._lock:
                for proc in starting:
                    proc.state = "stopping"
            self._kill(starting, signal.SIGTERM)
            self.remove_workers([p.address for p in surplus if p not in starting and p.address])
            self._wait_exited(starting, time.monotonic() + timeout)
        return self.workers

    def close(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
        """Terminate every worker, then stop the fork server. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
            addresses = [p.address for p in self._procs.values() if p.alive and p.address]
            starting = [p for p in self._procs.values() if p.alive and not p.address]
        try:
            if addresses and not self._server_gone:
                self.stop_addresses(addresses, timeout)
            if starting:
                self._kill(starting, signal.SIGTERM)
        finally:
            if self._server is not None:
                self._server.stop(grace=min(timeout, 5.0), timeout=timeout + 5.0)
            with self._lock:
                self._closed = True
                for proc in self._procs.values():
                    proc.state = "exited"
                self._changed.notify_all()
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
            Launcher._live.discard(self)

    def __enter__(self) -> Launcher:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


@atexit.register
def _close_all_launchers() -> None:
    for launcher in Launcher.live():
        with contextlib.suppress(Exception):
            launcher.close(timeout=5.0)
