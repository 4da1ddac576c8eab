"""The worker's statistical profiler, in dask's profile format.

A thread of the worker's own wakes every ``distributed.worker.profile.interval`` and
records where each task thread is (one tree for the worker, one per key prefix) and
where the event loop's thread is (the "server" profile of ``client.profile(server=
True)``); every ``distributed.worker.profile.cycle`` it files the trees away under the
time, so that ``get_profile`` / ``get_profile_metadata`` answer for a span of time as
dask's worker does.

A tree is dask's: ``{"identifier", "description": {"filename", "name", "line_number",
"line"}, "count", "children": {identifier: tree}}``, each node's count the number of
samples that passed through it, the root's the number of samples. Times are the
scheduler's clock, which the client's start and stop are given in.

The sampler samples while tasks execute and is parked, costing nothing, while none
does: each wake-up costs more than the sample itself, and an idle loop's samples are
dropped anyway (it waits in ``select``), so the loop's profile covers the time tasks
execute. At the first task (dask, and so its config, is loaded by then) it reads the
diagnostics' settings (also those of the kept logs, which ``on_settings`` is told):
reading them sooner would import dask, which a worker's start does not.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import gc
import linecache
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger("clusterlaunch.worker")

Tree = dict[str, Any]

#: The file whose ``_run_task`` calls a task: samples of task threads start below it.
TASK_RUNNER_FILE = str(Path(__file__).with_name("execution.py"))
#: A loop-thread sample inside one of these is the loop waiting: left out, as dask does.
LOOP_IDLE_FILES = ("selectors.py",)
#: Frames kept from the innermost outwards: deeper trees only cost (as dask's cut-off).
MAX_DEPTH = 100
#: Seconds ``close`` waits for the sampler thread to end.
JOIN_TIMEOUT = 5.0


class TaskThreadMap(dict[int, Any]):
    """Task thread id -> key of the task it runs. ``task_started`` is set when a task
    starts (an insert here; ``Execution`` notes a coroutine task's start too): the
    profiler waits on it while nothing executes."""

    def __init__(self) -> None:
        super().__init__()
        self.task_started = threading.Event()

    def __setitem__(self, thread: int, key: Any) -> None:
        super().__setitem__(thread, key)
        self.note_task_started()

    def note_task_started(self) -> None:
        if not self.task_started.is_set():
            self.task_started.set()


@dataclass(frozen=True)
class DiagnosticsSettings:
    """``distributed.worker.profile.*``, the profile history's length and the kept
    logs' length and format, from dask's config (distributed's defaults where the config
    has none: its yaml isn't loaded here)."""

    enabled: bool = True
    interval: float = 0.010
    cycle: float = 1.0
    history_length: int = 1000
    log_length: int = 10_000
    log_format: str = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"

    @classmethod
    def from_config(cls) -> DiagnosticsSettings:
        import dask.config
        from dask.utils import parse_timedelta

        get = dask.config.get
        if get("distributed.worker.profile.low-level", False):
            logger.warning(
                "distributed.worker.profile.low-level is set: clusterlaunch workers record"
                " Python frames only"
            )
        # A bare number in these is milliseconds, as dask reads it.
        return cls(
            enabled=bool(get("distributed.worker.profile.enabled", cls.enabled)),
            interval=parse_timedelta(
                get("distributed.worker.profile.interval", f"{cls.interval}s"), default="ms"
            ),
            cycle=parse_timedelta(
                get("distributed.worker.profile.cycle", f"{cls.cycle}s"), default="ms"
            ),
            history_length=int(get("distributed.admin.low-level-log-length", cls.history_length)),
            log_length=int(get("distributed.admin.log-length", cls.log_length)),
            log_format=str(get("distributed.admin.log-format", cls.log_format)),
        )


def create() -> Tree:
    """An empty tree."""
    return {
        "count": 0,
        "children": {},
        "identifier": "root",
        "description": {"filename": "", "name": "", "line_number": 0, "line": ""},
    }


def merge(*trees: Tree) -> Tree:
    """One new tree counting the samples of all of ``trees`` (which are left alone)."""
    if not trees:
        return create()
    children: dict[str, list[Tree]] = {}
    for tree in trees:
        for ident, child in tree["children"].items():
            children.setdefault(ident, []).append(child)
    return {
        "count": sum(tree["count"] for tree in trees),
        "children": {ident: merge(*group) for ident, group in children.items()},
        "identifier": trees[0]["identifier"],
        "description": trees[0]["description"],
    }


def add_sample(
    tree: Tree, frame: FrameType, stop_file: str | None = None, omit: tuple[str, ...] = ()
) -> bool:
    """Count the stack from ``frame`` outwards into ``tree``; it ends below the first
    caller in ``stop_file``. A stack with a frame in a file ending in one of ``omit``
    is not counted (returns False)."""
    stack: list[FrameType] = []
    current: FrameType | None = frame
    while current is not None and len(stack) < MAX_DEPTH:
        if omit and current.f_code.co_filename.endswith(omit):
            return False
        stack.append(current)
        current = current.f_back
        if current is not None and current.f_code.co_filename == stop_file:
            break
    node = tree
    node["count"] += 1
    for f in reversed(stack):
        code = f.f_code
        ident = f"{code.co_name};{code.co_filename};{code.co_firstlineno}"
        child = node["children"].get(ident)
        if child is None:
            child = node["children"][ident] = {
                "count": 0,
                "description": _describe(f),
                "children": {},
                "identifier": ident,
            }
        child["count"] += 1
        node = child
    return True


def _describe(frame: FrameType) -> dict[str, Any]:
    code = frame.f_code
    line_number = frame.f_lineno or code.co_firstlineno
    return {
        "filename": code.co_filename,
        "name": code.co_name,
        "line_number": line_number,
        "line": linecache.getline(code.co_filename, line_number, frame.f_globals).lstrip(),
    }


def current_frames() -> dict[int, FrameType]:
    """``sys._current_frames()``; before Python 3.12 with the collector off meanwhile:
    a collection inside it can deadlock the process (CPython gh-106883)."""
    if sys.version_info >= (3, 12) or not gc.isenabled():
        return sys._current_frames()
    gc.disable()
    try:
        return sys._current_frames()
    finally:
        gc.enable()


def _window(
    history: list[tuple[float, Tree]], start: float | None, stop: float | None
) -> tuple[list[tuple[float, Tree]], bool]:
    """The entries of ``history`` (sorted by time) that dask's ``get_profile`` takes for
    ``start``..``stop``, and whether the window reaches the present."""
    first = 0 if start is None else bisect.bisect_left(history, (start,))
    end = None if stop is None else bisect.bisect_right(history, (stop,)) + 1
    if end is not None and end >= len(history):
        end = None
    return history[first:end], end is None


@functools.lru_cache(maxsize=10_000)
def _prefix(key: Any) -> str:
    from dask.utils import key_split

    return key_split(key)


class Profiler:
    """The sampler thread of one worker and the profiles it keeps."""

    def __init__(
        self,
        task_threads: TaskThreadMap,
        clock: Callable[[], float],
        busy: Callable[[], bool],
        on_settings: Callable[[DiagnosticsSettings], None] = lambda settings: None,
    ) -> None:
        self.task_threads = task_threads
        #: Seconds on the scheduler's clock.
        self.clock = clock
        #: Whether any task executes (in a thread or on the loop).
        self.busy = busy
        #: Told the settings once they are read (at the first task).
        self.on_settings = on_settings
        self.settings: DiagnosticsSettings | None = None
        #: When the newest sample in the recent trees was taken (0: none yet).
        self.last_sample = 0.0
        self._next_cycle = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The event loop's thread (the one ``run`` runs in).
        self.loop_thread = 0
        self.recent = create()
        self.recent_keys: dict[str, Tree] = {}
        self.recent_loop = create()
        self.history: deque[tuple[float, Tree]] = deque()
        self.keys_history: deque[tuple[float, dict[str, Tree]]] = deque()
        self.loop_history: deque[tuple[float, Tree]] = deque()

    @property
    def thread(self) -> threading.Thread | None:
        """The sampler thread, once started."""
        return self._thread

    async def run(self) -> None:
        """Sample for as long as this runs (the worker's background work owns it)."""
        self.loop_thread = threading.get_ident()
        self._thread = threading.Thread(target=self._sample_loop, name="profiler", daemon=True)
        self._thread.start()
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the sampler and join it."""
        self._stop.set()
        self.task_threads.task_started.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)

    def _sample_loop(self) -> None:
        started = self.task_threads.task_started
        started.wait()
        if self._stop.is_set():
            return
        settings = self.settings = DiagnosticsSettings.from_config()
        self.on_settings(settings)
        if not settings.enabled:
            return
        length = settings.history_length
        with self._lock:
            self.history = deque(maxlen=length)
            self.keys_history = deque(maxlen=length)
            self.loop_history = deque(maxlen=length)
        while not self._stop.is_set():
            self._sample_while_busy(settings)
            started.clear()
            # A task that started before the clear shows here; one after sets it again.
            # close sets the stop before ``started``, so neither is missed.
            if not self.busy() and not self._stop.is_set():
                started.wait()

    def _sample_while_busy(self, settings: DiagnosticsSettings) -> None:
        """Sample until nothing executes (or close). A cycle ends at the first sample
        past its end, filed under the time of its own last sample: parked time makes
        no empty cycles, and samples are never filed under a later time."""
        while not self._stop.wait(settings.interval):
            now = self.clock()
            if now >= self._next_cycle:
                if self.last_sample:
                    self._cycle(self.last_sample)
                self._next_cycle = now + settings.cycle
            self._sample()
            self.last_sample = now
            if not self.busy():
                return

    def _sample(self) -> None:
        tasks = dict(self.task_threads)
        frames = current_frames()
        try:
            with self._lock:
                for thread, key in tasks.items():
                    frame = frames.get(thread)
                    if frame is None:
                        continue
                    add_sample(self.recent, frame, TASK_RUNNER_FILE)
                    prefix = _prefix(key)
                    tree = self.recent_keys.get(prefix)
                    if tree is None:
                        tree = self.recent_keys[prefix] = create()
                    add_sample(tree, frame, TASK_RUNNER_FILE)
                loop_frame = frames.get(self.loop_thread)
                if loop_frame is not None:
                    add_sample(self.recent_loop, loop_frame, omit=LOOP_IDLE_FILES)
        finally:
            del frames

    def _cycle(self, now: float) -> None:
        with self._lock:
            self.history.append((now, self.recent))
            self.keys_history.append((now, self.recent_keys))
            self.loop_history.append((now, self.recent_loop))
            self.recent, self.recent_keys, self.recent_loop = create(), {}, create()

    # ------------------------------------------------------------------ the RPC ops

    def get_profile(
        self,
        start: float | None = None,
        stop: float | None = None,
        key: Any = None,
        server: bool = False,
    ) -> Tree:
        """The ``profile`` op: the samples of ``start``..``stop`` (scheduler time), of
        the tasks with ``key``'s prefix, or of the event loop's thread if ``server``."""
        now = self.clock()
        with self._lock:
            history: Iterable[tuple[float, Tree]]
            if server:
                history = self.loop_history
                recent = self.recent_loop
            elif key is None:
                history, recent = self.history, self.recent
            else:
                prefix = self._known_prefix(key)
                history = [(t, trees[prefix]) for t, trees in self.keys_history if prefix in trees]
                recent = self.recent_keys.get(prefix, create())
            window, to_present = _window(list(history), start, stop)
            if to_present and (start is None or start <= self.last_sample):
                window.append((now, merge(recent)))
        if not window:
            return create()
        return merge(*(tree for _, tree in window))

    def get_profile_metadata(self, start: float = 0, stop: float | None = None) -> dict:
        """The ``profile_metadata`` op: samples per cycle, in total and per key prefix."""
        now = self.clock()
        until = stop or now
        with self._lock:
            counts = [(t, tree["count"]) for t, tree in self.history if start < t < until]
            keys = [
                (t, {prefix: tree["count"] for prefix, tree in trees.items()})
                for t, trees in self.keys_history
                if start < t < until
            ]
            if stop is None:
                latest = self.last_sample or now
                counts.append((latest, self.recent["count"]))
                keys.append((latest, {p: tree["count"] for p, tree in self.recent_keys.items()}))
        return {"counts": counts, "keys": keys}

    def _known_prefix(self, key: Any) -> str:
        """``key`` as the prefix the trees are filed under: a prefix, or a whole key."""
        if isinstance(key, list):  # a tuple key, as msgpack delivers it
            key = tuple(key)
        if key in self.recent_keys or any(key in trees for _, trees in self.keys_history):
            return key
        return _prefix(key)
