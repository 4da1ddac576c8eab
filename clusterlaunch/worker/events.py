"""What goes into the worker's state machine and what comes out of it.

The async shell turns everything that happens to the worker into an :class:`Event`
(a message on the scheduler stream, a task that finished in the executor, a transfer
from a peer that completed) and carries out the :class:`Instruction` objects that
:meth:`~clusterlaunch.worker.state.WorkerState.handle` returns. Messages to the
scheduler are instructions too; they live in :mod:`clusterlaunch.worker.messages`.
Like the state machine, this module does no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dask.typing import Key

__all__ = [
    "AcquireReplicas",
    "CancelCompute",
    "CloseRequested",
    "CloseWorker",
    "ComputeTask",
    "DropPeer",
    "Event",
    "Execute",
    "ExecuteFailure",
    "ExecuteSuccess",
    "FindMissing",
    "FreeKeys",
    "GatherDep",
    "GatherDepBusy",
    "GatherDepFailure",
    "GatherDepNetworkFailure",
    "GatherDepSuccess",
    "Instruction",
    "Pause",
    "RefreshWhoHas",
    "RemoveReplicas",
    "RemoveWorker",
    "RescheduleRequested",
    "RetryBusyWorker",
    "RetryBusyWorkerLater",
    "Secede",
    "StealRequest",
    "Unpause",
    "UpdateData",
    "WorkerStatusChange",
    "scheduler_message_to_event",
]


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """Something that happened to the worker. ``stimulus_id`` traces its consequences."""

    stimulus_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ComputeTask(Event):
    """Scheduler ``compute-task``: run ``key`` here, fetching its dependencies."""

    key: Key
    run_id: int
    run_spec: object
    priority: tuple[int, ...]
    who_has: Mapping[Key, Collection[str]] = field(default_factory=dict)
    nbytes: Mapping[Key, int] = field(default_factory=dict)
    resource_restrictions: Mapping[str, float] = field(default_factory=dict)
    actor: bool = False
    annotations: Mapping[str, Any] = field(default_factory=dict)
    span_id: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class FreeKeys(Event):
    """Scheduler ``free-keys``: these keys are no longer needed here."""

    keys: Collection[Key]


@dataclass(frozen=True, kw_only=True, slots=True)
class AcquireReplicas(Event):
    """Scheduler ``acquire-replicas``: fetch copies of these keys from their holders."""

    who_has: Mapping[Key, Collection[str]]
    nbytes: Mapping[Key, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class RemoveReplicas(Event):
    """Scheduler ``remove-replicas``: drop these in-memory copies unless still needed."""

    keys: Collection[Key]


@dataclass(frozen=True, kw_only=True, slots=True)
class StealRequest(Event):
    """Scheduler ``steal-request``: give ``key`` up if it has not started running."""

    key: Key


@dataclass(frozen=True, kw_only=True, slots=True)
class RefreshWhoHas(Event):
    """Scheduler ``refresh-who-has``: up-to-date holders of some keys."""

    who_has: Mapping[Key, Collection[str]]


@dataclass(frozen=True, kw_only=True, slots=True)
class CancelCompute(Event):
    """Scheduler ``cancel-compute``: drop ``key`` if it has not started running."""

    key: Key


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerStatusChange(Event):
    """Scheduler ``worker-status-change``: e.g. ``closing_gracefully`` when retiring."""

    status: str


@dataclass(frozen=True, kw_only=True, slots=True)
class RemoveWorker(Event):
    """Scheduler ``remove-worker``: the peer ``worker`` left the cluster."""

    worker: str


@dataclass(frozen=True, kw_only=True, slots=True)
class CloseRequested(Event):
    """Scheduler ``close``: shut this worker down."""

    reason: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class ExecuteSuccess(Event):
    """The execution started by :class:`Execute` returned ``value``.

    ``nbytes`` is the value's size as the shell measured it (``dask.sizeof``); ``start``
    and ``stop`` bracket the call itself, without executor overhead.
    """

    key: Key
    run_id: int
    value: object
    nbytes: int
    start: float
    stop: float
    thread: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ExecuteFailure(Event):
    """The execution started by :class:`Execute` raised.

    ``exception`` and ``traceback`` are pickled by the shell; they reach the client
    as they are, wrapped as dask's worker wraps them.
    """

    key: Key
    run_id: int
    exception: bytes
    traceback: bytes | None
    exception_text: str
    traceback_text: str
    start: float | None = None
    stop: float | None = None
    thread: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RescheduleRequested(Event):
    """The execution of ``key`` raised dask's ``Reschedule``: run it elsewhere."""

    key: Key
    run_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Secede(Event):
    """The running task ``key`` left its thread slot (``distributed.secede``)."""

    key: Key
    compute_duration: float


@dataclass(frozen=True, kw_only=True, slots=True)
class GatherDepSuccess(Event):
    """The :class:`GatherDep` to ``worker`` answered; ``data`` may lack some keys.
    ``start`` and ``stop`` bracket the request, in the scheduler's time."""

    worker: str
    data: Mapping[Key, object]
    start: float
    stop: float


@dataclass(frozen=True, kw_only=True, slots=True)
class GatherDepBusy(Event):
    """The :class:`GatherDep` to ``worker`` was refused because the peer is busy."""

    worker: str


