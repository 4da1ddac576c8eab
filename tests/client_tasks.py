"""Task functions for ``test_client.py``, pickled by reference.

Workers import this module by name (the tests dir is on their ``PYTHONPATH``), so it
imports nothing heavy: no distributed, no pytest, no test module.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any


class TaskFailed(Exception):
    """Raised inside a task; the client must re-raise this very type."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


def inc(x: int) -> int:
    return x + 1


def add(*args: Any, extra: int = 0) -> Any:
    return sum(args) + extra


def total(values: list, scale: int = 1) -> int:
    return sum(values) * scale


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


def fail(code: int) -> None:
    def inner_frame() -> None:
        raise TaskFailed(f"failed on purpose with code {code}", code)

    inner_frame()


def fail_after_counting(counter: str, failures: int) -> int:
    """Fail the first ``failures`` calls (counted in the file ``counter``)."""
    count_call(counter, "call")
    made = len(calls(counter))
    if made <= failures:
        raise RuntimeError(f"call {made} of {failures} failing ones")
    return made


def block(flag: str, timeout: float = 60.0, started: str | None = None, value: Any = None) -> Any:
    """Optionally announce the start in ``started``, then wait until ``flag`` exists."""
    if started:
        count_call(started, value)
    deadline = time.monotonic() + timeout
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def pid(*_: Any) -> int:
    return os.getpid()


def modules_loaded() -> list[str]:
    import sys

    return sorted(m for m in sys.modules if m.split(".")[0] in ("distributed", "tornado"))
