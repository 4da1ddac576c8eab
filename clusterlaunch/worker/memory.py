"""Memory management of a worker: spilling values to disk and pausing under pressure.

``SpillBuffer`` is the worker's data store. It keeps values in memory until their total
size passes a target, then moves the least recently used ones to files in the worker's
directory, and reads them back when they are asked for. ``MemoryThresholds`` turns the
process's memory use into decisions, with dask's default fractions of the memory limit:
spill by managed size past 60 %, spill by process memory past 70 %, pause past 80 %.
``MemoryMonitor`` is the worker's loop that measures the process and acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from clusterlaunch.protocol import pickling
from clusterlaunch.worker import state as sm

if TYPE_CHECKING:
    from clusterlaunch.worker.worker import Worker

logger = logging.getLogger("clusterlaunch.worker")

#: Seconds between checks of the process's memory against the memory limit.
MEMORY_MONITOR_INTERVAL = 0.1


def sizeof(value: Any) -> int:
    """Bytes ``value`` takes, as dask measures it (a guess of 1 MB if that fails)."""
    from dask.sizeof import sizeof as dask_sizeof

    try:
        return int(dask_sizeof(value))
    except Exception:
        return 1_000_000


class SpillBuffer(MutableMapping):
    """A mapping that keeps at most ``target`` bytes of values in memory.

    ``sizeof`` measures values. A value larger than the target on its own goes to disk
    at once. A value that fails to pickle, or whose file can't be written (a full or
    read-only disk), stays in memory; the memory monitor then pauses the worker once
    the process passes the pause fraction, as dask's does.
    """

    def __init__(self, directory: str | None, target: float, sizeof: Callable[[Any], int]) -> None:
        try:
            self.directory = tempfile.mkdtemp(prefix="spill-", dir=directory)
        except OSError as e:
            raise OSError(
                f"cannot keep spilled values in {directory or tempfile.gettempdir()!r}: "
                f"{e.strerror or e}; pass a writable --local-directory"
            ) from None
        self.target = target
        self.sizeof = sizeof
        self.fast: OrderedDict[Hashable, Any] = OrderedDict()
        self.sizes: dict[Hashable, int] = {}
        self.slow: dict[Hashable, str] = {}
        self.fast_bytes = 0
        self.spilled_bytes = 0
        self.spill_count = 0
        self.unspill_count = 0
        self.spill_failing = False  # the last write failed; logged once until one succeeds

    def __repr__(self) -> str:
        return (
            f"<SpillBuffer: {len(self.fast)} in memory ({self.fast_bytes} B), "
            f"{len(self.slow)} on disk ({self.spilled_bytes} B)>"
        )

    @property
    def spilled_total(self) -> tuple[int, int]:
        """(bytes the spilled values took in memory, bytes they take on disk)."""
        on_disk = sum(os.path.getsize(path) for path in self.slow.values() if os.path.exists(path))
        return self.spilled_bytes, on_disk

    def __len__(self) -> int:
        return len(self.fast) + len(self.slow)

    def __iter__(self) -> Iterator[Hashable]:
        yield from list(self.fast)
        yield from list(self.slow)

    def __contains__(self, key: object) -> bool:
        return key in self.fast or key in self.slow

    def __getitem__(self, key: Hashable) -> Any:
        if key in self.fast:
            self.fast.move_to_end(key)
            return self.fast[key]
        path = self.slow[key]
        with open(path, "rb") as f:
            value = pickling.loads(f.read())
        self._forget_file(key)
        self.unspill_count += 1
        self._keep_in_memory(key, value, self.sizes[key])
        return value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        if key in self:
            del self[key]
        size = self.sizeof(value)
        self.sizes[key] = size
        if size > self.target and self._write(key, value):
            return
        self._keep_in_memory(key, value, size)

    def __delitem__(self, key: Hashable) -> None:
        if key in self.fast:
            del self.fast[key]
            self.fast_bytes -= self.sizes.pop(key)
        elif key in self.slow:
            self._forget_file(key)
            del self.sizes[key]
        else:
            raise KeyError(key)

    def _keep_in_memory(self, key: Hashable, value: Any, size: int) -> None:
        self.fast[key] = value
        self.fast_bytes += size
        self.evict_until(self.target, keep=key)

    def evict_until(self, target: float, keep: Hashable | None = None) -> int:
        """Spill least recently used values until at most ``target`` bytes stay in
        memory; returns the bytes spilled. ``keep`` is never spilled."""
        freed = 0
        for key in list(self.fast):
            if self.fast_bytes <= target:
                break
            if key == keep:
                continue
            size = self.sizes[key]
            if self._write(key, self.fast[key]):
                del self.fast[key]
                self.fast_bytes -= size
                freed += size
        return freed

    def _write(self, key: Hashable, value: Any) -> bool:
        name = hashlib.sha1(repr(key).encode()).hexdigest()
        path = os.path.join(self.directory, name)
        try:
            payload = pickling.dumps(value)
        except Exception as e:
            logger.warning("could not spill %r to disk, keeping it in memory: %r", key, e)
            return False
        try:
            with open(path, "wb") as f:
                f.write(payload)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(path)
            if not self.spill_failing:
                logger.error(
                    "Spill to disk failed; keeping data in memory (%s: %s)",
                    self.directory,
                    e.strerror or e,
                )
            self.spill_failing = True
            return False
        self.spill_failing = False
        self.slow[key] = path
        self.spilled_bytes += self.sizes[key]
        self.spill_count += 1
        return True

    def _forget_file(self, key: Hashable) -> None:
        path = self.slow.pop(key)
        self.spilled_bytes -= self.sizes[key]
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    def close(self) -> None:
        """Delete the spill files."""
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class MemoryThresholds:
    """dask's worker memory fractions applied to ``limit`` bytes (0: no limit)."""

    limit: int
    target_fraction: float = 0.6
    spill_fraction: float = 0.7
    pause_fraction: float = 0.8

    @property
    def managed_target(self) -> float:
        """Bytes of values kept in memory before spilling by size."""
        return self.limit * self.target_fraction if self.limit else float("inf")

    def should_pause(self, process_bytes: int) -> bool:
        return bool(self.limit) and process_bytes > self.limit * self.pause_fraction

    def bytes_to_spill(self, process_bytes: int) -> float:
        """How much to spill so the process drops back under the target fraction."""
        if not self.limit or process_bytes <= self.limit * self.spill_fraction:
            return 0.0
        return process_bytes - self.limit * self.target_fraction


