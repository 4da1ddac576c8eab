"""The clusterlaunch command, run as a real console script against real processes."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest
from procs import (
    Proc,
    free_port,
    gone,
    registered,
    subprocess_env,
    wait_for,
    wait_gone,
    worker_address,
)

from clusterlaunch.scheduler import check_scheduler

pytestmark = pytest.mark.timeout(90)

SCRIPT = Path(sys.executable).with_name("clusterlaunch")
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "clusterlaunch.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


class Lines:
    """Lines of a child's stream, read by a thread, waited for with a timeout."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def until(self, predicate, timeout: float) -> list[str]:
        while not predicate(self.seen):
            try:
                self.seen.append(self.lines.get(timeout=timeout))
            except queue.Empty:
                raise AssertionError(f"timed out; output so far: {self.seen}") from None
        return self.seen


def unreachable() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


BAD_INPUT = [
    (["up", "--n", "-1"], "--nworkers must be >= 0"),
    (["up", "--nworkers", "-2"], "--nworkers must be >= 0"),
    (["up", "--log-level", "loud"], "invalid --log-level"),
    (["worker", "tcp://127.0.0.1:8786", "--nthreads", "0"], "--nthreads must be >= 1"),
    (["worker", "tcp://127.0.0.1:8786", "--memory-limit", "lots"], "invalid --memory-limit"),
    (["worker", "tcp://127.0.0.1:8786", "--bogus"], "No such option"),
    (["status"], "set DASK_SCHEDULER_ADDRESS"),
    (["shutdown", "--all"], "set DASK_SCHEDULER_ADDRESS"),
    (["up", "--n", "abc"], "--n"),
    (["up", "--nthreads", "0"], "--nthreads must be >= 1"),
    (["up", "--resources", "GPU"], "invalid resource"),
    (["up", "--memory-limit", "lots"], "invalid --memory-limit"),
    (["up", "--timeout", "0"], "--timeout must be a positive number"),
    (["up", "--scheduler", "tcp://nohost"], "invalid address"),
    (["status", "not-an-address"], "invalid address"),
    (["shutdown", "tcp://127.0.0.1:notaport"], "invalid address"),
    (["shutdown"], "give worker addresses, or --all"),
    (["worker", "not-an-address"], "invalid address"),
    (["nosuchcommand"], "No such command"),
]


def assert_one_line_error(code: int, stderr: str, message: str) -> None:
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert message in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(("args", "message"), BAD_INPUT[:2])
def test_bad_input_from_the_console_script(args, message):
    result = run(*args)
    assert_one_line_error(result.returncode, result.stderr, message)


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_line_and_nonzero(args, message, capsys):
    from clusterlaunch.cli import app

    with pytest.raises(SystemExit) as exit_info:
        app(args=args)
    code = exit_info.value.code
    assert_one_line_error(code if isinstance(code, int) else 1, capsys.readouterr().err, message)


@pytest.mark.parametrize("command", ["up --n 1", "status"])
def test_unreachable_scheduler_is_named_and_given_up_on(command):
    address = unreachable()
    args = command.split()
    args += ["--scheduler", address] if args[0] == "up" else [address]
    result = run(*args, "--timeout", "0.5")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"could not reach the dask scheduler at {address}" in line


def test_up_runs_a_command_against_the_cluster_and_returns_its_status():
    code = textwrap.dedent(
        """
        import sys
        import dask
        from distributed import Client

        with Client() as client:  # found through DASK_SCHEDULER_ADDRESS
            workers = client.scheduler_info()["workers"]
            print("workers", len(workers), client.submit(sum, [1, 2]).result())
        print("shuffle", dask.config.get("dataframe.shuffle.method"))
        sys.exit(3)
        """
    )
    result = run("up", "--n", "2", "--", sys.executable, "-c", code, timeout=80)
    assert result.returncode == 3, result.stderr
    assert result.stdout.split("\n")[:2] == ["workers 2 3", "shuffle tasks"]  # its own stdout
    assert re.search(r"^clusterlaunch: 2 workers ready", result.stderr, re.M)


