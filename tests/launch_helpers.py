"""Helpers of the launcher, cluster, CLI and plugin tests: waiting for conditions and
checking that processes are gone."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
from procs import wait_for

from clusterlaunch.cluster import SchedulerProcess


def gone(pid: int) -> bool:
    """The process exited (a zombie waiting for a reaper counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: Iterable[int], timeout: float = 15.0, what: str = "processes") -> None:
    pids = [p for p in pids if p]
    wait_for(lambda: all(gone(p) for p in pids), timeout, f"{what} {pids} to exit")


@contextmanager
def running_scheduler() -> Iterator[str]:
    """The address of a dask scheduler in a process of its own, gone afterwards."""
    process = SchedulerProcess()
    try:
        yield process.wait_address(30)
    finally:
        process.stop()
    wait_gone([process.pid], what="the scheduler")


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registered(client: Any) -> dict[str, dict]:
    """The scheduler's workers, address -> identity."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # distributed before n_workers existed lists them all
        return client.scheduler_info()["workers"]
