"""The ``clusterlaunch`` command: ``up``, ``worker``, ``shutdown`` and ``status``.

One typer app with dask's conventions: ``-h``/``--help``, ``--version``, shell
completion, ``python -m clusterlaunch``; ``worker``'s flags are built from the fields
of ``WorkerOptions`` (``python -m clusterlaunch.worker`` runs the same command).
Mistakes a user can make (a bad flag, a malformed address, an unreachable scheduler)
end with one line on stderr and a non-zero exit status, never a traceback. Heavy
imports (distributed, the launcher) happen inside the commands, so that
``clusterlaunch worker`` starts lean and never imports distributed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from clusterlaunch import __version__
from clusterlaunch.worker.options import WorkerOptions

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
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: dask's default dashboard address (deployment.DEFAULT_DASHBOARD_ADDRESS; not imported
#: from there, which would import the launcher into ``clusterlaunch worker``).
DEFAULT_DASHBOARD_ADDRESS = ":8787"

#: Where dask looks for the scheduler when no address is given.
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"

LogLevel = Annotated[
    str, typer.Option(help="Log level: debug, info, warning or error.", show_default=True)
]


def _show_version(value: bool) -> None:
    if value:
        print(f"clusterlaunch {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Lean dask workers: start a cluster, add workers, stop them, see their status."""


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


def _log_level(text: str) -> int:
    level = getattr(logging, text.upper(), None)
    if not isinstance(level, int):
        _fail(f"invalid --log-level {text!r}: use debug, info, warning or error", EXIT_USAGE)
    return level


def _scheduler_given(address: str | None) -> str:
    if not address:
        _fail(f"no scheduler address: pass one, or set {SCHEDULER_ENV}", EXIT_USAGE)
    return _address(address)


def _fail_if_refused(address: str, timeout: float) -> None:
    """One connection attempt: a refused one ends the command now, naming the reason,
    instead of retrying until ``timeout`` (a slow or silent host still gets it)."""
    from clusterlaunch.comm.addressing import parse_address

    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 2.0)):
            pass
    except ConnectionRefusedError:
        _fail(
            f"could not reach the dask scheduler at {address}: connection refused; "
            "is it running and is the address right?"
        )
    except OSError:
        pass  # a timeout or an unreachable route: the command's own wait decides


# --------------------------------------------------------------------------------------
# up
# --------------------------------------------------------------------------------------


class _Progress:
    """Workers coming up: a rich progress bar on a terminal, else one line before and
    one after. Its refresh thread is stopped by ``done`` or ``stop``."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.shown = False
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, ready: int, total: int) -> None:
        if self.tty:
            if self._bar is None:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

                self._bar = Progress(
                    TextColumn("clusterlaunch: workers"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    console=Console(stderr=True),
                    transient=True,
                )
                self._bar.start()
                self._task = self._bar.add_task("workers", total=total)
            self._bar.update(self._task, completed=ready, total=total)
        elif not self.shown:
            _say(f"starting {total} workers...")
        self.shown = True

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def done(self, total: int) -> None:
        self.stop()
        _say(f"{total} workers ready in {time.monotonic() - self.started:.2f} s")


@contextlib.contextmanager
def _spinner(message: str) -> Iterator[None]:
    """A rich spinner on a terminal while a wait without steps lasts."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(f"clusterlaunch: {message}"):
        yield


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
    nworkers: Annotated[
        int | None,
        typer.Option("--nworkers", "--n", "-n", help="Number of workers (default: usable CPUs)."),
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
    dashboard_address: Annotated[
        str,
        typer.Option(help="Address of our scheduler's dashboard (no host: --host's)."),
    ] = DEFAULT_DASHBOARD_ADDRESS,
    dashboard: Annotated[
        bool,
        typer.Option(
            "--dashboard/--no-dashboard", help="Serve our scheduler's dashboard (needs bokeh)."
        ),
    ] = True,
    log_level: LogLevel = "warning",
) -> None:
    """Start a scheduler (unless --scheduler) and N workers; stay up until Ctrl-C."""
    from clusterlaunch.deployment import Deployment
    from clusterlaunch.launcher import default_n_workers
    from clusterlaunch.scheduler import SchedulerUnreachable
    from clusterlaunch.spawn import LaunchError

    if nworkers is not None and nworkers < 0:
        _fail(f"--nworkers must be >= 0, not {nworkers}", EXIT_USAGE)
    # The launcher's own news (a worker died and was replaced) in our format.
    logging.basicConfig(level=logging.WARNING, format="clusterlaunch: %(message)s")
    _positive(timeout, "--timeout")
    level = _log_level(log_level)
    address = _address(scheduler) if scheduler else None
    n = default_n_workers() if nworkers is None else nworkers
    try:
        deployment = Deployment(
            n,
            address,
            host=None if address else host,
            scheduler_port=scheduler_port,
            log_level=level,
            dashboard_address=dashboard_address if dashboard else None,
            nthreads=nthreads,
            resources=resources,
            memory_limit=memory_limit,
            supervise=supervise,
        )
    except ValueError as e:
        _fail(str(e), EXIT_USAGE)
    if address:
        _fail_if_refused(address, timeout)
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
            if deployment.dashboard_link:
                out.write(f"dashboard {deployment.dashboard_link}\n")
            for worker, pid in deployment.launcher.pids.items():
                out.write(f"worker {worker} pid={pid}\n")
            out.flush()
            if command:
                code = _run_command(command, address, deployment.task_methods, signals)
            else:
                code = _wait_for_signal(signals, deployment)
        except (SchedulerUnreachable, LaunchError) as e:
            code = EXIT_FAILURE
            progress.stop()
            _say(f"error: {_one_line(str(e))}")
        finally:
            progress.stop()
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


