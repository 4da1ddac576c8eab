"""Fixtures shared by the test modules: a real ``dask scheduler`` per module, or one
of a test's own to start workers against. The helpers they are built on (waits,
ports, processes, the scheduler's view of its workers) are in ``procs.py``, which
tests import; task functions for the workers are in ``tasks.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import LocalProcesses

# Every worker the tests start (subprocesses inherit it) checks its state machine's
# invariants after each event: a broken invariant fails the test where it happens.
os.environ.setdefault("CLUSTERLAUNCH_VALIDATE_STATE", "1")


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """The address of a stock dask scheduler in a process of its own, shared by a
    module's tests; killed and reaped after the module."""
    with LocalProcesses() as processes:
        yield processes.start_scheduler()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[LocalProcesses]:
    """A stock dask scheduler of this test's own, ready; the test starts the workers
    it needs. Logs go to ``tmp_path / "processes"``; everything is killed afterwards."""
    log_dir = tmp_path / "processes"
    log_dir.mkdir()
    with LocalProcesses(log_dir) as local:
        local.start_scheduler()
        yield local