def spilled_total(data: Mapping) -> tuple[int, int]:
    """(bytes in memory, bytes on disk) of the values a worker's ``data`` spilled."""
    return data.spilled_total if isinstance(data, SpillBuffer) else (0, 0)


class MemoryMonitor:
    """Spills and pauses by process memory, as dask's worker memory monitor does."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.thresholds = worker.memory
        self._process = psutil.Process()

    async def run(self) -> None:
        worker = self.worker
        thresholds = self.thresholds
        while True:
            await asyncio.sleep(MEMORY_MONITOR_INTERVAL)
            if worker.status != "running":
                continue
            process_bytes = self._process.memory_info().rss
            data = worker.state.data
            excess = thresholds.bytes_to_spill(process_bytes)
            if excess and isinstance(data, SpillBuffer) and data.fast_bytes:
                freed = data.evict_until(max(0.0, data.fast_bytes - excess))
                if freed:
                    logger.info(
                        "%s: process memory %d MiB past the spill threshold; spilled %d MiB",
                        worker.address,
                        process_bytes >> 20,
                        freed >> 20,
                    )
                process_bytes = self._process.memory_info().rss
            paused = worker.state.status == "paused"
            if thresholds.should_pause(process_bytes) != paused:
                if paused:
                    logger.info(
                        "%s: memory back under the pause threshold; resuming", worker.address
                    )
                    event: sm.Event = sm.Unpause(stimulus_id=f"unpause-{time.time()}")
                else:
                    logger.warning(
                        "%s: process memory %d MiB is past %d%% of the %d MiB limit; pausing",
                        worker.address,
                        process_bytes >> 20,
                        int(thresholds.pause_fraction * 100),
                        thresholds.limit >> 20,
                    )
                    event = sm.Pause(stimulus_id=f"pause-{time.time()}")
                worker.handle_events(event)
