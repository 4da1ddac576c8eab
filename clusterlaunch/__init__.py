"""clusterlaunch: lean dask workers of our own, launched like addprocs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Names are imported on first use: a worker process imports this package too, and
# must not pay for (or pull in) distributed through LocalCluster.
_EXPORTS = {
    "Client": "clusterlaunch.client",
    "Future": "clusterlaunch.futures",
    "LocalCluster": "clusterlaunch.cluster",
    "Launcher": "clusterlaunch.launcher",
    "LaunchError": "clusterlaunch.spawn",
    "SchedulerUnreachable": "clusterlaunch.scheduler",
    "addprocs": "clusterlaunch.addprocs",
    "shutdown": "clusterlaunch.shutdown",
    "Worker": "clusterlaunch.worker.worker",
}

__all__ = [
    "Client",
    "Future",
    "LaunchError",
    "Launcher",
    "LocalCluster",
    "SchedulerUnreachable",
    "Worker",
    "__version__",
    "addprocs",
    "shutdown",
]

if TYPE_CHECKING:
    from clusterlaunch.addprocs import addprocs
    from clusterlaunch.client import Client
    from clusterlaunch.cluster import LocalCluster
    from clusterlaunch.futures import Future
    from clusterlaunch.launcher import Launcher
    from clusterlaunch.scheduler import SchedulerUnreachable
    from clusterlaunch.shutdown import shutdown
    from clusterlaunch.spawn import LaunchError
    from clusterlaunch.worker.worker import Worker


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clusterlaunch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
