"""What a worker tells about itself for debugging: its state dump and its hardware
benchmarks, in the formats dask's worker answers ``dump_state`` and
``benchmark_disk`` / ``benchmark_memory`` / ``benchmark_network`` with.

``state_dump`` is what ``Client.dump_cluster_state`` stores per worker and
``distributed.cluster_dump.DumpArtefact`` reads (``id``, ``tasks`` with each task's
``state``, ``log``, ``logs``, ``config``): the names of dask's ``Worker._to_dict``,
filled from our state machine, an empty list where we keep no such thing, and plain
data throughout (lists, dicts with scalar keys), so that it packs as msgpack and dumps
as yaml. The benchmarks map a size ("1 MiB") to bytes per second. ``MonitorHistory``
keeps what dask's ``SystemMonitor`` keeps, for ``get_monitor_info``, one sample per
metrics report (each heartbeat) rather than a timer of its own.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from clusterlaunch.protocol import Serialize
from clusterlaunch.worker.tasks import TaskState

if TYPE_CHECKING:
    from clusterlaunch.comm.rpc import ConnectionPool
    from clusterlaunch.worker.worker import Worker

#: dask's sizes and durations (seconds), so that results line up with its workers'.
DISK_SIZES = ("1 kiB", "100 kiB", "1 MiB", "10 MiB", "100 MiB")
DISK_DURATION = 1.0
MEMORY_SIZES = ("2 kiB", "10 kiB", "100 kiB", "1 MiB", "10 MiB")
MEMORY_DURATION = 0.2
NETWORK_SIZES = ("1 kiB", "10 kiB", "100 kiB", "1 MiB", "10 MiB", "50 MiB")
NETWORK_DURATION = 1.0
#: Task fields left out of a dump: raw pickles (their texts are kept) and bookkeeping.
TASK_FIELDS_LEFT_OUT = frozenset({"exception", "traceback", "serial", "held_resources"})

_UNITS = {"B": 1, "kiB": 2**10, "MiB": 2**20}


def parse_size(size: str) -> int:
    """``"10 MiB"`` -> bytes (the sizes above only)."""
    number, unit = size.split()
    return int(float(number) * _UNITS[unit])


def plain(value: Any) -> Any:
    """``value`` as msgpack- and yaml-friendly data: containers as lists and dicts
    (non-scalar dict keys as their ``str``), anything else as its ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {_plain_key(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)) or _is_iterable_view(value):
        return [plain(v) for v in value]
    return repr(value)


def _plain_key(key: Any) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    return str(plain(key))


def _is_iterable_view(value: Any) -> bool:
    return isinstance(value, (deque, type({}.keys()), type({}.values())))


def task_dump(ts: TaskState, exclude: Collection[str] = ()) -> dict[str, Any]:
    """One task as dask dumps a worker's: its fields, empty ones left out, related
    tasks as their repr."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(ts):
        name = f.name
        if name in TASK_FIELDS_LEFT_OUT or name in exclude:
            continue
        value = getattr(ts, name)
        if not value:
            continue
        if isinstance(value, (set, frozenset)) and all(isinstance(v, TaskState) for v in value):
            out[name] = sorted(repr(v) for v in value)
        elif name == "run_spec" or isinstance(value, type):
            out[name] = repr(value)
        else:
            out[name] = plain(value)
    return out


def _keys_by_priority(tasks: Iterable[TaskState]) -> list:
    return [ts.key for ts in sorted(tasks, key=lambda ts: (ts.priority, ts.serial))]


def state_dump(worker: Worker, logs: list, exclude: Collection[str] = ()) -> dict[str, Any]:
    """The ``dump_state`` op: ``worker`` as dask's ``Worker._to_dict`` shows a worker."""
    import dask.config

    state = worker.state
    memory = worker.memory
    info: dict[str, Any] = {
        # Worker.identity, Server._to_dict
        "type": "Worker",
        "id": worker.id,
        "scheduler": worker.scheduler_address,
        "nthreads": state.nthreads,
        "memory_limit": memory.limit or None,
        "address": worker.address,
        "status": worker.status,
        "thread_id": worker.profiler.loop_thread,
        # Worker._to_dict
        "logs": logs,
        "config": dask.config.config,
        "transfer_incoming_log": [],
        "transfer_outgoing_log": [],
        # WorkerState._to_dict
        "running": state.running,
        "ready": _keys_by_priority(state.ready),
        "constrained": _keys_by_priority(state.constrained),
        "data": dict.fromkeys(state.data),
        "data_needed": {w: _keys_by_priority(q) for w, q in state.data_needed.items()},
        "executing": [ts.key for ts in state.executing],
        "has_what": {w: list(keys) for w, keys in state.has_what.items()},
        "long_running": [ts.key for ts in state.long_running],
        "in_flight_tasks": [ts.key for ts in state.in_flight_tasks],
        "in_flight_workers": {w: list(g.keys) for w, g in state.in_flight_workers.items()},
        "missing_dep_flight": [ts.key for ts in state.missing],
        "busy_workers": sorted(state.busy_workers),
        "log": list(state.log),
        "stimulus_log": [],
        "tasks": {key: task_dump(ts, exclude) for key, ts in state.tasks.items()},
        "task_counts": state.summary(),
        # WorkerMemoryManager._to_dict
        "memory_target_fraction": memory.target_fraction,
        "memory_spill_fraction": memory.spill_fraction,
        "memory_pause_fraction": memory.pause_fraction,
    }
    return plain({k: v for k, v in info.items() if k not in exclude})


