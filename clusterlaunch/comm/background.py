"""``BackgroundTasks``: the one owner of an object's asyncio tasks and timers.

Every long-lived object that starts work on the event loop (a worker, a batched
stream, a client) holds one of these and starts that work only through it. On close
it cancels what is left **and awaits it**, nursery-style, within a bounded time, so
nothing runs on after its owner is gone, nothing is left pending when the loop
stops, and no task ends with an exception nobody retrieved: a task that fails is
logged once, under the owner's name, when it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds ``close`` waits for cancelled tasks to finish, unless told otherwise.
DEFAULT_CLOSE_TIMEOUT = 5.0
#: Seconds between the cancels ``close`` sends a task that has not ended yet: long
#: enough for any cleanup of ours that awaits, short against the close timeout.
RECANCEL_INTERVAL = 1.0


class BackgroundTasks:
    """Tasks and timers started for ``owner`` (a name for logs), all ended by ``close``."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<BackgroundTasks of {self.owner}: "
            f"{len(self._tasks)} tasks, {len(self._timers)} timers>"
        )

    def __len__(self) -> int:
        return len(self._tasks) + len(self._timers)

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` as a task owned here; ``RuntimeError`` once closed."""
        if self._closed:
            coro.close()  # never awaited, and saying so would only be noise
            raise RuntimeError(f"{self.owner} is closed: no new background work")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> None:
        """Call ``callback(*args)`` on the loop after ``delay`` seconds, unless closed first."""
        if self._closed:
            raise RuntimeError(f"{self.owner} is closed: no new timers")
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            callback(*args)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, so asyncio never warns about it
        if exc is not None:
            logger.error("%s: background task %s failed", self.owner, task.get_name(), exc_info=exc)

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Cancel every timer and task (but the one calling this) and await the tasks.

        Idempotent. Tasks still running ``timeout`` seconds after their cancellation
        (ones that swallow it) are logged by name and left to the loop.
        """
        self._closed = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        current = asyncio.current_task()
        pending = {task for task in self._tasks if task is not current}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while pending:
            # Cancelled again and again: before Python 3.12, asyncio.wait_for swallows a
            # cancel that lands as the awaited call completes, and the task runs on.
            for task in pending:
                task.cancel()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_INTERVAL, remaining))
        if pending:
            logger.warning(
                "%s: %d background task(s) still running %g s after cancel: %s",
                self.owner,
                len(pending),
                timeout,
                ", ".join(sorted(task.get_name() for task in pending)),
            )
