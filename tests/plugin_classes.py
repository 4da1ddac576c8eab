"""Worker plugins the plugin tests register, importable by reference in the workers.

Apart from ``tasks.py`` because a plugin is a ``distributed.WorkerPlugin``: importing
this module imports distributed, which a plain task must not make a worker do.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin


class TransitionRecorder(WorkerPlugin):
    """Records every transition it is told of, and whom it was set up with."""

    name = "transition-recorder"

    def __init__(self) -> None:
        self.transitions: list[tuple[Any, str, str]] = []
        self.worker_address: str | None = None

    def setup(self, worker: Any) -> None:
        self.worker_address = worker.address

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        self.transitions.append((key, start, finish))


class AsyncSetup(WorkerPlugin):
    """Set up by a coroutine that yields to the loop before it finishes."""

    name = "async-setup"

    def __init__(self) -> None:
        self.ready = False

    async def setup(self, worker: Any) -> None:
        await asyncio.sleep(0.01)
        self.ready = True


class TeardownMarker(WorkerPlugin):
    """Writes ``<directory>/<pid>`` when torn down."""

    name = "teardown-marker"

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def teardown(self, worker: Any) -> None:
        Path(self.directory, str(os.getpid())).write_text("torn down")


class FailingSetup(WorkerPlugin):
    name = "failing-setup"

    def setup(self, worker: Any) -> None:
        raise ValueError("this plugin's setup fails on purpose")


class EnvironmentSetter(WorkerPlugin):
    """Sets an environment variable in the worker: tasks can then read it."""

    name = "environment-setter"

    def __init__(self, variable: str, value: str) -> None:
        self.variable = variable
        self.value = value

    def setup(self, worker: Any) -> None:
        os.environ[self.variable] = self.value
