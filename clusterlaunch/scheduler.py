"""The dask scheduler as we see it: its identity, a probe, and an embedded one.

``scheduler_identity``/``check_scheduler`` ask any dask scheduler who it is, and fail
fast with ``SchedulerUnreachable`` (one line naming the address) when nothing answers.

``SchedulerProcess`` runs the unmodified ``distributed.Scheduler`` in a helper
process (``spawn.py``) rather than in a thread of the user's process:

* isolation: its event loop does not share the GIL with the user's code and the
  ``distributed.Client`` thread, so a busy notebook cannot stall scheduling, and a
  scheduler that crashes or hangs cannot take the user's process with it;
* nothing leaks: closing ends the process, so its port, threads and distributed's
  global state (config, logging, offload executor) are gone for sure -- what the
  pytest fixtures promise between tests;
* the cost is hidden: it boots in parallel with the fork server that starts our
  workers, and on a machine with two or more cores the two overlap.

It stops when its stdin closes (we closed it, or we died) or on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Any

from clusterlaunch.bridge import run_sync
from clusterlaunch.comm.addressing import normalize_address
from clusterlaunch.comm.rpc import send_recv
from clusterlaunch.comm.tcp import connect
from clusterlaunch.comm.timeouts import wait_for
from clusterlaunch.spawn import PARENT_DEATH_SIGNAL, LaunchError, orphaned, start_helper

logger = logging.getLogger(__name__)

#: Seconds ``SchedulerProcess.stop`` waits for the scheduler to close before SIGKILL.
DEFAULT_STOP_TIMEOUT = 10.0


class SchedulerUnreachable(ConnectionError):
    """No dask scheduler answered at the given address."""


async def scheduler_identity(address: str, timeout: float) -> dict[str, Any]:
    """The scheduler's ``identity``; ``SchedulerUnreachable`` if it can't be had in time."""
    address = normalize_address(address)
    try:
        comm = await connect(address, timeout=timeout)
    except (OSError, asyncio.TimeoutError):
        raise SchedulerUnreachable(
            f"could not reach the dask scheduler at {address} within {timeout:g} s; "
            "is it running and is the address right?"
        ) from None
    try:
        identity: dict[str, Any] = await wait_for(send_recv(comm, op="identity"), timeout)
        return identity
    except (OSError, asyncio.TimeoutError) as e:
        raise SchedulerUnreachable(
            f"the dask scheduler at {address} did not answer within {timeout:g} s ({e})"
        ) from None
    finally:
        comm.abort()


def check_scheduler(address: str, timeout: float) -> dict[str, Any]:
    """Sync ``scheduler_identity``: fail fast, with one line, when nothing answers."""
    return run_sync(scheduler_identity(address, timeout))


# --------------------------------------------------------------------------------------
# The embedded scheduler process
# --------------------------------------------------------------------------------------


class SchedulerProcess:
    """A ``distributed.Scheduler`` in a helper process; ``address`` once it listens.

    ``dashboard_address`` (dask's spelling, e.g. ``":8787"``, on ``host``; a taken port
    falls back to a free one) serves the dashboard when bokeh is importable; None serves none.
    ``dashboard_link``, once it listens, is the dashboard's address ("" for none).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: int = logging.WARNING,
        dashboard_address: str | None = None,
    ) -> None:
        self.process = start_helper(
            "clusterlaunch.scheduler:serve",
            host,
            str(port),
            str(log_level),
            dashboard_address or "",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.address: str | None = None
        self.dashboard_link = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_address(self, timeout: float) -> str:
        """Block until the scheduler listens; its address."""
        assert self.process.stdout is not None  # Popen(stdout=PIPE) made it
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
        listening = json.loads(buffer.split(b"\n", 1)[0])
        self.address = normalize_address(listening["address"])
        self.dashboard_link = listening["dashboard_link"]
        self.process.stdout.close()
        return self.address

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
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


def serve(parent_pid: int, host: str, port: str, log_level: str, dashboard_address: str) -> None:
    """The scheduler process (a ``spawn.py`` helper): serve until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    asyncio.run(_serve(parent_pid, host, int(port), int(log_level), dashboard_address))


async def _serve(parent_pid: int, host: str, port: int, level: int, dashboard_address: str) -> None:
    from distributed import Scheduler
    from distributed.utils import format_dashboard_link

    logging.getLogger("distributed").setLevel(level)
    dashboard = bool(dashboard_address) and importlib.util.find_spec("bokeh") is not None
    if dashboard_address.startswith(":"):  # no host: the scheduler's, not every interface
        dashboard_address = host + dashboard_address
    # Without a dashboard its HTTP server (health, metrics) gets a free port on our host.
    scheduler = Scheduler(
        host=host,
        port=port,
        dashboard=dashboard,
        dashboard_address=dashboard_address if dashboard else f"{host}:0",
    )
    await scheduler
    http: Any = scheduler.http_server  # distributed sets address and port once it listens
    link = format_dashboard_link(http.address, http.port) if dashboard else ""
    sys.stdout.write(json.dumps({"address": scheduler.address, "dashboard_link": link}) + "\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # nothing more for the pipe

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stdin() -> None:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:  # the parent closed our stdin or died
            loop.remove_reader(0)
            stop.set()

    def on_parent_death_signal() -> None:
        if orphaned(parent_pid):
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
    # Both ended here, so that nothing is left pending when asyncio.run returns.
    await asyncio.gather(finished, stopped, return_exceptions=True)
