"""``LocalCluster`` and ``clusterlaunch up`` start and stop through the one
``cluster.Deployment``: the same steps in the same order, and nothing left running."""

from __future__ import annotations

import logging
import re
import sys

import psutil
import pytest
from launch_helpers import gone, running_scheduler, wait_for

from clusterlaunch import LocalCluster
from clusterlaunch.cli import app

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def no_processes_left_behind():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield

    def new_children() -> set[int]:
        now = psutil.Process().children(recursive=True)
        return {p.pid for p in now if p.pid not in before and not gone(p.pid)}

    wait_for(lambda: not new_children(), 15, "the test's processes to exit")


def steps(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the deployment logged, pids and addresses left out."""
    messages = [r.getMessage() for r in caplog.records if r.name == "clusterlaunch.cluster"]
    caplog.clear()
    return [re.sub(r"tcp://\S+|\d+", "_", m) for m in messages]


def run_up(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        app(args=["up", *args, "--", sys.executable, "-c", "pass"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("own_scheduler", [True, False], ids=["own", "given"])
def test_local_cluster_and_up_take_the_same_steps(own_scheduler, caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="clusterlaunch.cluster")
    with running_scheduler() as given:
        scheduler = [] if own_scheduler else ["--scheduler", given]
        with LocalCluster(n=1, scheduler=None if own_scheduler else given):
            pass
        of_cluster = steps(caplog)
        run_up("--n", "1", *scheduler)
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
