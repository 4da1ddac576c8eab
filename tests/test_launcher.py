"""The launcher against a real distributed.Scheduler and Client: starting, tracking,
supervising and shutting down worker processes, and leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest
from procs import LocalProcesses, free_port, gone, registered, wait_for, wait_gone, worker_address
from tasks import add, worker_facts

from clusterlaunch import Launcher, LaunchError, SchedulerUnreachable, addprocs, shutdown
from clusterlaunch.cli import worker_kind

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def client(scheduler):
    from distributed import Client

    with Client(scheduler, timeout=30) as c:
        yield c


def test_start_registers_workers_and_tracks_their_pids(scheduler, client):
    with Launcher(scheduler, n=3) as launcher:
        workers = launcher.workers
        assert len(workers) == 3
        # start() returns once every worker has registered.
        info = registered(client)
        assert set(workers) <= set(info)
        assert all("clusterlaunch" in info[a] for a in workers)
        pids = launcher.pids
        assert set(pids) == set(workers)
        children = psutil.Process(launcher.fork_server_pid).children()
        assert {c.pid for c in children} == set(pids.values())
        assert client.submit(add, 1, 2, workers=[workers[0]]).result() == 3
        fork_server = launcher.fork_server_pid
        scratch = launcher.scratch_directory
        assert all(info[a]["local_directory"].startswith(scratch) for a in workers)
    wait_gone([*pids.values(), fork_server], what="workers and fork server")
    assert not os.path.exists(scratch)
    wait_for(lambda: not set(workers) & set(registered(client)), 10, "workers to unregister")


def test_workers_are_lean_and_see_the_launcher_sys_path(scheduler, client):
    with Launcher(scheduler, n=1) as launcher:
        (facts,) = client.run(worker_facts, workers=launcher.workers).values()
    assert facts["distributed"] is False
    assert facts["tornado"] is False
    assert facts["sys_path"] == sys.path
    assert facts["cwd"] == os.getcwd()
    assert facts["ppid"] != os.getpid()  # forked by the fork server, not by us


def test_workers_stay_lean_after_running_tasks(scheduler, client):
    with Launcher(scheduler, n=1) as launcher:
        assert client.submit(add, 1, 1, workers=launcher.workers).result() == 2
        (facts,) = client.run(worker_facts, workers=launcher.workers).values()
    assert facts["distributed"] is False
    assert facts["tornado"] is False


def test_add_remove_and_scale(scheduler, client):
    with Launcher(scheduler, n=1) as launcher:
        new = launcher.add_workers(2)
        assert len(new) == 2
        assert len(launcher.workers) == 3
        assert set(new) <= set(registered(client))
        pid = launcher.pids[new[0]]
        launcher.remove_workers([new[0]])
        assert gone(pid)
        assert new[0] not in launcher.workers
        wait_for(lambda: new[0] not in registered(client), 10, "the removed worker to go")
        assert len(launcher.scale(1)) == 1
        assert len(launcher.scale(3)) == 3
        assert set(launcher.workers) <= set(registered(client))
        with pytest.raises(ValueError, match="not a worker of this launcher"):
            launcher.remove_workers(["tcp://127.0.0.1:1"])


def test_supervised_worker_killed_is_replaced(scheduler, client):
    with Launcher(scheduler, n=2, supervise=True) as launcher:
        victim, pid = next(iter(launcher.pids.items()))
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: victim not in launcher.workers and len(launcher.workers) == 2,
            20,
            "a replacement worker",
        )
        replacement = (set(launcher.workers) - {victim}).pop()
        wait_for(lambda: replacement in registered(client), 10, "the replacement to register")
        assert client.submit(add, 2, 3, workers=[replacement]).result() == 5


def test_unsupervised_worker_killed_is_not_replaced(scheduler):
    with Launcher(scheduler, n=2, supervise=False) as launcher:
        victim, pid = next(iter(launcher.pids.items()))
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: victim not in launcher.workers, 10, "the launcher to see the death")
        # A replacement would have been requested as the exit was handled.
        assert len(launcher.processes) == 1


def test_shutdown_our_and_stock_workers_by_address(scheduler, client, tmp_path):
    with LocalProcesses(tmp_path) as stock_processes, Launcher(scheduler, n=2) as launcher:
        stock = stock_processes.start_worker(stock=True, address=scheduler)
        ours = launcher.workers[0]
        our_pid = launcher.pids[ours]
        stock_address = worker_address(client, stock)
        # `clusterlaunch status` tells the two kinds apart by what they registered.
        info = registered(client)
        assert worker_kind(info[ours]).startswith("clusterlaunch")
        assert worker_kind(info[stock_address]) == "dask"
        shutdown([ours, stock_address], timeout=30)
        assert gone(our_pid)  # ours: the process has exited when shutdown returns
        stock.wait(10)
        assert launcher.workers == [launcher.workers[0]] != [ours]
        wait_for(
            lambda: not {ours, stock_address} & set(registered(client)),
            10,
            "both workers to leave the scheduler",
        )


def test_shutdown_of_an_address_nobody_listens_on_returns():
    shutdown([f"tcp://127.0.0.1:{free_port()}"], timeout=5)


def test_shutdown_rejects_malformed_address():
    with pytest.raises(ValueError, match="invalid address"):
        shutdown(["not an address"])


def test_addprocs_then_shutdown(scheduler, client):
    addresses = addprocs(2, scheduler)
    assert len(addresses) == 2
    assert set(addresses) <= set(registered(client))
    from clusterlaunch.addprocs import _LAUNCHERS

    launcher = _LAUNCHERS[scheduler]
    pids = [*launcher.pids.values(), launcher.fork_server_pid]
    shutdown(addresses)
    # The last worker gone, addprocs' launcher stops its fork server too.
    wait_gone(pids, what="workers and fork server")
    assert scheduler not in _LAUNCHERS


def test_unreachable_scheduler_fails_fast_naming_it():
    address = f"tcp://127.0.0.1:{free_port()}"
    launcher = Launcher(address, n=1)
    with pytest.raises(SchedulerUnreachable, match=address):
        launcher.start(timeout=1)
    assert (
        launcher.fork_server_pid is None
        or gone(launcher.fork_server_pid)
        or wait_gone([launcher.fork_server_pid]) is None
    )


def test_workers_that_do_not_register_in_time_are_stopped():
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody answers: workers keep retrying
    launcher = Launcher(address, n=0)
    try:
        with pytest.raises(LaunchError, match=f"did not register with the scheduler at {address}"):
            launcher.add_workers(2, timeout=0.5)
        # Killed as soon as they exist, even if the fork server was still booting.
        wait_for(lambda: not launcher.processes, 15, "the unregistered workers to be stopped")
        assert psutil.Process(launcher.fork_server_pid).children() == []
    finally:
        launcher.close()


def test_worker_that_cannot_start_is_reported(scheduler):
    with Launcher(scheduler, n=0) as launcher:
        launcher.add_workers(1)
        taken = int(launcher.workers[0].rsplit(":", 1)[1])
        launcher._options["port"] = taken  # a second worker can't bind the same port
        with pytest.raises(LaunchError, match="exited before registering"):
            launcher.add_workers(1, timeout=20)
        assert len(launcher.workers) == 1


@pytest.mark.parametrize("kwargs", [{"nthreads": 0}, {"n": -1}, {"resources": "GPU"}])
def test_bad_options_are_rejected_up_front(kwargs):
    kwargs = {"n": 1, **kwargs}
    with pytest.raises(ValueError):
        Launcher("tcp://127.0.0.1:8786", **kwargs)


def test_fork_server_outlives_the_thread_that_started_it(scheduler):
    # PR_SET_PDEATHSIG fires when the spawning *thread* exits; that must not be taken
    # for the launcher's death.
    launcher = Launcher(scheduler, n=1)
    thread = threading.Thread(target=launcher.start)  # spawns the fork server
    thread.start()
    thread.join()
    try:
        assert len(launcher.workers) == 1
        native_id = thread.native_id
        wait_for(
            lambda: not os.path.exists(f"/proc/self/task/{native_id}"), 10, "the thread to end"
        )
        launcher.add_workers(1)  # a round trip through the fork server, after the signal
        assert not gone(launcher.fork_server_pid)
        assert len(launcher.workers) == 2
    finally:
        launcher.close()


def test_fork_server_killed_takes_its_workers(scheduler):
    with Launcher(scheduler, n=2) as launcher:
        pids = list(launcher.pids.values())
        os.kill(launcher.fork_server_pid, signal.SIGKILL)
        wait_gone(pids, what="workers of the killed fork server")
        wait_for(lambda: not launcher.workers, 10, "the launcher to notice")
        with pytest.raises(LaunchError, match="fork server"):
            launcher.add_workers(1)


ORPHAN_SCRIPT = textwrap.dedent(
    """
    import json, threading
    from clusterlaunch import LocalCluster

    cluster = LocalCluster(n=2)
    print(json.dumps({
        "workers": list(cluster.launcher.pids.values()),
        "fork_server": cluster.launcher.fork_server_pid,
        "scheduler": cluster.scheduler_pid,
        "scratch": cluster.launcher.scratch_directory,
    }), flush=True)
    threading.Event().wait()
    """
)


def test_no_orphans_when_the_launcher_is_killed(tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(ORPHAN_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, cwd=tmp_path, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line, "the launcher script printed nothing"
        pids = json.loads(line)
        children = [*pids["workers"], pids["fork_server"], pids["scheduler"]]
        assert len(children) == 4 and not any(gone(p) for p in children)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_gone(children, what="workers, fork server and scheduler of the killed launcher")
        assert not os.path.exists(pids["scratch"])  # the fork server removed it on its way
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
