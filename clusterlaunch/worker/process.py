"""One worker as a whole process: its event loop, signals and exit.

Every way of starting a worker process — ``python -m clusterlaunch.worker``,
``clusterlaunch worker`` — ends in ``run_worker_process``, and so in ``exit_now``: the
one exit of a worker process. (A fork server's child runs ``run_worker`` and leaves by
``os._exit`` the same way.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from clusterlaunch.worker.options import WorkerOptions, check_local_directory
from clusterlaunch.worker.worker import Worker

logger = logging.getLogger("clusterlaunch.worker")


def configure_logging(level: int = logging.INFO) -> None:
    """Worker logs go to stderr; each line carries the worker's address itself."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("clusterlaunch")
    root.addHandler(handler)
    root.setLevel(level)


async def serve(options: WorkerOptions, on_ready: Callable[[str], None] | None = None) -> int:
    """Run a worker until it closes; SIGTERM and SIGINT close it cleanly."""
    try:
        check_local_directory(options.local_directory)
        worker = Worker(options)
    except (OSError, ValueError) as e:
        logger.error("worker could not start: %s", e)
        return 1
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # The worker owns the closing task; serve waits for it through finished().
        loop.add_signal_handler(signum, worker.begin_close, signal.Signals(signum).name)
    try:
        await worker.start()
    except (OSError, ValueError) as e:
        logger.error("worker could not start: %s", e)
        await worker.close(reason="start failed", report=False)
        return 1
    if on_ready is not None and worker.status == "running":
        on_ready(worker.address)
    await worker.finished()
    return 0


def run_worker(options: WorkerOptions, on_ready: Callable[[str], None] | None = None) -> int:
    """Run one worker in this process until it closes; returns the exit code.

    The process imports distributed only when a task or plugin needs it (see
    ``worker.surface``).
    """
    return asyncio.run(serve(options, on_ready))


def run_worker_process(options: WorkerOptions, log_level: int = logging.INFO) -> NoReturn:
    """The whole of a worker process from here on: log to stderr, run the worker, exit."""
    configure_logging(log_level)
    code = 1
    try:
        code = run_worker(options)
    except BaseException:
        logger.exception("worker failed")
    finally:
        exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Leave without joining threads: a task still running when the worker closed (one
    the scheduler cancelled, or a SIGTERM arrived during) must not keep the process
    alive, and no thread can be interrupted inside it. So no ``sys.exit`` here: the
    interpreter's exit would wait for such threads (those of any executor a task or a
    library started, too)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