# ------------------------------------------------------------------ system monitor

#: dask's ``distributed.admin.system-monitor.log-length``.
MONITOR_LENGTH = 7200
#: The quantities of dask's SystemMonitor, each from a metrics report: key path there.
MONITOR_QUANTITIES = {
    "cpu": ("cpu",),
    "memory": ("memory",),
    "time": ("time",),
    "host_net_io.read_bps": ("host_net_io", "read_bps"),
    "host_net_io.write_bps": ("host_net_io", "write_bps"),
    "host_disk_io.read_bps": ("host_disk_io", "read_bps"),
    "host_disk_io.write_bps": ("host_disk_io", "write_bps"),
    "num_fds": ("num_fds",),
}


class MonitorHistory:
    """The recent samples of the process's cpu, memory, I/O rates and open files."""

    def __init__(self, length: int = MONITOR_LENGTH) -> None:
        self.count = 0
        self.last_time = time.monotonic()
        self.quantities: dict[str, deque[float]] = {
            name: deque(maxlen=length) for name in MONITOR_QUANTITIES
        }

    def record(self, metrics: Mapping[str, Any]) -> None:
        """Keep one sample from a metrics report (``Heartbeat.metrics``)."""
        self.count += 1
        self.last_time = time.monotonic()
        for name, path in MONITOR_QUANTITIES.items():
            value: Any = metrics
            for part in path:
                value = value[part]
            self.quantities[name].append(value)

    def info(self, recent: bool = False, start: int = 0) -> dict[str, Any]:
        """The ``get_monitor_info`` op: the latest sample, or those from the
        ``start``-th on (counted since the worker started; older ones as None)."""
        if recent:
            query: dict[str, Any] = {k: v[-1] for k, v in self.quantities.items() if v}
        elif start >= self.count:
            query = {k: [] for k in self.quantities}
        else:
            first = min(-1, max(-len(self.quantities["cpu"]), start - self.count))
            query = {
                k: [v[i] if -i <= len(v) else None for i in range(first, 0)]
                for k, v in self.quantities.items()
            }
        return {"range_query": query, "count": self.count, "last_time": self.last_time}


# ------------------------------------------------------------------ benchmarks


def benchmark_disk(directory: str, sizes: Iterable[str] = DISK_SIZES) -> dict[str, float]:
    """Bytes per second appended and fsynced to files in ``directory``, per size."""
    out = {}
    for size in sizes:
        payload = random.randbytes(parse_size(size))
        with tempfile.TemporaryDirectory(dir=directory, prefix="benchmark-disk-") as scratch:
            names = [os.path.join(scratch, str(i)) for i in range(100)]
            total = 0
            start = time.perf_counter()
            while time.perf_counter() < start + DISK_DURATION:
                with open(random.choice(names), "ab") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
                total += len(payload)
            out[size] = total / (time.perf_counter() - start)
    return out


def benchmark_memory(sizes: Iterable[str] = MEMORY_SIZES) -> dict[str, float]:
    """Bytes per second copied in memory, per size."""
    out = {}
    for size in sizes:
        payload = random.randbytes(parse_size(size))
        total = 0
        start = time.perf_counter()
        while time.perf_counter() < start + MEMORY_DURATION:
            copy = payload[:-1]
            del copy
            total += len(payload)
        out[size] = total / (time.perf_counter() - start)
    return out


async def benchmark_network(
    pool: ConnectionPool, address: str, sizes: Iterable[str] = NETWORK_SIZES
) -> dict[str, float]:
    """Bytes per second both ways through ``echo`` round trips to the worker at
    ``address`` (ours or dask's), per size."""
    out = {}
    peer = pool(address)
    for size in sizes:
        payload = Serialize(random.randbytes(parse_size(size)))
        total = 0
        start = time.perf_counter()
        while time.perf_counter() < start + NETWORK_DURATION:
            await peer.echo(data=payload)
            total += 2 * parse_size(size)
        out[size] = total / (time.perf_counter() - start)
    return out
