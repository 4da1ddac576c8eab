"""The worker's RPC handlers: the ops clients and the scheduler call on it.

``Handlers`` holds one method per op (but ``get_data``, which serving transfers
answers): data pushed in or fetched on request (``update_data``, ``gather``),
``free_keys``, ``terminate``, ``Client.run``, and what a client asks to look inside
(``keys``, ``versions``, ``get_logs``, ``get_story``, ``call_stack``, ``ping``), and the
diagnostics (``profile``, ``profile_metadata``, ``dump_state``, ``identity``, ``echo``,
``get_monitor_info``,
the ``benchmark_*`` ops; see ``profiler`` and ``diagnostics``). Each turns its request
into a state machine event or reads the worker; none keeps state.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from clusterlaunch.protocol import ProtocolError, Serialize, Undecodable, pickling
from clusterlaunch.protocol.remote_errors import error_message
from clusterlaunch.protocol.versions import versions_info
from clusterlaunch.worker import diagnostics
from clusterlaunch.worker import state as sm
from clusterlaunch.worker.memory import sizeof
from clusterlaunch.worker.profiler import current_frames
from clusterlaunch.worker.transfers import fetch_from_peer

if TYPE_CHECKING:
    from clusterlaunch.worker.worker import Worker

logger = logging.getLogger("clusterlaunch.worker")


#: dask's ``distributed.admin.log-length`` and ``log-format``, until its config is read.
LOG_LENGTH = 10_000
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


class RecentLogs(logging.Handler):
    """The process's recent log records, every logger's (it sits on the root logger),
    for ``get_logs``: (level, formatted message, time), oldest first.

    A record that no other handler takes still goes to stderr, as Python's last resort
    would have sent it had this handler not been there.
    """

    def __init__(self, length: int = LOG_LENGTH, fmt: str = LOG_FORMAT) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(fmt))
        self.records: deque[tuple[str, str, float]] = deque(maxlen=length)

    def configure(self, length: int, fmt: str) -> None:
        """Keep ``length`` records from now on, formatted with ``fmt``."""
        self.acquire()
        try:
            self.setFormatter(logging.Formatter(fmt))
            self.records = deque(self.records, maxlen=length)
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, self.format(record), record.created))
        last_resort = logging.lastResort
        if (
            last_resort is not None
            and record.levelno >= last_resort.level
            and not self._others_handle(record)
        ):
            last_resort.handle(record)

    def _others_handle(self, record: logging.LogRecord) -> bool:
        current: logging.Logger | None = logging.getLogger(record.name)
        while current is not None:
            if any(handler is not self for handler in current.handlers):
                return True
            current = current.parent if current.propagate else None
        return False


class Handlers:
    """The RPC ops of one worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def update_data(self, data: Mapping, stimulus_id: str | None = None, **_: Any) -> dict:
        bad = [key for key, value in data.items() if isinstance(value, Undecodable)]
        if bad:
            raise ValueError(f"could not decode the values of {bad!r}: {data[bad[0]].error}")
        nbytes = {key: sizeof(value) for key, value in data.items()}
        self.worker.handle_events(
            sm.UpdateData(
                data=dict(data),
                nbytes=nbytes,
                stimulus_id=stimulus_id or f"update-data-{time.time()}",
            )
        )
        return {"nbytes": nbytes, "status": "OK"}

    def free_keys(self, keys: Collection, stimulus_id: str | None = None, **_: Any) -> str:
        self.worker.handle_events(
            sm.FreeKeys(keys=tuple(keys), stimulus_id=stimulus_id or f"free-keys-{time.time()}")
        )
        return "OK"

    async def gather(self, who_has: Mapping[Any, Collection[str]], **_: Any) -> dict:
        """Fetch ``who_has``'s keys from their holders (the scheduler's replicate/rebalance)."""
        worker = self.worker
        failed = []
        fetched: dict = {}
        by_peer: dict[str, list] = {}
        for key, holders in who_has.items():
            if key in worker.state.data:
                continue
            if not holders:
                failed.append(key)
                continue
            by_peer.setdefault(next(iter(holders)), []).append(key)
        for peer, keys in by_peer.items():
            try:
                response = await fetch_from_peer(worker.pool, peer, keys, who=worker.address)
            except (OSError, ProtocolError):
                failed.extend(keys)
                continue
            data = {
                k: v
                for k, v in (response.get("data") or {}).items()
                if not isinstance(v, Undecodable)
            }
            fetched.update(data)
            failed.extend(k for k in keys if k not in data)
        if fetched:
            self.update_data(fetched, stimulus_id=f"gather-{time.time()}")
        if failed:
            return {"status": "partial-fail", "keys": failed}
        return {"status": "OK"}

    def terminate(self, reason: str = "", **_: Any) -> str:
        """Close soon; the reply goes out first."""
        self.worker.begin_close(reason or "terminate", report=True)
        return "OK"

    def ping(self) -> bytes:
        return b"pong"

    def keys(self) -> list:
        return list(self.worker.state.data)

    async def run(
        self, function: Any, args: Any = (), kwargs: Any = None, wait: bool = True, **_: Any
    ) -> dict:
        """``Client.run``: call ``function`` in this process, outside the task graph."""
        worker = self.worker
        try:
            function = _unpickle_if_bytes(function)
            args = _unpickle_if_bytes(args) or ()
            kwargs = dict(_unpickle_if_bytes(kwargs) or {})
            parameters = inspect.signature(function).parameters
            if "dask_worker" in parameters:
                # The worker as distributed's code sees it (plugins, get_worker()).
                kwargs["dask_worker"] = worker.dask_surface()
            result = function(*args, **kwargs)
            if inspect.isawaitable(result):
                if wait:
                    result = await result
                else:
                    worker.background.spawn(_awaited(result), name="Client.run without wait")
                    result = None
        except Exception as e:
            logger.warning("%s: Client.run function failed: %r", worker.address, e)
            return error_message(e)
        return {"status": "OK", "result": Serialize(result)}

    def versions(self, **_: Any) -> dict:
        return versions_info()

    def get_logs(self, start: float = 0, n: int | None = None, timestamps: bool = False) -> list:
        """``Client.get_worker_logs``: the newest ``n`` records since ``start``, newest
        first, each (level, message), or (time, level, message) with ``timestamps``."""
        out: list[tuple] = []
        for level, message, created in reversed(self.worker.logs.records):
            if (n and len(out) >= n) or created < start:
                break
            out.append((created, level, message) if timestamps else (level, message))
        return out

    def get_story(self, keys_or_stimuli: Collection = (), **_: Any) -> list:
        """``Client.story``: this worker's logged transitions of these keys or stimuli,
        each ``(key, from state, to state, stimulus_id)``."""
        wanted = {_hashable(k) for k in keys_or_stimuli}
        return [
            list(entry)
            for entry in self.worker.state.log
            if entry[0] in wanted or entry[3] in wanted
        ]

    def call_stack(self, keys: Collection | None = None, **_: Any) -> dict:
        """``Client.call_stack``: where each task running in a thread is, as traceback lines."""
        frames = current_frames()
        task_threads = self.worker.execution.task_threads
        running = {key: frames[tid] for tid, key in list(task_threads.items()) if tid in frames}
        if keys is not None:
            wanted = {_hashable(k) for k in keys}
            running = {key: frame for key, frame in running.items() if key in wanted}
        return {key: traceback.format_stack(frame) for key, frame in running.items()}

    # ------------------------------------------------- diagnostics: profiles, dumps

    def profile(
        self,
        start: float | None = None,
        stop: float | None = None,
        key: Any = None,
        server: bool = False,
        **_: Any,
    ) -> dict:
        """``Client.profile`` (via the scheduler): a profile tree in dask's format."""
        return self.worker.profiler.get_profile(start=start, stop=stop, key=key, server=server)

    def profile_metadata(self, start: float = 0, stop: float | None = None, **_: Any) -> dict:
        """The sample counts per profile cycle that the dashboard's timeline shows."""
        return self.worker.profiler.get_profile_metadata(start=start, stop=stop)

    def dump_state(self, exclude: Collection[str] = (), **_: Any) -> dict:
        """``Client.dump_cluster_state``: this worker's state as dask's workers dump it."""
        return diagnostics.state_dump(self.worker, self.get_logs(), exclude=exclude)

    def identity(self, **_: Any) -> dict:
        """As dask's ``Worker.identity``."""
        worker = self.worker
        return {
            "type": "Worker",
            "id": worker.id,
            "scheduler": worker.scheduler_address,
            "nthreads": worker.nthreads,
            "memory_limit": worker.memory_limit or None,
        }

    def get_monitor_info(self, recent: bool = False, start: int = 0, **_: Any) -> dict:
        """The scheduler's ``get_worker_monitor_info``: this process's cpu, memory, I/O."""
        return self.worker.heartbeat.monitor.info(recent=recent, start=start)

    def echo(self, data: Any = None, **_: Any) -> Any:
        """What a peer's ``benchmark_network`` sends, sent back."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            return Serialize(data)
        return data

    async def benchmark_disk(self, **_: Any) -> dict[str, float]:
        return await asyncio.to_thread(diagnostics.benchmark_disk, self.worker.local_directory)

    async def benchmark_memory(self, **_: Any) -> dict[str, float]:
        return await asyncio.to_thread(diagnostics.benchmark_memory)

    async def benchmark_network(self, address: str, **_: Any) -> dict[str, float]:
        return await diagnostics.benchmark_network(self.worker.pool, address)


async def _awaited(awaitable: Awaitable[Any]) -> None:
    await awaitable


def _hashable(key: Any) -> Any:
    """A key as the state machine holds it: tuple keys may arrive as lists."""
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _unpickle_if_bytes(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return pickling.loads(memoryview(value))
    if isinstance(value, Undecodable):
        raise value.error
    return value
