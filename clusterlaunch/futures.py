"""The futures of our ``Client``: ``FutureState`` (what one key's futures share) and
``Future``, a subclass of dask's ``TaskRef`` built on first use.

Lean import: this module does not import dask at load time; ``Future`` is built
(importing dask) by ``future_class()`` the first time it is needed, and the module
``__getattr__`` hands it out by name.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from clusterlaunch.protocol.remote_errors import rebuild_exception

if TYPE_CHECKING:
    from dask._task_spec import TaskRef

    from clusterlaunch.client import Client

logger = logging.getLogger(__name__)


class FutureState:
    """What one key's futures share: status, error and waiters."""

    def __init__(self, key: Any) -> None:
        self.key = key
        self.status = "pending"
        self.type: Any = None
        self.exception: BaseException | None = None
        self.traceback: Any = None
        self.cancel_reason = ""
        self._event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self._event.wait(timeout)

    def _settle(self, status: str) -> None:
        with self._lock:
            self.status = status
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            call_quietly(callback)

    def finish(self, value_type: Any = None) -> None:
        self.type = value_type
        self._settle("finished")

    def set_error(self, exception: Any, traceback: Any) -> None:
        self.exception, self.traceback = rebuild_exception(exception, traceback)
        self._settle("error")

    def cancel(self, reason: str = "") -> None:
        self.cancel_reason = reason
        self._settle("cancelled")

    def lose(self) -> None:
        self.status = "lost"
        self._event.clear()

    def reset(self) -> None:
        self.status = "pending"
        self._event.clear()

    def add_callback(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        call_quietly(callback)


def call_quietly(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        logger.exception("future callback %r failed", callback)


class FutureMethods:
    """The body of ``Future``: the class itself, a subclass of dask's ``TaskRef``, is
    built from this on first use (see ``_make_future_class``)."""

    __slots__ = ()
    key: Any
    client: Client
    _state: FutureState

    def __reduce__(self) -> tuple[Any, ...]:
        from dask._task_spec import TaskRef

        return TaskRef, (self.key,)

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return ("Future", self.key)

    def __repr__(self) -> str:
        return f"<Future: {self.status}, key: {self.key!r}>"

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.client._release(self.key)

    @property
    def status(self) -> str:
        return self._state.status

    def done(self) -> bool:
        return self._state.done()

    def cancelled(self) -> bool:
        return self._state.status == "cancelled"

    def _wait(self, timeout: float | None) -> None:
        if not self._state.wait(timeout):
            raise TimeoutError(f"future {self.key!r} not done within {timeout} s")

    def result(self, timeout: float | None = None) -> Any:
        """The value; re-raises the remote exception with its remote traceback."""
        return self.client._gather_futures([self], timeout)[self.key]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._state.exception

    def traceback(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        return self._state.traceback

    def cancel(self, force: bool = False) -> None:
        self.client.cancel([self], force=force)

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        """Call ``fn(future)`` once the future is done, in the client's callback thread
        (so ``fn`` may block, e.g. on ``future.result()``)."""
        client = self.client
        self._state.add_callback(lambda: client._run_callback(fn, self))


if TYPE_CHECKING:

    class Future(FutureMethods, TaskRef):
        """What type checkers see of the class ``_make_future_class`` builds."""

        def __init__(self, key: Any, client: Client) -> None: ...


_future_lock = threading.Lock()
_Future: type[Future] | None = None


def future_class() -> type[Future]:
    """The ``Future`` class, built (importing dask) on first call and cached."""
    global _Future
    cls = _Future
    if cls is None:
        with _future_lock:
            if _Future is None:
                _Future = _make_future_class()
            cls = _Future
    return cls


def _make_future_class() -> type[Future]:
    from dask._task_spec import TaskRef

    class BuiltFuture(FutureMethods, TaskRef):
        """A remote value being computed: wait for it with ``result()``.

        A Future is a ``TaskRef``, so passing it to ``submit`` makes its key a dependency.
        """

        __slots__ = ("client", "_state", "__weakref__")

        def __init__(self, key: Any, client: Client) -> None:
            TaskRef.__init__(self, key)
            self.client = client
            self._state = client._acquire(key)

    # Pickled by reference as clusterlaunch.futures.Future (see __getattr__ below).
    BuiltFuture.__name__ = BuiltFuture.__qualname__ = "Future"
    globals()["Future"] = BuiltFuture
    # It is the class the TYPE_CHECKING block declares, which mypy can't know.
    return cast("type[Future]", BuiltFuture)


def __getattr__(name: str) -> Any:
    if name == "Future":
        return future_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "Future"})


def collect_futures(obj: Any, out: list[Any], cls: type[FutureMethods]) -> None:
    """Append the instances of ``cls`` (the Future class) nested in ``obj`` to ``out``."""
    if isinstance(obj, cls):
        out.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            collect_futures(value, out, cls)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            collect_futures(value, out, cls)


def substitute(obj: Any, values: dict[Any, Any], cls: type[FutureMethods]) -> Any:
    if isinstance(obj, cls):
        return values[obj.key]
    if isinstance(obj, dict):
        return {k: substitute(v, values, cls) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(substitute(v, values, cls) for v in obj)
    return obj