@dataclass(frozen=True, kw_only=True, slots=True)
class GatherDepNetworkFailure(Event):
    """The :class:`GatherDep` to ``worker`` failed to connect or lost its connection."""

    worker: str


@dataclass(frozen=True, kw_only=True, slots=True)
class GatherDepFailure(Event):
    """The :class:`GatherDep` to ``worker`` failed otherwise (e.g. deserialisation)."""

    worker: str
    exception: bytes
    traceback: bytes | None
    exception_text: str
    traceback_text: str


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryBusyWorker(Event):
    """The delay asked for by :class:`RetryBusyWorkerLater` has passed."""

    worker: str


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateData(Event):
    """Values pushed to this worker (client scatter, ``update_data`` RPC)."""

    data: Mapping[Key, object]
    nbytes: Mapping[Key, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Pause(Event):
    """The memory monitor asks to stop starting tasks and transfers."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Unpause(Event):
    """The memory monitor lifts :class:`Pause`."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FindMissing(Event):
    """Periodic: ask the scheduler again where the missing keys are."""


# --------------------------------------------------------------------- instructions


@dataclass(frozen=True, kw_only=True, slots=True)
class Instruction:
    """Something the shell must do. ``stimulus_id`` names the event that caused it."""

    stimulus_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Execute(Instruction):
    """Run ``run_spec`` and report :class:`ExecuteSuccess`, :class:`ExecuteFailure`,
    :class:`RescheduleRequested` (and possibly :class:`Secede` first) with this
    ``run_id``.

    The dependencies' values are in ``WorkerState.data`` now; the shell must read them
    before it feeds the next event, which may drop them.
    """

    key: Key
    run_id: int
    run_spec: object


@dataclass(frozen=True, kw_only=True, slots=True)
class GatherDep(Instruction):
    """Fetch ``keys`` (highest priority first) from the peer ``worker`` in one request,
    and report :class:`GatherDepSuccess`, :class:`GatherDepBusy`,
    :class:`GatherDepNetworkFailure` or :class:`GatherDepFailure`."""

    worker: str
    keys: tuple[Key, ...]
    total_nbytes: int


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryBusyWorkerLater(Instruction):
    """After a delay, feed :class:`RetryBusyWorker` for ``worker``."""

    worker: str


@dataclass(frozen=True, kw_only=True, slots=True)
class DropPeer(Instruction):
    """Close any pooled connections to the peer ``worker``; it left the cluster."""

    worker: str


@dataclass(frozen=True, kw_only=True, slots=True)
class CloseWorker(Instruction):
    """Shut the worker down, as the scheduler asked."""

    reason: str


# ---------------------------------------------------------- scheduler stream → events


def _who_has(msg: Mapping[str, Any]) -> dict[Key, tuple[str, ...]]:
    return {key: tuple(workers) for key, workers in (msg.get("who_has") or {}).items()}


_EVENT_FROM_MESSAGE: dict[str, Callable[[Mapping[str, Any], str], Event]] = {
    "compute-task": lambda msg, sid: ComputeTask(
        key=msg["key"],
        run_id=msg["run_id"],
        run_spec=msg["run_spec"],
        # msgpack turns tuples into lists; priorities are compared as tuples.
        priority=tuple(msg["priority"]),
        who_has=_who_has(msg),
        nbytes=dict(msg.get("nbytes") or {}),
        resource_restrictions=dict(msg.get("resource_restrictions") or {}),
        actor=bool(msg.get("actor")),
        annotations=dict(msg.get("annotations") or {}),
        span_id=msg.get("span_id"),
        stimulus_id=sid,
    ),
    "free-keys": lambda msg, sid: FreeKeys(keys=tuple(msg["keys"]), stimulus_id=sid),
    "acquire-replicas": lambda msg, sid: AcquireReplicas(
        who_has=_who_has(msg), nbytes=dict(msg.get("nbytes") or {}), stimulus_id=sid
    ),
    "remove-replicas": lambda msg, sid: RemoveReplicas(keys=tuple(msg["keys"]), stimulus_id=sid),
    "steal-request": lambda msg, sid: StealRequest(key=msg["key"], stimulus_id=sid),
    "refresh-who-has": lambda msg, sid: RefreshWhoHas(who_has=_who_has(msg), stimulus_id=sid),
    "cancel-compute": lambda msg, sid: CancelCompute(key=msg["key"], stimulus_id=sid),
    "worker-status-change": lambda msg, sid: WorkerStatusChange(
        status=msg["status"], stimulus_id=sid
    ),
    "remove-worker": lambda msg, sid: RemoveWorker(worker=msg["worker"], stimulus_id=sid),
    "close": lambda msg, sid: CloseRequested(reason=msg.get("reason") or "", stimulus_id=sid),
}


def scheduler_message_to_event(msg: Mapping[str, Any]) -> Event:
    """Turn one message of the scheduler's worker stream into the matching event.

    Raises ``ValueError`` for an unknown ``op`` or a message lacking a required field.
    """
    op = msg.get("op")
    try:
        build = _EVENT_FROM_MESSAGE[op]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(f"unknown operation on the scheduler stream: {op!r}") from None
    # "close" carries no stimulus_id.
    stimulus_id = msg.get("stimulus_id") or f"{op}-from-scheduler"
    try:
        return build(msg, stimulus_id)
    except KeyError as missing:
        raise ValueError(f"{op!r} message lacks the field {missing.args[0]!r}") from None
