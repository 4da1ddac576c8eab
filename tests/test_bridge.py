"""The one sync-to-async bridge (``bridge.LoopThread``, ``run_sync``): results and
errors travel back, timeouts cancel, close joins every thread it started; and the fork
server, which forks workers, runs no bridge (nor any thread but its own)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import warnings

import psutil
import pytest
from procs import subprocess_env, wait_for

from clusterlaunch import Launcher
from clusterlaunch.bridge import LoopThread, run_sync

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def no_thread_left_behind():
    before = set(threading.enumerate())
    yield
    wait_for(lambda: set(threading.enumerate()) <= before, 10, "the bridge's threads to end")


async def where() -> int:
    await asyncio.sleep(0)
    return threading.get_ident()


async def fail() -> None:
    await asyncio.sleep(0)
    raise ValueError("raised on the bridge")


@pytest.mark.usefixtures("no_thread_left_behind")
def test_sync_call_from_plain_code_runs_on_the_bridge_thread():
    with LoopThread("test-bridge") as bridge:
        ident = bridge.run(where())
        assert ident == bridge._thread.ident != threading.get_ident()
        assert bridge.run(where(), timeout=5) == ident  # the same loop, call after call
    assert run_sync(where()) != threading.get_ident()


@pytest.mark.usefixtures("no_thread_left_behind")
def test_sync_call_from_inside_a_running_loop():
    async def notebook_cell() -> int:
        # Sync code called by a coroutine (a notebook cell): asyncio.run would refuse.
        return run_sync(where())

    assert asyncio.run(notebook_cell()) != threading.get_ident()


@pytest.mark.usefixtures("no_thread_left_behind")
def test_exception_travels_back_to_the_caller():
    with LoopThread("test-bridge") as bridge:
        with pytest.raises(ValueError, match="raised on the bridge"):
            bridge.run(fail())
        assert bridge.run(where())  # the bridge still works afterwards
    with pytest.raises(ValueError, match="raised on the bridge"):
        run_sync(fail())


@pytest.mark.usefixtures("no_thread_left_behind")
def test_timeout_cancels_the_coroutine_and_says_so():
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def own_timeout() -> None:
        raise TimeoutError("the coroutine's own")

    with LoopThread("test-bridge") as bridge:
        with pytest.raises(TimeoutError, match="too slow"):
            bridge.run(slow(), timeout=0.05, timeout_message="too slow")
        assert cancelled.wait(5)
        with pytest.raises(TimeoutError, match="the coroutine's own"):
            bridge.run(own_timeout(), timeout=5)


def test_close_cancels_and_awaits_what_runs_and_joins_every_thread():
    before = set(threading.enumerate())
    finished = threading.Event()
    started = threading.Event()

    async def long_running() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            finished.set()

    bridge = LoopThread("test-bridge")
    future = bridge.submit(long_running())
    assert started.wait(5)
    bridge.run(asyncio.to_thread(threading.get_ident))  # starts an executor thread
    thread = bridge._thread
    bridge.close()
    assert finished.is_set()  # awaited, not just cancelled, by the time close returns
    assert future.cancelled()
    assert not thread.is_alive()
    assert set(threading.enumerate()) <= before
    bridge.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        bridge.run(where())


@pytest.mark.usefixtures("no_thread_left_behind")
def test_run_blocking_from_another_loop_and_close_joins_its_executor():
    with LoopThread("test-bridge") as bridge:

        async def caller() -> int:
            return await bridge.run_blocking(threading.get_ident)

        ident = asyncio.run(caller())
        assert ident not in (threading.get_ident(), bridge._thread.ident)


@pytest.mark.usefixtures("no_thread_left_behind")
def test_run_from_the_bridge_thread_itself_is_refused():
    with LoopThread("test-bridge") as bridge:

        async def reenter() -> None:
            bridge.run(where())

        with pytest.raises(RuntimeError, match="its own loop"):
            bridge.run(reenter(), timeout=5)


@pytest.mark.usefixtures("no_thread_left_behind")
def test_a_forked_child_refuses_the_parents_bridge():
    with LoopThread("test-bridge") as bridge:
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
            pid = os.fork()
        if pid == 0:
            try:
                bridge.run(where(), timeout=1)
                answer = b"ran"
            except RuntimeError as e:
                answer = b"refused" if b"belongs to process" in str(e).encode() else b"other"
            except BaseException:
                answer = b"other"
            bridge.close()  # leaves the parent's loop alone
            os.write(write_end, answer)
            os._exit(0)
        os.close(write_end)
        answer = os.read(read_end, 100)
        os.close(read_end)
        os.waitpid(pid, 0)
        assert answer == b"refused"
        assert bridge.run(where())  # the parent's bridge still runs


def test_the_fork_server_runs_no_bridge_nor_any_other_thread(scheduler):
    # It forks workers: with a second thread, a fork could copy a lock held there.
    with Launcher(scheduler, n=1) as launcher:
        assert len(launcher.workers) == 1
        assert psutil.Process(launcher.fork_server_pid).num_threads() == 1


AT_EXIT_SCRIPT = """
import atexit


def at_exit():
    import asyncio, weakref
    from clusterlaunch.bridge import LoopThread

    bridge = LoopThread("at-exit")  # as a launcher closing at exit makes one
    bridge.run(asyncio.sleep(0))
    bridge.close()
    print(weakref.finalize._shutdown, bridge._thread.is_alive(), flush=True)


atexit.register(at_exit)  # runs after weakref's own exit hook, registered below
from clusterlaunch.bridge import LoopThread

LoopThread("left-open")  # collected at once: its finalizer closes it
"""


def test_a_bridge_made_at_exit_after_the_finalizers_ran_is_still_joined():
    out = subprocess.run(
        [sys.executable, "-c", AT_EXIT_SCRIPT],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]
