"""Task functions the tests run on workers, pickled by reference.

Workers import this module by name: our worker processes and stock ``dask worker``
processes have the tests dir on their ``PYTHONPATH`` (``procs.subprocess_env``), and
the launcher's workers inherit the ``sys.path`` of the test process. So it stays
light: nothing from distributed, pytest or the test modules, or the checks that a
worker never imports distributed would be testing this file instead.

Tasks that must wait for the test (``block``, ``rendezvous``, ``hold_memory``) wait
for a file to appear, with a timeout, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any


class TaskError(Exception):
    """A user exception raised inside a task; the client must see this very type."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


def inc(x: int) -> int:
    return x + 1


def add(*args: Any, extra: int = 0) -> Any:
    return sum(args) + extra


def total(values: list, scale: int = 1) -> int:
    return sum(values) * scale


def identity(x: Any) -> Any:
    return x


def type_name(value: Any) -> str:
    return type(value).__name__


def pid_of(*_: Any) -> int:
    return os.getpid()


def fail(code: int) -> None:
    """Raise ``TaskError`` from a frame of its own, so that tracebacks show two."""

    def inner_frame() -> None:
        raise TaskError(f"task failed on purpose with code {code}", code)

    inner_frame()


def count_call(counter: str, value: Any) -> Any:
    """Add one line to the file ``counter`` (under a lock), then return ``value``."""
    with open(counter, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"{value!r}\n")
    return value


def calls(counter: str) -> list[str]:
    """The lines ``count_call`` wrote to ``counter``."""
    path = Path(counter)
    return path.read_text().splitlines() if path.exists() else []


def flaky(counter: str, failures: int) -> int:
    """Fail the first ``failures`` calls (counted in the file ``counter``)."""
    count_call(counter, "call")
    made = len(calls(counter))
    if made <= failures:
        raise RuntimeError(f"flaky call {made} of {failures} failing ones")
    return made


def _wait_for_file(flag: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not os.path.exists(flag):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def block(flag: str, timeout: float = 60.0, started: str | None = None, value: Any = None) -> Any:
    """Announce the start with a line in the file ``started`` (if given), then run
    until the file ``flag`` exists (at most ``timeout`` seconds); returns ``value``."""
    if started:
        count_call(started, value)
    _wait_for_file(flag, timeout)
    return value


def rendezvous(place: str, count: int, timeout: float = 30.0) -> int:
    """Arrive at ``place`` (a line in that file) and wait until ``count`` tasks have
    arrived there, at most ``timeout`` seconds. Returns how many had: ``count`` when
    they all ran at the same time."""
    count_call(place, os.getpid())
    deadline = time.monotonic() + timeout
    while len(calls(place)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(calls(place))


def timed_sleep(seconds: float, tag: Any = None) -> tuple[float, float, int, Any]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time(), os.getpid(), tag


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


async def async_double(x: int, delay: float = 0.01) -> tuple[int, str]:
    await asyncio.sleep(delay)
    return 2 * x, threading.current_thread().name


def big_array(nbytes: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)


def checksum(array: Any) -> tuple[str, int, int]:
    import numpy as np

    array = np.ascontiguousarray(array)
    return hashlib.sha256(array.data).hexdigest(), array.nbytes, os.getpid()


def array_stats(array: Any) -> tuple[float, tuple[int, ...], str, int]:
    return float(array.sum()), tuple(array.shape), str(array.dtype), os.getpid()


MB = 1_000_000


def filled_20mb(i: int) -> Any:
    """20 MB of one byte value, ``i % 250``."""
    import numpy as np

    return np.full(20 * MB, i % 250, dtype="u1")


def byte_sum(array: Any) -> int:
    return int(array.sum(dtype="u8"))


def hold_memory(megabytes: int, release: str, timeout: float = 120.0) -> int:
    """Hold ``megabytes`` of touched memory until the file ``release`` exists."""
    ballast = bytearray(megabytes * MB)
    ballast[::4096] = b"x" * len(ballast[::4096])
    _wait_for_file(release, timeout)
    return len(ballast)


def make_frame(n: int, seed: int) -> Any:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "i": np.arange(n, dtype="int64"),
            "x": rng.random(n),
            "s": [f"row-{k}" for k in range(n)],
            "c": pd.Categorical(rng.choice(["a", "b", "c"], n)),
            "t": pd.date_range("2024-01-01", periods=n, freq="s"),
        }
    )


