"""Typed messages from the worker's state machine to the scheduler.

Each is an :class:`~clusterlaunch.worker.events.Instruction`: the shell sends
``to_dict()`` on the batched stream. The fields are those that the stream handlers of
distributed's scheduler (``handle_task_finished``, ``handle_long_running``, ...) and its
work stealing read, named as on the wire.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

from clusterlaunch.protocol.markers import Serialize
from clusterlaunch.worker.events import Instruction

if TYPE_CHECKING:
    from dask.typing import Key

    from clusterlaunch.worker.tasks import State

__all__ = [
    "AddKeysMsg",
    "LongRunningMsg",
    "ReleaseWorkerDataMsg",
    "RequestRefreshWhoHasMsg",
    "RescheduleMsg",
    "SendMessageToScheduler",
    "StealResponseMsg",
    "TaskErredMsg",
    "TaskFinishedMsg",
    "WorkerStatusChangeMsg",
    "pickled_type",
    "typename",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class SendMessageToScheduler(Instruction):
    """Send ``to_dict()`` on the batched stream to the scheduler."""

    op: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The message as it goes on the wire: ``op`` and the fields, named as there."""
        return {"op": self.op, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskFinishedMsg(SendMessageToScheduler):
    """``key`` is in memory here; ``type`` is the pickled type of its value."""

    op: ClassVar[str] = "task-finished"
    key: Key
    run_id: int
    nbytes: int
    type: bytes
    typename: str
    thread: int | None
    startstops: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "status": "OK",
            "key": self.key,
            "run_id": self.run_id,
            "nbytes": self.nbytes,
            "type": self.type,
            "typename": self.typename,
            "metadata": {},
            "thread": self.thread,
            "startstops": self.startstops,
            "stimulus_id": self.stimulus_id,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskErredMsg(SendMessageToScheduler):
    """``key`` failed here; ``exception`` and ``traceback`` are pickled."""

    op: ClassVar[str] = "task-erred"
    key: Key
    run_id: int
    exception: bytes
    traceback: bytes | None
    exception_text: str
    traceback_text: str
    thread: int | None
    startstops: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "status": "error",
            "key": self.key,
            "run_id": self.run_id,
            # dask's worker wraps the pickled bytes so that they travel out of band and
            # reach the client untouched by the scheduler.
            "exception": Serialize(self.exception),
            "traceback": None if self.traceback is None else Serialize(self.traceback),
            "exception_text": self.exception_text,
            "traceback_text": self.traceback_text,
            "thread": self.thread,
            "startstops": self.startstops,
            "stimulus_id": self.stimulus_id,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class ReleaseWorkerDataMsg(SendMessageToScheduler):
    """This worker dropped its copy of ``key``."""

    op: ClassVar[str] = "release-worker-data"
    key: Key


@dataclass(frozen=True, kw_only=True, slots=True)
class AddKeysMsg(SendMessageToScheduler):
    """This worker holds copies of ``keys`` (fetched replicas, or kept ones)."""

    op: ClassVar[str] = "add-keys"
    keys: list[Key]


@dataclass(frozen=True, kw_only=True, slots=True)
class LongRunningMsg(SendMessageToScheduler):
    """The running task ``key`` seceded; ``None`` duration when restating it."""

    op: ClassVar[str] = "long-running"
    key: Key
    run_id: int
    compute_duration: float | None


@dataclass(frozen=True, kw_only=True, slots=True)
class RescheduleMsg(SendMessageToScheduler):
    """The task ``key`` asked to run elsewhere."""

    op: ClassVar[str] = "reschedule"
    key: Key


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestRefreshWhoHasMsg(SendMessageToScheduler):
    """Where are ``keys`` now? The scheduler answers with ``refresh-who-has``."""

    op: ClassVar[str] = "request-refresh-who-has"
    keys: list[Key]


@dataclass(frozen=True, kw_only=True, slots=True)
class StealResponseMsg(SendMessageToScheduler):
    """The state ``key`` was in when a steal request came (``None``: unknown here)."""

    op: ClassVar[str] = "steal-response"
    key: Key
    state: State | None


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerStatusChangeMsg(SendMessageToScheduler):
    """This worker's status is now ``status``."""

    op: ClassVar[str] = "worker-status-change"
    status: str


@lru_cache(maxsize=512)
def pickled_type(value_type: type) -> bytes:
    """The ``type`` field of ``task-finished``: the client unpickles it for Future.type."""
    try:
        return pickle.dumps(value_type, protocol=5)
    except Exception:
        # Local classes and some extension types do not pickle by reference; the
        # client accepts the type's name instead.
        return pickle.dumps(typename(value_type), protocol=5)


def typename(value_type: type) -> str:
    """``module.Name`` of a type, bare for builtins, as dask's scheduler shows types."""
    module = getattr(value_type, "__module__", None)
    name = getattr(value_type, "__name__", None) or str(value_type)
    return name if not module or module == "builtins" else f"{module}.{name}"
