"""The ``clusterlaunch`` command: ``up``, ``worker``, ``shutdown`` and ``status``.

Mistakes a user can make (a bad flag, a malformed address, an unreachable scheduler)
end with one line on stderr and a non-zero exit status, never a traceback. Heavy
imports (distributed, the launcher) happen inside the commands, so that
``clusterlaunch worker`` starts as lean as ``python -m clusterlaunch.worker``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from clusterlaunch.deployment import Deployment

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception class ``name``: newer typer vendors click, older uses click."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


_EXIT: tuple[type[BaseException], ...] = (typer.Exit, *_click_exceptions("Exit"))
_ABORT: tuple[type[BaseException], ...] = (typer.Abort, *_click_exceptions("Abort"))
_USAGE: tuple[type[BaseException], ...] = _click_exceptions("ClickException")


class _App(typer.Typer):
    """A Typer app whose usage errors are one line: ``clusterlaunch: error: ...``."""

    def __call__(self, args: list[str] | None = None, **kwargs: Any) -> Any:
        command = typer.main.get_command(self)
        kwargs.setdefault("prog_name", "clusterlaunch")
        try:
            code = command.main(args, standalone_mode=False, **kwargs)
        except _EXIT as e:
            code = getattr(e, "exit_code", 0)
        except _ABORT:
            _fail("aborted", 130)
        except _USAGE as e:
            _fail(_one_line(getattr(e, "format_message", e.__str__)()), EXIT_USAGE)
        sys.exit(code if isinstance(code, int) else 0)


app = _App(
    name="clusterlaunch",
    help="Lean dask workers: start a cluster, add workers, stop them, see their status.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    sys.stderr.write(f"clusterlaunch: error: {_one_line(message)}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _say(message: str) -> None:
    sys.stderr.write(f"clusterlaunch: {message}\n")
    sys.stderr.flush()


def _address(text: str) -> str:
    from clusterlaunch.comm.addressing import normalize_address

    try:
        return normalize_address(text)
    except ValueError as e:
        _fail(str(e), EXIT_USAGE)


def _positive(value: float, flag: str) -> float:
    if not value > 0:
        _fail(f"{flag} must be a positive number of seconds, not {value:g}", EXIT_USAGE)
    return value


# --------------------------------------------------------------------------------------
# up
# --------------------------------------------------------------------------------------


class _Progress:
    """``3/8 workers ready`` on stderr: rewritten in place on a terminal, else once."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.shown = False

    def __call__(self, ready: int, total: int) -> None:
        if self.tty:
            sys.stderr.write(f"\rclusterlaunch: {ready}/{total} workers ready")
            sys.stderr.flush()
        elif not self.shown:
            _say(f"starting {total} workers...")
        self.shown = True

    def done(self, total: int) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\r\033[K")
        _say(f"{total} workers ready in {time.monotonic() - self.started:.2f} s")


class _Signals:
    """Turn SIGINT/SIGTERM/SIGHUP into an event (or forward them to a child)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.child: subprocess.Popen | None = None
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum
        self.event.set()
        if self.child is not None and signum != signal.SIGINT:
            # The terminal already sent SIGINT to the child, which is in our group.
            with contextlib.suppress(OSError):
                self.child.send_signal(signum)

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@app.command(context_settings={"allow_interspersed_args": False})
def up(
    command: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[-- CMD ARGS...]",
            help=(
                "Run CMD with DASK_SCHEDULER_ADDRESS set (and task-based shuffles and"
                " rechunks, unless configured), then tear down; exit with its status."
            ),
            show_default=False,
        ),
    ] = None,
    n: Annotated[
        int | None,
        typer.Option("--n", "-n", help="Number of workers (default: usable CPUs)."),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="Use the dask scheduler at this address instead of our own."),
    ] = None,
    nthreads: Annotated[int, typer.Option(help="Threads per worker.")] = 1,
    resources: Annotated[str, typer.Option(help='Worker resources, e.g. "GPU=2".')] = "",
    memory_limit: Annotated[
        str, typer.Option(help="Per worker: bytes (4GiB), a fraction, 'auto' or 0.")
    ] = "auto",
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the scheduler and for workers.")
    ] = 60.0,
    supervise: Annotated[
        bool, typer.Option("--supervise/--no-supervise", help="Replace workers that die.")
    ] = True,
    host: Annotated[
        str, typer.Option(help="Interface our scheduler and workers listen on.")
    ] = "127.0.0.1",
    scheduler_port: Annotated[int, typer.Option(help="Port of our scheduler.")] = 0,
    log_level: Annotated[str, typer.Option(help="Log level of workers and scheduler.")] = "warning",
) -> None:
    """Start a scheduler (unless --scheduler) and N workers; stay up until Ctrl-C."""
    from clusterlaunch.deployment import Deployment
    from clusterlaunch.launcher import default_n_workers
    from clusterlaunch.scheduler import SchedulerUnreachable
    from clusterlaunch.spawn import LaunchError

    if n is not None and n < 0:
        _fail(f"--n must be >= 0, not {n}", EXIT_USAGE)
    # The launcher's own news (a worker died and was replaced) in our format.
    logging.basicConfig(level=logging.WARNING, format="clusterlaunch: %(message)s")
    _positive(timeout, "--timeout")
    address = _address(scheduler) if scheduler else None
    n = default_n_workers() if n is None else n
    try:
        deployment = Deployment(
            n,
            address,
            host=None if address else host,
            scheduler_port=scheduler_port,
            log_level=log_level,
            nthreads=nthreads,
            resources=resources,
            memory_limit=memory_limit,
            supervise=supervise,
        )
    except ValueError as e:
        _fail(str(e), EXIT_USAGE)
    progress = _Progress()
    up = False
    with _Signals() as signals:
        try:
            deployment.start(timeout, progress=progress)
            progress.done(n)
            up = True
            address = deployment.scheduler_address
            assert address is not None  # start() set it
            out = sys.stderr if command else sys.stdout  # keep CMD's stdout its own
            out.write(f"scheduler {address}\n")
            for worker, pid in deployment.launcher.pids.items():
                out.write(f"worker {worker} pid={pid}\n")
            out.flush()
            if command:
                code = _run_command(command, address, deployment.task_methods, signals)
            else:
                code = _wait_for_signal(signals, deployment)
        except (SchedulerUnreachable, LaunchError) as e:
            code = EXIT_FAILURE
            sys.stderr.write("\n" if progress.tty and progress.shown else "")
            _say(f"error: {_one_line(str(e))}")
        finally:
            signals.child = None
            if up:
                _say("stopping...")
            deployment.close()
    if up:
        _say("stopped")
    raise typer.Exit(code)


def _run_command(
    command: list[str], address: str, task_methods: dict[str, str], signals: _Signals
) -> int:
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": address}
    # What dask in this process uses while up: shuffles and rechunks that work on our
    # workers (unless configured otherwise), as dask config in CMD's environment.
    for key, value in task_methods.items():
        env["DASK_" + key.upper().replace(".", "__")] = value
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as e:
        _say(f"error: cannot run {command[0]!r}: {e.strerror or e}")
        return 127
    signals.child = child
    code = child.wait()
    return code if code >= 0 else 128 - code


def _wait_for_signal(signals: _Signals, deployment: Deployment) -> int:
    _say("up; press Ctrl-C to stop")
    while not signals.event.wait(0.5):
        code = deployment.scheduler_exit_code()
        if code is not None:
            _say(f"error: the scheduler exited with code {code}")
            return EXIT_FAILURE
    return 0


# --------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------


@app.command(
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
    add_help_option=False,
)
def worker(ctx: typer.Context) -> None:
    """Run one worker: clusterlaunch worker SCHEDULER_ADDRESS [--nthreads N ...].

    Takes the flags of python -m clusterlaunch.worker (see 'clusterlaunch worker --help').
    """
    from clusterlaunch.worker.__main__ import main

    main(list(ctx.args))  # the worker process's one exit path: it never returns


# --------------------------------------------------------------------------------------
# shutdown
# --------------------------------------------------------------------------------------


@app.command()
def shutdown(
    addresses: Annotated[list[str], typer.Argument(help="Worker addresses (ours or dask's).")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for them to go.")] = 10.0,
) -> None:
    """Ask workers to terminate and wait until they are gone."""
    from clusterlaunch.shutdown import shutdown as shutdown_workers

    _positive(timeout, "--timeout")
    normalized = [_address(a) for a in addresses]
    try:
        shutdown_workers(normalized, timeout=timeout)
    except TimeoutError as e:
        _fail(str(e))
    for address in normalized:
        print(f"stopped {address}")


# --------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------


def _format_bytes(n: Any) -> str:
    if not n:
        return "-"
    from dask.utils import format_bytes

    return format_bytes(int(n))


async def _cluster_status(address: str, timeout: float) -> dict[str, Any]:
    from clusterlaunch.comm.rpc import send_recv
    from clusterlaunch.comm.tcp import connect
    from clusterlaunch.scheduler import scheduler_identity

    identity = await scheduler_identity(address, timeout)
    comm = await connect(address, timeout=timeout)
    try:
        processing = await send_recv(comm, op="processing")
        has_what = await send_recv(comm, op="has_what")
    finally:
        comm.abort()
    return {"identity": identity, "processing": processing, "has_what": has_what}


def worker_kind(info: dict[str, Any]) -> str:
    """'clusterlaunch' for our workers (they register an ``extra`` key), else 'dask'."""
    if "clusterlaunch" in info:
        return f"clusterlaunch {info['clusterlaunch']}"
    return "dask (nanny)" if info.get("nanny") else "dask"


@app.command()
def status(
    scheduler: Annotated[str, typer.Argument(help="Scheduler address, e.g. tcp://host:8786.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the scheduler.")] = 10.0,
) -> None:
    """Show the scheduler's workers: address, kind, threads, memory, tasks."""
    from clusterlaunch.bridge import run_sync
    from clusterlaunch.scheduler import SchedulerUnreachable

    _positive(timeout, "--timeout")
    address = _address(scheduler)
    try:
        state = run_sync(_cluster_status(address, timeout))
    except (SchedulerUnreachable, OSError) as e:
        _fail(str(e))
    identity = state["identity"]
    workers: dict[str, dict[str, Any]] = identity.get("workers", {})
    rows = [("ADDRESS", "KIND", "THREADS", "MEMORY", "LIMIT", "PROCESSING", "STORED")]
    for worker_address, info in sorted(workers.items()):
        metrics = info.get("metrics") or {}
        rows.append(
            (
                worker_address,
                worker_kind(info),
                str(info.get("nthreads", "?")),
                _format_bytes(metrics.get("memory")),
                _format_bytes(info.get("memory_limit")),
                str(len(state["processing"].get(worker_address, ()))),
                str(len(state["has_what"].get(worker_address, ()))),
            )
        )
    print(
        f"scheduler {identity.get('address', address)}: {len(workers)} workers, "
        f"{identity.get('total_threads', 0)} threads, "
        f"{_format_bytes(identity.get('total_memory'))} memory"
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