def frame_summary(frame: Any) -> tuple[int, float, dict, int]:
    counts = {str(k): int(v) for k, v in frame["c"].value_counts().sort_index().items()}
    return int(frame["i"].sum()), float(frame["x"].sum()), counts, os.getpid()


class Counter:
    """An actor: a count, a sync and an async way to raise it, and one that fails."""

    # An Actor proxy reads only the attributes its class has.
    n = 0
    threads: frozenset[str] = frozenset()

    def __init__(self, start: int = 0) -> None:
        self.n = start
        self.threads = frozenset()

    def increment(self, by: int = 1) -> int:
        self.threads |= {threading.current_thread().name}
        self.n += by
        return self.n

    async def increment_later(self, by: int = 1) -> int:
        await asyncio.sleep(0.01)
        self.n += by
        return self.n

    def fail(self) -> None:
        raise TaskError("the actor's method failed", 0)

    def where(self) -> str:
        """The address of the worker ``get_worker()`` names inside the method."""
        from distributed import get_worker

        return get_worker().address


def use_counter(counter: Any, times: int) -> int:
    """A task given an actor: raise its count ``times`` times; the last count."""
    n = 0
    for _ in range(times):
        n = counter.increment().result()
    return n


def log_warning(logger_name: str, message: str) -> str:
    """Log ``message`` at WARNING on ``logger_name``."""
    import logging

    logging.getLogger(logger_name).warning(message)
    return message


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def import_and_call(module: str, function: str, *args: Any) -> Any:
    """Import ``module`` (uploaded, or installed, at run time) and call its ``function``."""
    import importlib

    return getattr(importlib.import_module(module), function)(*args)


class Unloadable:
    """Pickles, but raises when unpickled."""

    def __reduce__(self) -> tuple:
        return (_refuse_unpickling, ())


def _refuse_unpickling() -> None:
    raise ValueError("this value refuses to be unpickled")


def make_unloadable(_: Any = None) -> Unloadable:
    return Unloadable()


# ------------------------------------------------------ run on workers (client.run)


def run_with_worker(dask_worker: Any) -> tuple[str, int]:
    return dask_worker.address, os.getpid()


def run_plain(value: int) -> tuple[int, int]:
    return value * 3, os.getpid()


async def run_async(value: int) -> int:
    await asyncio.sleep(0)
    return value + 100


def worker_state_summary(dask_worker: Any) -> dict:
    state = dask_worker.state
    return {
        "executing": len(state.executing),
        "tasks": sorted(str(k) for k in state.tasks),
        "available_resources": dict(state.available_resources),
    }


def worker_facts() -> dict:
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "sys_path": list(sys.path),
        "cwd": os.getcwd(),
        "distributed": "distributed" in sys.modules,
        "tornado": "tornado" in sys.modules,
    }


def hosted_actors(dask_worker: Any) -> list[str]:
    """The keys of the actors ``dask_worker`` hosts."""
    return sorted(str(key) for key in dask_worker.state.actors)


def plugin_state(name: str, attribute: str, dask_worker: Any = None) -> Any:
    """An attribute of the worker plugin ``name`` of ``dask_worker``."""
    return getattr(dask_worker.plugins[name], attribute)


def worker_attribute(name: str) -> Any:
    """A task: the attribute ``name`` of the worker ``distributed.get_worker()`` returns."""
    from distributed import get_worker

    return getattr(get_worker(), name)


def imports_distributed_in_body(place: str, count: int) -> str:
    """A task that imports distributed itself (this module does not), once ``count``
    of them run at the same time: the worker they run on is found by each, also by
    those already running when another one's import came first."""
    rendezvous(place, count)
    from distributed import get_worker, secede

    secede()  # reads distributed's executor state of this thread
    return get_worker().address


def spin_for(seconds: float) -> int:
    """Keep a CPU busy in Python for ``seconds`` (what a profiler should see)."""
    deadline = time.perf_counter() + seconds
    rounds = 0
    while time.perf_counter() < deadline:
        rounds += 1
    return rounds


async def spin_on_loop(seconds: float) -> int:
    """An ``async def`` task that holds its event loop for ``seconds``."""
    return spin_for(seconds)
