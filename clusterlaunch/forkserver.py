"""The fork server: one clean process that imports the worker once and forks workers.

Starting N workers as N fresh interpreters costs N cold imports of dask, cloudpickle,
msgpack and our worker. Instead the launcher starts *one* helper process (see
``spawn.py``: fixed entry point, the launcher's ``sys.path``, its own session, dies
with the launcher), which imports all of that once, before it has started a thread
or an event loop, and then ``os.fork()``s a worker per request. The user's process
is never forked (it may run threads); only this single-threaded helper is.

This module holds both ends: ``ForkServer``, the launcher's handle on the process
(start, send, read events, stop), and ``serve``, the process itself.

This is the design of multiprocessing's and loky's fork servers, reduced to what we
need: the launcher and the fork server share a ``SOCK_SEQPACKET`` Unix socket pair,
so every message is one record of JSON and records never interleave. Forked workers
inherit the server's end and report ``ready`` (with their bound address) on it
themselves, so the launcher learns an address without a relay.

Messages to the server::

    {"cmd": "spawn", "id": 7, "options": {...WorkerOptions...}, "sys_path": [...],
     "cwd": "/some/dir", "env": {...}, "log_level": 30}
    {"cmd": "signal", "pid": 1234, "signal": 9}
    {"cmd": "stop", "grace": 5.0}

Events from the server and its workers::

    {"event": "hello", "pid": ...}                       server is ready to fork
    {"event": "spawned", "id": 7, "pid": ...}            forked, not yet registered
    {"event": "ready", "id": 7, "pid": ..., "address": "tcp://..."}   (from the worker)
    {"event": "failed", "id": 7, "pid": ..., "error": "one line"}    (from the worker)
    {"event": "exit", "id": 7, "pid": ..., "code": 0}    reaped; code < 0 is -signal

No orphans, whatever kills whom: the server dies with the launcher (``spawn.py``),
treats EOF on its socket the same way and also polls its parent pid; each worker
asks for SIGKILL when the server dies. When the launcher goes, the server
terminates its workers (SIGTERM, then SIGKILL after a grace period) and exits.

This module is imported by every worker: keep its imports to the standard library.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from clusterlaunch.spawn import (
    PARENT_DEATH_SIGNAL,
    orphaned,
    set_parent_death_signal,
    start_helper,
)

logger = logging.getLogger(__name__)

#: Largest message record we accept (spawn requests carry sys.path and env).
MAX_RECORD = 1 << 20
#: Seconds workers get to exit after SIGTERM when the server stops, before SIGKILL.
DEFAULT_GRACE = 5.0
#: What each worker runs, as "module:function"; it takes (WorkerOptions, on_ready).
DEFAULT_TARGET = "clusterlaunch.worker.process:run_worker"
#: Imported once in the server so that forked workers start warm.
PREIMPORTS = (
    "clusterlaunch.worker.options",
    "clusterlaunch.worker.process",
    "dask",
    "dask._task_spec",
    "dask.sizeof",
    "cloudpickle",
    "psutil",
    "msgpack",
    "importlib.metadata",
)
#: Called once in the server after the imports ("module:function"), to fill caches
#: every worker would otherwise fill on its own (e.g. the package versions it
#: reports when it registers).
PREWARM = ("clusterlaunch.protocol.versions:versions_info",)


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    return json.loads(data)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------


class _Server:
    def __init__(self, sock: socket.socket, parent_pid: int) -> None:
        self.sock = sock
        self.parent_pid = parent_pid
        self.children: dict[int, int] = {}  # pid -> worker id
        self.stopping = False
        self.grace = DEFAULT_GRACE
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    # -- lifecycle -----------------------------------------------------------------

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        # A Python-level handler is needed for the wakeup fd to see SIGCHLD at all.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_stop_signal)
        signal.signal(PARENT_DEATH_SIGNAL, self._on_parent_death_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _on_stop_signal(self, *_: Any) -> None:
        self.stopping = True

    def _on_parent_death_signal(self, *_: Any) -> None:
        if orphaned(self.parent_pid):
            self.stopping = True

    def serve(self) -> None:
        self.selector.register(self.sock, selectors.EVENT_READ, "sock")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.send({"event": "hello", "pid": os.getpid()})
        try:
            while not self.stopping:
                for key, _ in self.selector.select(timeout=1.0):
                    if key.data == "wake":
                        with contextlib.suppress(OSError):
                            os.read(self.wake_r, 4096)
                    elif not self.handle_request():
                        self.stopping = True
                        break
                self.reap()
                if orphaned(self.parent_pid):
                    self.stopping = True
        finally:
            self.stop_children(self.grace)

    def send(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(encode(msg))

    # -- requests ------------------------------------------------------------------

    def handle_request(self) -> bool:
        """Serve one record; False when the launcher is gone or asked us to stop."""
        try:
            data = self.sock.recv(MAX_RECORD)
        except InterruptedError:
            return True
        except OSError:
            return False
        if not data:
            return False
        try:
            msg = decode(data)
            cmd = msg["cmd"]
        except (ValueError, KeyError, TypeError):
            logger.error("fork server: ignoring malformed request %r", data[:200])
            return True
        if cmd == "spawn":
            self.spawn(msg)
        elif cmd == "signal":
            pid = int(msg["pid"])
            if pid in self.children:  # never signal a pid that is not (still) ours
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, int(msg["signal"]))
        elif cmd == "stop":
            self.grace = float(msg.get("grace", DEFAULT_GRACE))
            return False
        else:
            logger.error("fork server: unknown command %r", cmd)
        return True

    def spawn(self, request: dict[str, Any]) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 70
            try:
                code = self._child(request)
            finally:
                os._exit(code)
        self.children[pid] = request["id"]
        self.send({"event": "spawned", "id": request["id"], "pid": pid})

    def _child(self, request: dict[str, Any]) -> int:
        """Turn this fresh fork into a worker and run it; returns its exit code."""
        server_pid = os.getppid()
        set_parent_death_signal(signal.SIGKILL)
        if orphaned(server_pid):  # the server died between fork and prctl
            return 1
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, PARENT_DEATH_SIGNAL):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.selector.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        sock, wid, pid = self.sock, request["id"], os.getpid()

        def report(msg: dict[str, Any]) -> None:
            with contextlib.suppress(OSError):
                sock.send(encode({**msg, "id": wid, "pid": pid}))

        try:
            if request.get("sys_path"):
                sys.path[:] = request["sys_path"]
            if request.get("cwd"):
                with contextlib.suppress(OSError):
                    os.chdir(request["cwd"])
            os.environ.update(request.get("env") or {})
            if request.get("log_level") is not None:
                from clusterlaunch.worker.process import configure_logging

                configure_logging(request["log_level"])
            module_name, _, func_name = request.get("target", DEFAULT_TARGET).partition(":")
            target = getattr(importlib.import_module(module_name), func_name)
            from clusterlaunch.worker.options import WorkerOptions

            options = WorkerOptions(**request["options"])
            code = target(options, lambda address: report({"event": "ready", "address": address}))
            return int(code or 0)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException as e:
            report({"event": "failed", "error": one_line(e)})
            logging.getLogger("clusterlaunch.worker").exception("worker failed to run")
            return 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()

    # -- children ------------------------------------------------------------------

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            wid = self.children.pop(pid, None)
            self.send(
                {"event": "exit", "id": wid, "pid": pid, "code": os.waitstatus_to_exitcode(status)}
            )

    def stop_children(self, grace: float) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self.reap()
            if self.children:
                # SIGCHLD interrupts the sleep through the wakeup fd's handler.
                time.sleep(0.01)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            wid = self.children.pop(pid, None)
            self.send(
                {"event": "exit", "id": wid, "pid": pid, "code": os.waitstatus_to_exitcode(status)}
            )


def serve(parent_pid: int, fd: str, scratch: str = "") -> None:
    """The fork server process (a ``spawn.py`` helper): serve the socket ``fd`` until
    the launcher stops us or goes; then remove the ``scratch`` directory, if any."""
    sock = socket.socket(fileno=int(fd))
    sock.setblocking(True)
    server = _Server(sock, parent_pid)
    server.install_signals()
    for name in PREIMPORTS:
        try:
            importlib.import_module(name)
        except ImportError as e:  # the worker will say what is missing when it runs
            logger.debug("fork server: could not pre-import %s: %s", name, e)
    for spec in PREWARM:
        module_name, _, func_name = spec.partition(":")
        try:
            getattr(importlib.import_module(module_name), func_name)()
        except Exception as e:
            logger.debug("fork server: could not pre-warm %s: %s", spec, e)
    try:
        server.serve()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------------------
# The launcher's handle on the server
# --------------------------------------------------------------------------------------


class ForkServer:
    """A running fork server process and the thread that reads its events.

    ``on_event`` and ``on_gone`` (once the server is gone) are called in that reader
    thread. Workers not told where to keep files use ``scratch``, which the server
    removes when it stops -- even if the launcher was killed.
    """

    def __init__(
        self,
        on_event: Callable[[dict[str, Any]], None],
        on_gone: Callable[[], None],
        scratch: str,
    ) -> None:
        self._on_event = on_event
        self._on_gone = on_gone
        self._send_lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = start_helper(
                "clusterlaunch.forkserver:serve",
                str(theirs.fileno()),
                scratch,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.pid = self.process.pid
        self._reader = threading.Thread(
            target=self._read_forever, name=f"clusterlaunch-forkserver-{self.pid}", daemon=True
        )
        self._reader.start()

    def _read_forever(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_RECORD)
            except OSError:
                data = b""
            if not data:
                self._on_gone()
                return
            try:
                event = decode(data)
            except ValueError:
                logger.error("fork server sent a malformed event: %r", data[:200])
                continue
            try:
                self._on_event(event)
            except Exception:
                logger.exception("error handling fork server event %r", event)

    def send(self, msg: dict[str, Any]) -> None:
        with self._send_lock:
            self.sock.send(encode(msg))

    def stop(self, grace: float, timeout: float) -> None:
        """Ask the server to stop its workers (``grace`` seconds to exit, then SIGKILL)
        and exit; kill it if it is still there after ``timeout``. Joins the reader."""
        with contextlib.suppress(OSError):
            self.send({"cmd": "stop", "grace": grace})
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()  # its workers get SIGKILL from PR_SET_PDEATHSIG
            self.process.wait()
        # Forked workers still hold the server's end, so EOF may be late: shutting
        # ours down ends the reader's recv now. The join is then bounded by what the
        # reader's last callbacks do (they take the launcher's lock, never held
        # while it waits for us); it is skipped when a callback itself stops us.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() is not self._reader:
            self._reader.join()
        self.sock.close()
