"""SIGTERM ends a worker process promptly while a task blocks, whichever entry point
started it: ``python -m clusterlaunch.worker`` and ``clusterlaunch worker`` share one
exit path, which does not wait for the thread still running the task.

Real processes: a stock ``dask scheduler``, our worker started through each entry
point, the real ``distributed.Client`` in this process.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import tasks
from distributed import Client
from procs import LocalProcesses, Proc, registered, wait_for, worker_address

pytestmark = pytest.mark.timeout(90)

CONSOLE_SCRIPT = Path(sys.executable).with_name("clusterlaunch")
ENTRY_POINTS = {
    "python -m clusterlaunch.worker": [sys.executable, "-m", "clusterlaunch.worker"],
    "clusterlaunch worker": (
        [str(CONSOLE_SCRIPT), "worker"]
        if CONSOLE_SCRIPT.exists()
        else [sys.executable, "-m", "clusterlaunch.cli", "worker"]
    ),
}
#: Far longer than a prompt exit takes, far shorter than the task's 60 s.
EXIT_TIMEOUT = 15


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_sigterm_ends_the_worker_while_a_task_blocks(entry_point: str, tmp_path: Path) -> None:
    started = tmp_path / "task-started"
    with LocalProcesses() as procs:
        procs.start_scheduler()
        worker = Proc(
            [*ENTRY_POINTS[entry_point], procs.address, "--name", "blocked"],
            procs.log_dir,
            "blocked",
        )
        procs.workers.append(worker)  # killed on the way out if the test fails
        with Client(procs.address, timeout=30, set_as_default=False) as client:
            address = worker_address(client, worker)
            client.submit(
                tasks.block,
                str(tmp_path / "never-created"),
                60,
                str(started),
                workers=[address],
                pure=False,
            )
            wait_for(started.exists, 30, "the blocking task to start")
            worker.signal(signal.SIGTERM)
            assert worker.wait(EXIT_TIMEOUT) == 0, worker.log()
            wait_for(
                lambda: address not in registered(client),
                EXIT_TIMEOUT,
                "the scheduler to drop the worker",
            )
        assert "closing (SIGTERM)" in worker.log()
