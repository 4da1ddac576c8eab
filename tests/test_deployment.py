"""``LocalCluster`` and ``clusterlaunch up`` start and stop through the one
``deployment.Deployment``: the same steps in the same order, and nothing left running."""

from __future__ import annotations

import logging
import re
import sys

import pytest
from procs import no_processes_left

from clusterlaunch import LocalCluster
from clusterlaunch.cli import app

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def no_processes_left_behind():
    with no_processes_left("the test's processes"):
        yield


def steps(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the deployment logged, pids and addresses left out."""
    messages = [r.getMessage() for r in caplog.records if r.name == "clusterlaunch.deployment"]
    caplog.clear()
    return [re.sub(r"tcp://\S+|\d+", "_", m) for m in messages]


def run_up(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        app(args=["up", *args, "--", sys.executable, "-c", "pass"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("own_scheduler", [True, False], ids=["own", "given"])
def test_local_cluster_and_up_take_the_same_steps(own_scheduler, scheduler, caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="clusterlaunch.deployment")
    with LocalCluster(n=1, scheduler=None if own_scheduler else scheduler):
        pass
    of_cluster = steps(caplog)
    run_up("--n", "1", *([] if own_scheduler else ["--scheduler", scheduler]))
    of_up = steps(caplog)
    assert of_cluster == of_up
    started = "scheduler started at _ (pid _)" if own_scheduler else "scheduler at _ answers"
    expected = [
        "fork server started (pid _)",
        started,
        "_ workers started",
        "stopping the workers and the fork server",
        *(["stopping the scheduler (pid _)"] if own_scheduler else []),
        "stopped",
    ]
    assert of_cluster == expected