def _flag_fields() -> list[dataclasses.Field]:
    """The fields of ``WorkerOptions`` that are flags (those with help)."""
    return [f for f in dataclasses.fields(WorkerOptions) if "help" in f.metadata]


def _flag_parameter(f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    """The typer parameter of one ``WorkerOptions`` field: ``--field-name``, its help,
    the field's default; text when the field has a ``parse``, else the field's type."""
    factory: Any = f.default_factory
    default = factory() if f.default is dataclasses.MISSING else f.default
    parse = f.metadata.get("parse")
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind: Any = str if parse else kinds[0]
    if parse:
        default = "" if default in ({}, None) else str(default)
    if default is None:
        kind = typing.Optional[kind]  # noqa: UP045 (typer reads typing's Optional)
    option = typer.Option("--" + f.name.replace("_", "-"), help=f.metadata["help"])
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
    )


def _run_worker(scheduler: str | None, log_level: str, **flags: Any) -> None:
    """Run one worker for SCHEDULER (or $DASK_SCHEDULER_ADDRESS) until shut down."""
    address = _scheduler_given(scheduler)
    level = _log_level(log_level)
    values = {}
    try:
        for f in _flag_fields():
            value = flags[f.name]
            parse = f.metadata.get("parse")
            values[f.name] = parse(value) if parse and isinstance(value, str) else value
        options = WorkerOptions(scheduler_address=address, **values)
    except ValueError as e:
        _fail(str(e), EXIT_USAGE)
    from clusterlaunch.worker.process import run_worker_process

    run_worker_process(options, log_level=level)  # the worker process's one exit


def _worker_command() -> Any:
    """``_run_worker`` with the signature typer reads: SCHEDULER, --log-level, and one
    flag per field of ``WorkerOptions`` (see ``worker.options.cli_flag``)."""

    def worker(**values: Any) -> None:
        _run_worker(**values)

    hints = typing.get_type_hints(WorkerOptions)
    scheduler = inspect.Parameter(
        "scheduler",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=None,
        annotation=Annotated[
            typing.Optional[str],  # noqa: UP045
            typer.Argument(
                metavar="SCHEDULER",
                help="Scheduler address, e.g. tcp://host:8786.",
                envvar=SCHEDULER_ENV,
                show_default=False,
            ),
        ],
    )
    log_level = inspect.Parameter(
        "log_level", inspect.Parameter.KEYWORD_ONLY, default="info", annotation=LogLevel
    )
    parameters = [
        scheduler,
        log_level,
        *(_flag_parameter(f, hints[f.name]) for f in _flag_fields()),
    ]
    worker.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    worker.__annotations__ = {p.name: p.annotation for p in parameters}
    worker.__doc__ = _run_worker.__doc__
    return worker


app.command("worker")(_worker_command())


# --------------------------------------------------------------------------------------
# shutdown
# --------------------------------------------------------------------------------------


@app.command()
def shutdown(
    addresses: Annotated[
        list[str] | None, typer.Argument(help="Worker addresses (ours or dask's).")
    ] = None,
    all_workers: Annotated[
        bool, typer.Option("--all", help="Every worker of the scheduler (--scheduler).")
    ] = False,
    scheduler: Annotated[
        str | None,
        typer.Option(help="The scheduler, for --all.", envvar=SCHEDULER_ENV, show_default=False),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for them to go.")] = 10.0,
) -> None:
    """Ask workers to terminate and wait until they are gone."""
    from clusterlaunch.shutdown import shutdown as shutdown_workers

    _positive(timeout, "--timeout")
    if all_workers == bool(addresses):
        _fail("give worker addresses, or --all (with --scheduler or $DASK_SCHEDULER_ADDRESS)", 2)
    if all_workers:
        normalized = sorted(_identity(_scheduler_given(scheduler), timeout).get("workers", {}))
    else:
        normalized = [_address(a) for a in addresses or ()]
    try:
        with _spinner(f"stopping {len(normalized)} workers"):
            shutdown_workers(normalized, timeout=timeout)
    except TimeoutError as e:
        _fail(str(e))
    for address in normalized:
        print(f"stopped {address}")


def _identity(address: str, timeout: float) -> dict[str, Any]:
    from clusterlaunch.scheduler import SchedulerUnreachable, check_scheduler

    _fail_if_refused(address, timeout)
    try:
        return check_scheduler(address, timeout)
    except SchedulerUnreachable as e:
        _fail(str(e))


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
    scheduler: Annotated[
        str | None,
        typer.Argument(
            help="Scheduler address, e.g. tcp://host:8786.",
            envvar=SCHEDULER_ENV,
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the scheduler.")] = 10.0,
) -> None:
    """Show the scheduler's workers: address, kind, threads, memory, tasks."""
    from clusterlaunch.bridge import run_sync
    from clusterlaunch.scheduler import SchedulerUnreachable

    _positive(timeout, "--timeout")
    address = _scheduler_given(scheduler)
    _fail_if_refused(address, timeout)
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
