"""Helpers of the tests (and the benchmarks) that run real things: waits for a
condition with a timeout, free ports, the scheduler's view of its workers, and real
processes -- a stock ``dask scheduler``, our workers and stock ``dask worker
--no-nanny`` processes, each a subprocess whose output goes to a log file, all killed
by ``close()`` so that a test leaves no process or port behind.

Nothing here uses the launcher or ``LocalCluster``: the scheduler these tests start
is distributed's own, whatever part of clusterlaunch they test. The pytest fixtures
built on these live in ``conftest.py``; task functions in ``tasks.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy, and return that; fail
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        _fail_past(deadline, timeout, what)
        time.sleep(interval)
    return result


async def wait_for_async(
    condition: Callable[[], T], timeout: float, what: str, interval: float = 0.005
) -> T:
    """``wait_for`` inside an event loop: the loop runs while ``condition`` is polled."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        _fail_past(deadline, timeout, what)
        await asyncio.sleep(interval)
    return result


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    """Run ``coro`` on a fresh event loop, failing the test if it takes over ``timeout``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _fail_past(deadline: float, timeout: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gone(pid: int) -> bool:
    """The process exited (a zombie waiting for a reaper counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: Iterable[int], timeout: float = 15.0, what: str = "processes") -> None:
    pids = [p for p in pids if p]
    wait_for(lambda: all(gone(p) for p in pids), timeout, f"{what} {pids} to exit")


def live_children() -> set[int]:
    """This process's descendants that have not exited."""
    return {p.pid for p in psutil.Process().children(recursive=True) if not gone(p.pid)}


@contextmanager
def no_processes_left(what: str, timeout: float = 15.0) -> Iterator[None]:
    """Every process started inside the block has exited within ``timeout`` of its end."""
    before = live_children()
    yield
    wait_for(lambda: not live_children() - before, timeout, f"{what} to exit")


def subprocess_env() -> dict[str, str]:
    """The environment of every child: the tests dir (for task functions pickled by
    reference) and the repo (for clusterlaunch) on ``sys.path``."""
    env = dict(os.environ)
    paths = [str(TESTS_DIR), str(REPO_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    # Keep stock dask processes quiet and fast to start.
    env.setdefault("DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__GIL__ENABLED", "False")
    return env


class Proc:
    """One child process with its combined stdout/stderr in a log file."""

    def __init__(
        self,
        args: Sequence[str],
        log_dir: Path,
        label: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.label = label
        self.args = list(args)
        self.log_path = log_dir / f"{label}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**subprocess_env(), **(env or {})},
            cwd=log_dir,
        )
        self.pid = self.popen.pid

    def __repr__(self) -> str:
        return f"<Proc {self.label} pid={self.pid} rc={self.popen.poll()}>"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"{self.label} (pid {self.pid}) still running after {timeout:g} s;"
                f" log:\n{self.log()[-3000:]}"
            ) from None

    def kill(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; reap it either way."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


class LocalProcesses:
    """A scheduler subprocess plus worker subprocesses, and a way to find them."""

    def __init__(self, log_dir: Path | None = None) -> None:
        self._tmp = None
        if log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="clusterlaunch-test-")
            log_dir = Path(self._tmp.name)
        self.log_dir = log_dir
        self.scheduler: Proc | None = None
        self.address = ""
        self.workers: list[Proc] = []
        self._count = 0
        self._schedulers = 0
        self._dead: list[Proc] = []

    def __enter__(self) -> LocalProcesses:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def start_scheduler(
        self,
        timeout: float = 30.0,
        port: int = 0,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> str:
        """Start a scheduler (replacing a dead one: its log and file are kept aside),
        with ``env`` added to its environment and ``args`` to its command line."""
        self._schedulers += 1
        label = "scheduler" if self._schedulers == 1 else f"scheduler-{self._schedulers}"
        scheduler_file = self.log_dir / f"{label}.json"
        if self.scheduler is not None:
            self._dead.append(self.scheduler)
        self.scheduler = Proc(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
                *args,
            ],
            self.log_dir,
            label,
            env,
        )

        def address() -> str | None:
            if not self.scheduler.alive():
                raise RuntimeError(f"scheduler exited:\n{self.scheduler.log()[-3000:]}")
            try:
                return json.loads(scheduler_file.read_text())["address"]
            except (FileNotFoundError, ValueError, KeyError):
                return None

        self.address = wait_for(address, timeout, "the scheduler file")
        return self.address

    def start_worker(
        self,
        *args: str,
        stock: bool = False,
        address: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        """Start one worker (ours, or a stock ``dask worker --no-nanny``) against
        ``address`` (default: our scheduler) with extra CLI ``args`` and ``env``."""
        self._count += 1
        target = address or self.address
        if stock:
            argv = [sys.executable, "-m", "distributed.cli.dask_worker", target, "--no-nanny"]
            label = f"stock-worker-{self._count}"
        else:
            argv = [sys.executable, "-m", "clusterlaunch.worker", target]
            label = f"worker-{self._count}"
        if "--name" not in args:
            args = (*args, "--name", label)
        proc = Proc([*argv, *args], self.log_dir, label, env)
        self.workers.append(proc)
        return proc

    def logs(self) -> str:
        """The end of every process's log, for a failing assertion's message."""
        procs = [p for p in [*self._dead, self.scheduler, *self.workers] if p is not None]
        return "\n".join(f"----- {p!r}\n{p.log()[-4000:]}" for p in procs)

    def close(self) -> None:
        for proc in self.workers:
            proc.kill()
        for proc in [*self._dead, self.scheduler]:
            if proc is not None:
                proc.kill()
        if self._tmp is not None:
            self._tmp.cleanup()


def registered(client: Any) -> dict[str, dict]:
    """The scheduler's workers, address -> identity, as ``client`` (a
    ``distributed.Client`` or ours) learns them from the scheduler."""
    scheduler_info: Callable[..., dict] = client.scheduler_info
    # Newer distributed lists only some workers unless asked for all; older releases
    # and our Client have no such option and list them all.
    if "n_workers" in inspect.signature(scheduler_info).parameters:
        return scheduler_info(n_workers=-1)["workers"]
    return scheduler_info()["workers"]


def worker_address(client: Any, proc: Proc, timeout: float = 60.0) -> str:
    """Wait until ``proc`` (started with ``--name`` = its label) has registered with
    ``client``'s scheduler, and return its address there; fail at once if it exits."""

    def find() -> str | None:
        if not proc.alive():
            raise RuntimeError(f"{proc.label} exited:\n{proc.log()[-3000:]}")
        for address, info in registered(client).items():
            if info.get("name") == proc.label:
                return address
        return None

    return wait_for(find, timeout, f"{proc.label} to register", interval=0.05)