def test_up_status_shutdown_and_sigterm():
    up = subprocess.Popen(
        [*CLI, "up", "--n", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        out = Lines(up.stdout)
        lines = out.until(lambda seen: sum(s.startswith("worker ") for s in seen) == 2, 60)
        address = next(line.split()[1] for line in lines if line.startswith("scheduler "))
        workers = {
            m.group(1): int(m.group(2))
            for m in (re.match(r"worker (\S+) pid=(\d+)", line) for line in lines)
            if m
        }
        helpers = [p.pid for p in psutil.Process(up.pid).children()]  # scheduler, fork server

        status = run("status", address)
        assert status.returncode == 0, status.stderr
        assert f"scheduler {address}: 2 workers" in status.stdout
        for worker in workers:
            assert re.search(rf"^{re.escape(worker)}\s+clusterlaunch", status.stdout, re.M)

        first = next(iter(workers))
        stopped = run("shutdown", first)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == f"stopped {first}"
        wait_gone([workers[first]], what="the shut-down worker")
        wait_for(lambda: len(check_scheduler(address, 5)["workers"]) == 1, 10, "one worker left")

        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        wait_gone([*workers.values(), *helpers], what="the cluster of 'up'")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_worker_command_runs_one_worker_until_shut_down(scheduler, tmp_path):
    from distributed import Client

    args = [*CLI, "worker", scheduler, "--name", "cli-worker", "--nthreads", "2"]
    worker = Proc(args, tmp_path, "cli-worker")
    try:
        with Client(scheduler, timeout=30, set_as_default=False) as client:
            address = worker_address(client, worker)
            assert registered(client)[address]["nthreads"] == 2
        assert psutil.Process(worker.pid).children() == []  # one process, no nanny
        result = run("shutdown", address)
        assert result.returncode == 0, result.stderr
        assert worker.wait(10) == 0, worker.log()
        assert "registered with" in worker.log()  # INFO, the worker's default level
    finally:
        worker.kill()
    assert gone(worker.pid)


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("command", [[], ["up"], ["worker"], ["status"], ["shutdown"]])
def test_help_on_every_command(command, flag, capsys):
    from clusterlaunch.cli import app

    with pytest.raises(SystemExit) as exit_info:
        app(args=[*command, flag])
    assert exit_info.value.code == 0
    assert "Usage: clusterlaunch" in capsys.readouterr().out


def test_version_and_python_dash_m():
    import clusterlaunch

    for prefix in (CLI, [sys.executable, "-m", "clusterlaunch"]):
        result = subprocess.run([*prefix, "--version"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"clusterlaunch {clusterlaunch.__version__}"


def test_shell_completion_names_the_commands_and_flags():
    env = {**subprocess_env(), "_CLUSTERLAUNCH_COMPLETE": "complete_bash"}
    for words, expected in (
        (["clusterlaunch", ""], "worker"),
        (["clusterlaunch", "up", "--nw"], "--nworkers"),
    ):
        env.update(COMP_WORDS=" ".join(words), COMP_CWORD=str(len(words) - 1))
        result = subprocess.run(CLI, capture_output=True, text=True, timeout=30, env=env)
        assert expected in result.stdout.split(), result.stdout + result.stderr
    shown = run("--show-completion", "bash")
    assert "_CLUSTERLAUNCH_COMPLETE" in shown.stdout


def test_python_dash_m_worker_shares_the_cli_error_style():
    result = subprocess.run(
        [sys.executable, "-m", "clusterlaunch.worker", "tcp://127.0.0.1:8786", "--nthreads", "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert_one_line_error(result.returncode, result.stderr, "--nthreads")
    assert result.stderr.startswith("clusterlaunch: error:")


def test_a_refused_connection_fails_at_once_with_the_reason():
    """With a 600 s timeout, only an answer at once ends within the run's 30 s."""
    address = unreachable()
    for args in (["up", "--nworkers", "1", "--scheduler", address], ["status", address]):
        result = run(*args, "--timeout", "600", timeout=30)
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()
        assert f"could not reach the dask scheduler at {address}: connection refused" in line


def test_status_and_shutdown_read_dask_scheduler_address(scheduler, tmp_path):
    from distributed import Client

    worker = Proc(
        [*CLI, "worker", "--log-level", "warning", "--name", "env-worker"],
        tmp_path,
        "env-worker",
        env={"DASK_SCHEDULER_ADDRESS": scheduler},
    )
    try:
        with Client(scheduler, timeout=30, set_as_default=False) as client:
            address = worker_address(client, worker)
        env = {**subprocess_env(), "DASK_SCHEDULER_ADDRESS": scheduler}
        status = subprocess.run(
            [*CLI, "status"], capture_output=True, text=True, timeout=30, env=env
        )
        assert status.returncode == 0, status.stderr
        assert re.search(rf"^{re.escape(address)}\s+clusterlaunch", status.stdout, re.M)
        stopped = subprocess.run(
            [*CLI, "shutdown", "--all"], capture_output=True, text=True, timeout=30, env=env
        )
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped {address}" in stopped.stdout.splitlines()
        assert worker.wait(10) == 0
        assert "registered with" not in worker.log()  # an INFO line: --log-level reached it
    finally:
        worker.kill()


def test_up_prints_the_dashboard_and_no_dashboard_turns_it_off():
    code = "import os; print(os.environ['DASK_SCHEDULER_ADDRESS'])"
    result = run(
        "up", "--nworkers", "1", "--dashboard-address", ":0", "--", sys.executable, "-c", code
    )
    assert result.returncode == 0, result.stderr
    (link,) = re.findall(r"^dashboard (http://127\.0\.0\.1:\d+/status)$", result.stderr, re.M)
    result = run("up", "-n", "1", "--no-dashboard", "--", sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert "dashboard" not in result.stderr
