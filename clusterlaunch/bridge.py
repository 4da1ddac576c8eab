"""``LoopThread``: the one bridge between synchronous code and asyncio.

Our wire code (comm, rpc) is asyncio; the launcher, ``LocalCluster`` and ``Client``
offer synchronous APIs. A ``LoopThread`` is an event loop running in a thread of its
own: sync code hands it coroutines (``run`` waits, with a timeout; ``submit`` does
not) and async code on another loop hands it blocking calls (``run_blocking``). Its
owner closes it, which cancels what still runs there, awaits it, stops the loop and
joins the thread. ``run_sync`` is the one-off form: a bridge for one coroutine.

Why a thread of its own rather than ``asyncio.run`` in the caller's thread: the
caller may already run a loop (a notebook, an async test), and a coroutine on the
bridge keeps running while the caller does something else (the launcher watches
its processes exit while the bridge asks the workers to terminate).

Care taken:

* ``run`` from the bridge's own thread would wait for itself: it raises instead;
* the thread is a daemon: the interpreter joins non-daemon threads *before* the
  ``atexit`` handlers where owners close things, so a bridge someone forgot to close
  would hang the exit; a finalizer closes a bridge that is collected or still open
  at exit;
* after ``fork`` the child has the object but not the thread: there it refuses work
  (a child makes its own) and ``close`` leaves the parent's loop alone. The fork
  server never starts one: it forks workers, and forking is safe only for a
  process with one thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds ``close`` gives the tasks still on the loop to finish after their cancel.
CLOSE_TIMEOUT = 5.0


class LoopThread:
    """An asyncio loop in a daemon thread named ``name``, until ``close()``."""

    def __init__(self, name: str = "clusterlaunch-loop") -> None:
        self.name = name
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=_run_until_stopped, args=(self._loop, name), name=name, daemon=True
        )
        try:
            self._thread.start()
        except BaseException:  # e.g. at interpreter exit, where Python 3.12+ refuses
            self._loop.close()
            raise
        self._finalizer = weakref.finalize(self, _stop_and_join, self._loop, self._thread)

    def __repr__(self) -> str:
        return f"<LoopThread {self.name} {'closed' if self._closed else 'running'}>"

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def closed(self) -> bool:
        return self._closed

    def in_loop_thread(self) -> bool:
        """The caller runs in this bridge's thread (on its loop)."""
        return threading.get_ident() == self._thread.ident

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop; its future, for any thread to wait on."""
        with self._lock:
            self._check_usable(coro)
            # Under the lock: close() stops the loop only after this is queued, so
            # the coroutine starts and close() then cancels and awaits it.
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(
        self, coro: Coroutine[Any, Any, T], timeout: float | None = None, timeout_message: str = ""
    ) -> T:
        """Run ``coro`` on the loop and return its result, or raise its exception.

        After ``timeout`` seconds it is cancelled and ``TimeoutError(timeout_message)``
        raised.
        """
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError(f"{self.name}: run() from its own loop would wait for ever")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise  # the coroutine's own TimeoutError
            future.cancel()
            raise TimeoutError(timeout_message or f"no answer within {timeout:g} s") from None

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """From a coroutine on another loop: ``fn(*args)`` in this bridge's executor,
        awaited without blocking that loop. Its threads are joined by ``close``."""
        return await asyncio.wrap_future(self.submit(asyncio.to_thread(fn, *args)))

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Call ``callback(*args)`` on the loop soon; dropped once closing."""
        with self._lock:
            if not self._closed and os.getpid() == self._pid:
                self._loop.call_soon_threadsafe(callback, *args)

    def close(self) -> None:
        """Cancel and await what still runs on the loop, stop it, join the thread.

        Idempotent. From the bridge's own thread the loop stops once the running
        callback returns, and nothing is joined.
        """
        with self._lock:
            self._closed = True
        # Not by calling the finalizer: once the interpreter's exit has run finalizers,
        # calling one does nothing, and a bridge made later must still be closed.
        self._finalizer.detach()
        if os.getpid() == self._pid:  # after a fork, the loop and thread are the parent's
            _stop_and_join(self._loop, self._thread)

    def _check_usable(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._closed or os.getpid() != self._pid:
            coro.close()  # never awaited, and saying so would only be noise
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            raise RuntimeError(f"{self.name} belongs to process {self._pid}; make a new one")


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run one coroutine from sync code, in any thread (one running a loop too), on a
    bridge of its own that is closed before this returns."""
    with LoopThread("clusterlaunch-sync") as bridge:
        return bridge.run(coro, timeout)


def _run_until_stopped(loop: asyncio.AbstractEventLoop, name: str) -> None:
    """The bridge's thread: run ``loop`` until stopped, then end what is left on it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=CLOSE_TIMEOUT))
                for task in pending:  # swallowed its cancel: say so, the loop closes anyway
                    logger.warning("%s: task %s ignored its cancel", name, task.get_name())
                for task in tasks - pending:
                    if not task.cancelled() and task.exception() is not None:
                        logger.error("%s: task %s failed", name, task, exc_info=task.exception())
            # Joins the executor's threads (getaddrinfo, run_blocking calls). Unbounded:
            # a blocking call cannot be cancelled, and owners close only once theirs
            # have returned.
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def _stop_and_join(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    with contextlib.suppress(RuntimeError):  # the loop already closed
        loop.call_soon_threadsafe(loop.stop)
    if thread is not threading.current_thread():
        # Bounded by CLOSE_TIMEOUT plus what the executor still runs (see above).
        thread.join()
