"""One worker as a whole process: its event loop, signals and exit code."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from clusterlaunch.protocol import pickling
from clusterlaunch.worker.options import WorkerOptions
from clusterlaunch.worker.worker import Worker

logger = logging.getLogger("clusterlaunch.worker")

#: What a worker process never imports: it is not a dask worker of distributed's.
REFUSED_PACKAGES = ("distributed", "tornado")


def configure_logging(level: int = logging.INFO) -> None:
    """Worker logs go to stderr; each line carries the worker's address itself."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("clusterlaunch")
    root.addHandler(handler)
    root.setLevel(level)


async def serve(options: WorkerOptions, on_ready: Callable[[str], None] | None = None) -> int:
    """Run a worker until it closes; SIGTERM and SIGINT close it cleanly."""
    worker = Worker(options)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(
            signum, lambda s=signum: loop.create_task(worker.close(reason=signal.Signals(s).name))
        )
    try:
        await worker.start()
    except (OSError, ValueError) as e:
        logger.error("worker could not start: %s", e)
        await worker.close(reason="start failed", report=False)
        return 1
    if on_ready is not None:
        on_ready(worker.address)
    await worker.finished()
    return 0


def run_worker(options: WorkerOptions, on_ready: Callable[[str], None] | None = None) -> int:
    """Run one worker in this process until it closes; returns the exit code.

    The process never imports distributed or tornado, not even to unpickle a task that
    names them: such a task fails with an error saying what it needs.
    """
    pickling.refuse_packages(*REFUSED_PACKAGES)
    return asyncio.run(serve(options, on_ready))
