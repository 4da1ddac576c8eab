"""``addprocs``: N workers for a scheduler in one call, like Julia's ``addprocs``.

Behind it is one ``Launcher`` per scheduler address for the life of this process:
``shutdown(addresses)`` stops its workers, the launcher stops its fork server once
it has none left, and any left stop when this process exits (``launcher.py``).
"""

from __future__ import annotations

import threading
from typing import Any

from clusterlaunch.comm.addressing import normalize_address
from clusterlaunch.launcher import DEFAULT_START_TIMEOUT, Launcher, default_n_workers
from clusterlaunch.scheduler import check_scheduler

#: scheduler address -> the launcher addprocs uses for it.
_LAUNCHERS: dict[str, Launcher] = {}
_LOCK = threading.Lock()


def addprocs(
    n: int | None = None,
    scheduler_address: str | None = None,
    *,
    timeout: float = DEFAULT_START_TIMEOUT,
    **options: Any,
) -> list[str]:
    """Start ``n`` workers for the scheduler and return their addresses, like Julia's
    ``addprocs``. ``shutdown(addresses)`` stops them; the rest stop when this process
    exits. ``options`` are ``Launcher``'s (``nthreads``, ``resources``, ...), taken
    from the first call for a scheduler."""
    if scheduler_address is None:
        import dask.config

        scheduler_address = dask.config.get("scheduler-address", None)
        if not scheduler_address:
            raise ValueError("addprocs needs a scheduler address (or DASK_SCHEDULER_ADDRESS)")
    address = normalize_address(scheduler_address)
    if n is None:
        n = default_n_workers()
    with _LOCK:
        launcher = _LAUNCHERS.get(address)
        if launcher is None or launcher.closing:
            check_scheduler(address, timeout)
            launcher = Launcher(address, n=0, **options)
            _LAUNCHERS[address] = launcher
    return launcher.add_workers(n, timeout=timeout)


def close_idle_launchers() -> None:
    """``addprocs`` launchers left without workers stop their fork server."""
    with _LOCK:
        idle = [
            (address, launcher)
            for address, launcher in _LAUNCHERS.items()
            if not launcher.processes
        ]
        for address, _ in idle:
            del _LAUNCHERS[address]
    for _, launcher in idle:
        launcher.close()
