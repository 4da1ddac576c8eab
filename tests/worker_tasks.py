"""Task functions for the integration tests, pickled by reference.

The workers import this module by name (the tests dir is on their ``PYTHONPATH``),
so it must stay light: nothing from distributed, pytest or the test modules, or the
check that a worker never imports distributed would be testing this file instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
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


def add(*args: Any) -> Any:
    return sum(args)


def pid_of(*_: Any) -> int:
    return os.getpid()


def raise_task_error(code: int) -> None:
    def deeper() -> None:
        raise TaskError(f"task failed on purpose with code {code}", code)

    deeper()


def flaky(counter: str, failures: int) -> int:
    """Fail the first ``failures`` calls (counted in the file ``counter``)."""
    path = Path(counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls <= failures:
        raise RuntimeError(f"flaky call {calls} of {failures} failing ones")
    return calls


def sleep_until(flag: str, timeout: float, started: str | None = None) -> float:
    """Announce the start in the file ``started``, then run until ``flag`` exists."""
    if started:
        Path(started).write_text(str(os.getpid()))
    deadline = time.monotonic() + timeout
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.02)
    return time.time()


def timed_sleep(seconds: float, tag: Any = None) -> tuple[float, float, int, Any]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time(), os.getpid(), tag


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def big_array(nbytes: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)


def checksum(array: Any) -> tuple[str, int, int]:
    import numpy as np

    array = np.ascontiguousarray(array)
    return hashlib.sha256(array.data).hexdigest(), array.nbytes, os.getpid()


def array_stats(array: Any) -> tuple[float, tuple[int, ...], str, int]:
    return float(array.sum()), tuple(array.shape), str(array.dtype), os.getpid()


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
    """A would-be actor."""

    def __init__(self) -> None:
        self.n = 0

    def increment(self) -> int:
        self.n += 1
        return self.n


def identity(x: Any) -> Any:
    return x


async def async_double(x: int, delay: float = 0.01) -> tuple[int, str]:
    await asyncio.sleep(delay)
    return 2 * x, threading.current_thread().name


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


def loaded_heavy_modules() -> list[str]:
    import sys

    return sorted(m for m in sys.modules if m.split(".")[0] in ("distributed", "tornado"))


class Unloadable:
    """Pickles, but raises when unpickled."""

    def __reduce__(self) -> tuple:
        return (_refuse_unpickling, ())


def _refuse_unpickling() -> None:
    raise ValueError("this value refuses to be unpickled")


def make_unloadable(_: Any = None) -> Unloadable:
    return Unloadable()


def type_name(value: Any) -> str:
    return type(value).__name__
