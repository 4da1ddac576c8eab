"""Sans-io state machine of a worker: events in, instructions out.

The async shell turns everything that happens to the worker into an :class:`Event`
(a message on the scheduler stream, a task that finished in the executor, a transfer
from a peer that completed), feeds it to :meth:`WorkerState.handle` and carries out
the :class:`Instruction` objects it gets back (run a task, fetch keys from a peer,
send a message to the scheduler, ...); events and instructions are in
:mod:`clusterlaunch.worker.events`, messages to the scheduler in
:mod:`clusterlaunch.worker.messages`. Nothing here touches a socket, a thread or a
clock (the shell passes the time to :meth:`WorkerState.handle`), so every behaviour
is a plain function of the events fed in.

Task states mirror those of dask's worker, because the scheduler's messages assume them.
A task this worker computes goes ``released -> waiting -> ready (or constrained, when
it waits for abstract resources) -> executing -> memory | error``; a running task may
secede (``long-running``) or ask to be rescheduled (``rescheduled``, then released).
A dependency fetched from peers goes ``released -> fetch -> flight -> memory``, or
``missing`` when no peer is known to hold it. An actor task (``actor=True``) runs
like any other; its value, the instance this worker then hosts, is kept in ``actors``
rather than ``data``, as dask's worker keeps it. Running work (an execution or a
transfer) cannot be stopped: when the scheduler drops such a task it becomes
``cancelled`` until the work ends and its outcome is discarded; if the scheduler wants
the task back meanwhile, in the other role (fetch what we are computing, or compute
what we are fetching), it becomes ``resumed``. Tasks nobody needs are ``forgotten``.
The task, its states and :data:`TRANSITIONS`, every move a task may make, are in
:mod:`clusterlaunch.worker.tasks`; the rules :meth:`WorkerState.validate` checks are in
:mod:`clusterlaunch.worker.invariants`.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping
from operator import attrgetter
from typing import TYPE_CHECKING, Any, ClassVar

from clusterlaunch.worker.events import (
    AcquireReplicas,
    CancelCompute,
    CloseRequested,
    CloseWorker,
    ComputeTask,
    DropPeer,
    Event,
    Execute,
    ExecuteFailure,
    ExecuteSuccess,
    FindMissing,
    FreeKeys,
    GatherDep,
    GatherDepBusy,
    GatherDepFailure,
    GatherDepNetworkFailure,
    GatherDepSuccess,
    Instruction,
    Pause,
    RefreshWhoHas,
    RemoveReplicas,
    RemoveWorker,
    RescheduleRequested,
    RetryBusyWorker,
    RetryBusyWorkerLater,
    Secede,
    StealRequest,
    Unpause,
    UpdateData,
    WorkerStatusChange,
    scheduler_message_to_event,
)
from clusterlaunch.worker.invariants import InvariantViolation, check_invariants
from clusterlaunch.worker.messages import (
    AddKeysMsg,
    LongRunningMsg,
    ReleaseWorkerDataMsg,
    RequestRefreshWhoHasMsg,
    RescheduleMsg,
    SendMessageToScheduler,
    StealResponseMsg,
    TaskErredMsg,
    TaskFinishedMsg,
    WorkerStatusChangeMsg,
    pickled_type,
    typename,
)
from clusterlaunch.worker.priority_queue import PriorityQueue
from clusterlaunch.worker.tasks import (
    DEFAULT_NBYTES,
    NO_RUN_ID,
    TRANSITIONS,
    InvalidTransition,
    State,
    StoryEntry,
    TaskState,
)

if TYPE_CHECKING:
    # Only for annotations: importing dask costs a worker a third of its start-up,
    # and a worker that never gets a task needs none of it.
    from dask.typing import Key

__all__ = [
    "DEFAULT_NBYTES",
    "NO_RUN_ID",
    "TRANSITIONS",
    "AcquireReplicas",
    "AddKeysMsg",
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
    "InvalidTransition",
    "InvariantViolation",
    "LongRunningMsg",
    "Pause",
    "RefreshWhoHas",
    "ReleaseWorkerDataMsg",
    "RemoveReplicas",
    "RemoveWorker",
    "RequestRefreshWhoHasMsg",
    "RescheduleMsg",
    "RescheduleRequested",
    "RetryBusyWorker",
    "RetryBusyWorkerLater",
    "Secede",
    "SendMessageToScheduler",
    "State",
    "StealRequest",
    "StealResponseMsg",
    "TaskErredMsg",
    "TaskFinishedMsg",
    "TaskState",
    "Unpause",
    "UpdateData",
    "WorkerState",
    "WorkerStatusChange",
    "WorkerStatusChangeMsg",
    "scheduler_message_to_event",
    "typename",
]

#: States of a dependency that may be dropped once no local task waits for it.
_RELEASABLE_DEPENDENCY: frozenset[State] = frozenset(
    {"fetch", "flight", "missing", "error", "resumed"}
)

#: States in which a task will still read its dependencies' values from ``data``.
_NEEDS_DEPENDENCIES: frozenset[State] = frozenset({"waiting", "ready", "constrained"})

#: Statuses the scheduler may set with ``worker-status-change``.
_SCHEDULER_SETTABLE_STATUSES = frozenset({"running", "paused", "closing_gracefully"})


def _keys_in_creation_order(tasks: Iterable[TaskState]) -> list[Key]:
    return [ts.key for ts in sorted(tasks, key=attrgetter("serial"))]


# -------------------------------------------------------------------- state machine


class WorkerState:
    """All task bookkeeping of one worker. Mutate it only through :meth:`handle`.

    ``data`` is the in-memory store (key -> value), shared by reference with the
    shell, which serves peers' ``get_data`` from it; only this class writes to it.
    """

    def __init__(
        self,
        *,
        address: str,
        nthreads: int = 1,
        resources: Mapping[str, float] | None = None,
        data: MutableMapping[Key, object] | None = None,
        transfer_message_bytes_limit: float = 50e6,
        transfer_incoming_count_limit: int = 50,
        transfer_incoming_bytes_limit: float = math.inf,
        log_length: int = 10_000,
        validate: bool = False,
    ) -> None:
        self.address = address
        self.nthreads = nthreads
        self.total_resources: dict[str, float] = dict(resources or {})
        self.available_resources: dict[str, float] = dict(self.total_resources)
        self.data: MutableMapping[Key, object] = {} if data is None else data
        #: The actors this worker hosts (``submit(..., actor=True)``): an actor task in
        #: memory keeps its instance here, not in ``data``, as dask's worker does.
        self.actors: dict[Key, object] = {}
        #: Called with (key, start, finish) after each change of a task's state (the
        #: shell's worker plugins watch so); ``None``, the common case, costs one check.
        self.on_transition: Callable[[Key, State, State], None] | None = None
        #: Bytes one GatherDep should ask for, unless its first key alone is larger.
        self.transfer_message_bytes_limit = transfer_message_bytes_limit
        #: Concurrent GatherDep requests.
        self.transfer_incoming_count_limit = transfer_incoming_count_limit
        #: Bytes of all concurrent GatherDep requests together.
        self.transfer_incoming_bytes_limit = transfer_incoming_bytes_limit

        self.status = "running"
        self.tasks: dict[Key, TaskState] = {}
        self.ready: PriorityQueue[TaskState] = PriorityQueue()
        self.constrained: PriorityQueue[TaskState] = PriorityQueue()
        #: Tasks occupying one of the ``nthreads`` slots (executing, or a cancelled or
        #: resumed task whose execution still runs).
        self.executing: set[TaskState] = set()
        #: Running tasks that seceded: they no longer hold a slot.
        self.long_running: set[TaskState] = set()
        #: peer -> tasks in ``fetch`` that the peer holds.
        self.data_needed: dict[str, PriorityQueue[TaskState]] = {}
        #: peer -> keys we care about that it holds.
        self.has_what: dict[str, set[Key]] = {}
        #: peer -> the transfer outstanding from it (at most one per peer).
        self.in_flight_workers: dict[str, GatherDep] = {}
        self.in_flight_tasks: set[TaskState] = set()
        self.transfer_incoming_bytes = 0
        self.busy_workers: set[str] = set()
        self.missing: set[TaskState] = set()
        #: Total size of the values in ``data``.
        self.nbytes = 0
        self.executed_count = 0
        #: Transitions: (key, from state, to state, stimulus_id).
        self.log: deque[StoryEntry] = deque(maxlen=log_length)
        #: Check the invariants after every event (a debug aid: it is O(tasks)).
        self.validate_each_event = validate

        # Each compute-task gets a lower number, so among tasks of equal scheduler
        # priority the most recently assigned runs first (depth-first, like dask).
        self._generation = 0
        self._stimulus_id = ""
        self._now: float | None = None
        self._instructions: list[Instruction] = []
        self._recommendations: dict[TaskState, Callable[[TaskState], None]] = {}
        # Keys to announce in one message at the end of the current event.
        self._add_keys_batch: dict[TaskState, None] = {}
        self._refresh_batch: dict[TaskState, None] = {}

    # ------------------------------------------------------------------ public API

    @property
    def running(self) -> bool:
        """Whether new executions and transfers may start."""
        return self.status == "running"

    def handle(self, *events: Event, now: float | None = None) -> list[Instruction]:
        """Apply events in order; return what the shell must do as a consequence.

        ``now`` is the shell's clock as it hands over the events: executions these
        events start are timed from it (see :meth:`executing_durations`).
        """
        instructions: list[Instruction] = []
        self._instructions = instructions
        self._now = now
        for event in events:
            try:
                handler = self._HANDLERS[type(event)]
            except KeyError:
                raise TypeError(f"not a worker state event: {event!r}") from None
            self._stimulus_id = event.stimulus_id
            handler(self, event)
            self._settle()
            if self.validate_each_event:
                self.validate()
        return instructions

    def validate(self) -> None:
        """Check the bookkeeping; raise :class:`InvariantViolation` naming what broke."""
        check_invariants(self)

    def executing_durations(self, now: float) -> dict[Key, float]:
        """How long each running execution has run (seconds by the clock of ``handle``),
        as the heartbeat reports it; executions of unknown start are left out."""
        return {
            ts.key: now - ts.execution_started
            for ts in (*self.executing, *self.long_running)
            if ts.execution_started is not None
        }

    def summary(self) -> dict[str, int]:
        """Number of tasks in each state."""
        return dict(sorted(Counter(ts.state for ts in self.tasks.values()).items()))

    def story(self, key: Key) -> list[StoryEntry]:
        """The logged transitions of ``key``, oldest first."""
        return [entry for entry in self.log if entry[0] == key]

    def __repr__(self) -> str:
        counts = ", ".join(f"{state}: {n}" for state, n in self.summary().items())
        return (
            f"<WorkerState {self.address} {self.status}, "
            f"{len(self.executing)}/{self.nthreads} threads busy, {counts or 'no tasks'}>"
        )

    # ------------------------------------------------------------ event handlers

    def _on_compute_task(self, ev: ComputeTask) -> None:
        ts = self._ensure_task(ev.key)
        ts.run_id = ev.run_id
        if ts.state == "memory":
            self._send_task_finished(ts, ev.run_id)
            return
        if ts.state in ("waiting", "ready", "constrained", "executing", "long-running"):
            return
        ts.run_spec = ev.run_spec
        ts.priority = (*ev.priority, self._generation)
        self._generation -= 1
        ts.actor = ev.actor
        ts.annotations = dict(ev.annotations)
        ts.span_id = ev.span_id
        # Non-positive amounts mean no restriction; dropping them keeps the accounting
        # of available resources within [0, total].
        ts.resource_restrictions = {
            name: amount for name, amount in ev.resource_restrictions.items() if amount > 0
        }
        self._set_dependencies(ts, dict.fromkeys([*ev.who_has, *ev.nbytes]), ev.nbytes)
        self._update_who_has(ev.who_has)
        self._recommend(ts, self._compute)

    def _on_free_keys(self, ev: FreeKeys) -> None:
        for key in ev.keys:
            ts = self.tasks.get(key)
            if ts is not None:
                self._recommend(ts, self._release)

    def _on_acquire_replicas(self, ev: AcquireReplicas) -> None:
        for key in dict.fromkeys([*ev.who_has, *ev.nbytes]):
            # After the dependencies of ordinary computations (priority (0, ...)),
            # before those of low-priority ones.
            ts = self._ensure_task(key, priority=(1,))
            if ts.state != "memory" and ev.nbytes.get(key) is not None:
                ts.nbytes = ev.nbytes[key]
            self._recommend(ts, self._fetch)
        self._update_who_has(ev.who_has)

    def _on_remove_replicas(self, ev: RemoveReplicas) -> None:
        still_needed = []
        for key in ev.keys:
            ts = self.tasks.get(key)
            if ts is None or ts.state != "memory":
                continue
            if any(dep.state in _NEEDS_DEPENDENCIES for dep in ts.dependents):
                still_needed.append(key)
            else:
                self._recommend(ts, self._release)
        if still_needed:
            # The scheduler already struck us from who_has; this reinstates us.
            self._emit(AddKeysMsg(keys=still_needed, stimulus_id=self._stimulus_id))

    def _on_steal_request(self, ev: StealRequest) -> None:
        ts = self.tasks.get(ev.key)
        state = None if ts is None else ts.state
        self._emit(StealResponseMsg(key=ev.key, state=state, stimulus_id=self._stimulus_id))
        if ts is not None and state in ("waiting", "ready", "constrained"):
            self._recommend(ts, self._release)

    def _on_cancel_compute(self, ev: CancelCompute) -> None:
        ts = self.tasks.get(ev.key)
        if ts is not None and ts.state in ("waiting", "ready", "constrained"):
            self._recommend(ts, self._release)

    def _on_refresh_who_has(self, ev: RefreshWhoHas) -> None:
        self._update_who_has(ev.who_has)

    def _on_worker_status_change(self, ev: WorkerStatusChange) -> None:
        if ev.status in _SCHEDULER_SETTABLE_STATUSES and self.status != "closing":
            self.status = ev.status
        # Confirm, or restate our status if the change was refused, as dask's worker does.
        self._send_status()

    def _on_pause(self, ev: Pause) -> None:
        if self.status == "running":
            self.status = "paused"
            self._send_status()

    def _on_unpause(self, ev: Unpause) -> None:
        if self.status == "paused":
            self.status = "running"
            self._send_status()

    def _on_remove_worker(self, ev: RemoveWorker) -> None:
        self._forget_peer(ev.worker)
        self._emit(DropPeer(worker=ev.worker, stimulus_id=self._stimulus_id))

    def _on_close_requested(self, ev: CloseRequested) -> None:
        # Nothing new starts while the shell shuts down; the shell reports the status.
        self.status = "closing"
        self._emit(CloseWorker(reason=ev.reason, stimulus_id=self._stimulus_id))

    def _on_find_missing(self, ev: FindMissing) -> None:
        if self.missing:
            self._emit(
                RequestRefreshWhoHasMsg(
                    keys=_keys_in_creation_order(self.missing), stimulus_id=self._stimulus_id
                )
            )

    def _on_update_data(self, ev: UpdateData) -> None:
        for key, value in ev.data.items():
            ts = self._ensure_task(key)
            if self._is_running(ts):
                # The running execution or transfer will deliver this key's value.
                continue
            nbytes = ev.nbytes.get(key, DEFAULT_NBYTES)
            if ts.state == "memory":
                self.nbytes += nbytes - ts.get_nbytes()
                ts.nbytes = nbytes
                # A scattered value replaces a hosted actor, in place and unannounced.
                self.actors.pop(key, None)
                self.data[key] = value
                ts.value_type = type(value)
                continue
            self._release(ts)
            ts.nbytes = nbytes
            # No message: the scheduler learns of scattered keys from the client.
            self._to_memory(ts, value, report=None, run_id=NO_RUN_ID)

    def _on_execute_success(self, ev: ExecuteSuccess) -> None:
        ts = self._finish_execution(ev.key)
        if ts is None:
            return
        if ts.state == "cancelled":
            self._release(ts)
            return
        ts.nbytes = ev.nbytes
        ts.thread = ev.thread
        if ts.state == "resumed":
            # The scheduler meanwhile placed this key on another worker and asked us to
            # fetch it: announce a replica rather than a finished task.
            ts.previous = ts.next = None
            self._to_memory(ts, ev.value, report="add-keys", run_id=ev.run_id, actor=ts.actor)
            return
        ts.startstops.append({"action": "compute", "start": ev.start, "stop": ev.stop})
        self._to_memory(ts, ev.value, report="task-finished", run_id=ev.run_id, actor=ts.actor)

    def _on_execute_failure(self, ev: ExecuteFailure) -> None:
        ts = self._finish_execution(ev.key)
        if ts is None:
            return
        if ts.state == "cancelled":
            self._release(ts)
        elif ts.state == "resumed":
            ts.previous = ts.next = None
            self._enter_fetch(ts)
        else:
            ts.thread = ev.thread
            if ev.start is not None and ev.stop is not None:
                ts.startstops.append({"action": "compute", "start": ev.start, "stop": ev.stop})
            self._to_error(ts, ev, run_id=ev.run_id)

    def _on_reschedule_requested(self, ev: RescheduleRequested) -> None:
        ts = self._finish_execution(ev.key)
        if ts is None:
            return
        if ts.state == "cancelled":
            self._release(ts)
        elif ts.state == "resumed":
            ts.previous = ts.next = None
            self._enter_fetch(ts)
        else:
            self._emit(RescheduleMsg(key=ts.key, stimulus_id=self._stimulus_id))
            self._set_state(ts, "rescheduled")
            self._release(ts)

    def _on_secede(self, ev: Secede) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None or ts not in self.executing:
            return
        self.executing.discard(ts)
        self.long_running.add(ts)
        if ts.state == "executing":
            self._set_state(ts, "long-running")
            self._emit(
                LongRunningMsg(
                    key=ts.key,
                    run_id=ts.run_id,
                    compute_duration=ev.compute_duration,
                    stimulus_id=self._stimulus_id,
                )
            )
        else:
            # Cancelled or resumed: the scheduler does not expect this run to report.
            ts.previous = "long-running"

    def _on_gather_dep_success(self, ev: GatherDepSuccess) -> None:
        transferred = self._finish_transfer(ev.worker)
        arrived = [ts for ts in transferred if ts.key in ev.data]
        if arrived:
            # As dask's worker does, the transfer shows in the task stream as part of
            # one task that needed it: the first to run of their dependents, if any
            # (else the first of the keys).
            dependents = [dep for ts in arrived for dep in ts.dependents]
            cause = min(dependents or arrived, key=attrgetter("priority", "serial"))
            cause.startstops.append(
                {"action": "transfer", "start": ev.start, "stop": ev.stop, "source": ev.worker}
            )
        for ts in transferred:
            if ts.key not in ev.data:
                # The peer no longer holds it: try the others.
                self._unlink_holder(ev.worker, ts)
                self._transfer_failed(ts, self._enter_fetch)
            elif ts.state == "cancelled":
                self._release(ts)
            elif ts.state == "resumed":
                # We were asked to compute this key while it was coming: it is done.
                ts.previous = ts.next = None
                self._to_memory(ts, ev.data[ts.key], report="task-finished", run_id=ts.run_id)
            else:
                self._to_memory(ts, ev.data[ts.key], report="add-keys", run_id=NO_RUN_ID)

    def _on_gather_dep_busy(self, ev: GatherDepBusy) -> None:
        self.busy_workers.add(ev.worker)
        for ts in self._finish_transfer(ev.worker):
            self._transfer_failed(ts, self._enter_fetch)
            if ts.state == "fetch" and ts.who_has <= self.busy_workers:
                # Every known holder is busy: maybe the scheduler knows others.
                self._refresh_batch[ts] = None
        self._emit(RetryBusyWorkerLater(worker=ev.worker, stimulus_id=self._stimulus_id))

    def _on_gather_dep_network_failure(self, ev: GatherDepNetworkFailure) -> None:
        in_flight = self._finish_transfer(ev.worker)
        # Assume the peer is gone, for every key we expected from it, not just these.
        self._forget_peer(ev.worker)
        for ts in in_flight:
            self._transfer_failed(ts, self._enter_fetch)

    def _on_gather_dep_failure(self, ev: GatherDepFailure) -> None:
        for ts in self._finish_transfer(ev.worker):
            self._transfer_failed(ts, lambda ts: self._fetch_failed(ts, ev))

    def _fetch_failed(self, ts: TaskState, failure: GatherDepFailure) -> None:
        """The value of ``ts`` came but can't be had (it did not decode, say): ``ts``
        and the local tasks waiting for it fail with that error. dask's worker lets
        those wait, and the scheduler, which sees them processing here, waits with
        them for ever."""
        self._to_error(ts, failure, run_id=ts.run_id)
        for dependent in list(ts.waiters):
            if dependent.state != "waiting":
                continue
            for dep in dependent.waiting_for_data:
                dep.waiters.discard(dependent)
            dependent.waiting_for_data.clear()
            self._to_error(dependent, failure, run_id=dependent.run_id)

    def _on_retry_busy_worker(self, ev: RetryBusyWorker) -> None:
        self.busy_workers.discard(ev.worker)

    _HANDLERS: ClassVar[dict[type[Event], Callable[[WorkerState, Any], None]]] = {
        ComputeTask: _on_compute_task,
        FreeKeys: _on_free_keys,
        AcquireReplicas: _on_acquire_replicas,
        RemoveReplicas: _on_remove_replicas,
        StealRequest: _on_steal_request,
        CancelCompute: _on_cancel_compute,
        RefreshWhoHas: _on_refresh_who_has,
        WorkerStatusChange: _on_worker_status_change,
        Pause: _on_pause,
        Unpause: _on_unpause,
        RemoveWorker: _on_remove_worker,
        CloseRequested: _on_close_requested,
        FindMissing: _on_find_missing,
        UpdateData: _on_update_data,
        ExecuteSuccess: _on_execute_success,
        ExecuteFailure: _on_execute_failure,
        RescheduleRequested: _on_reschedule_requested,
        Secede: _on_secede,
        GatherDepSuccess: _on_gather_dep_success,
        GatherDepBusy: _on_gather_dep_busy,
        GatherDepNetworkFailure: _on_gather_dep_network_failure,
        GatherDepFailure: _on_gather_dep_failure,
        RetryBusyWorker: _on_retry_busy_worker,
    }

    # ------------------------------------------------------------------- settling

    def _recommend(self, ts: TaskState, transition: Callable[[TaskState], None]) -> None:
        """Queue a transition for later in this event; the latest one for a task wins.

        Transitions check the state they find, so one made stale by others is harmless.
        """
        self._recommendations[ts] = transition

    def _settle(self) -> None:
        while self._recommendations:
            ts = next(iter(self._recommendations))
            self._recommendations.pop(ts)(ts)
        # Only now, with every task in its final state, fill thread slots and transfer
        # capacity, so that one GatherDep carries all the keys a peer can give.
        self._flush_batches()
        self._start_executions()
        self._start_gathers()

    def _flush_batches(self) -> None:
        keys = _keys_in_creation_order(ts for ts in self._add_keys_batch if ts.state == "memory")
        self._add_keys_batch.clear()
        if keys:
            self._emit(AddKeysMsg(keys=keys, stimulus_id=self._stimulus_id))
        keys = _keys_in_creation_order(
            ts for ts in self._refresh_batch if ts.state in ("fetch", "missing")
        )
        self._refresh_batch.clear()
        if keys:
            self._emit(RequestRefreshWhoHasMsg(keys=keys, stimulus_id=self._stimulus_id))

    def _emit(self, instruction: Instruction) -> None:
        self._instructions.append(instruction)

    def _send_status(self) -> None:
        self._emit(WorkerStatusChangeMsg(status=self.status, stimulus_id=self._stimulus_id))

    def _set_state(self, ts: TaskState, state: State) -> None:
        if state not in TRANSITIONS[ts.state]:
            raise InvalidTransition(ts.key, ts.state, state, self.story(ts.key))
        start = ts.state
        self.log.append((ts.key, start, state, self._stimulus_id))
        ts.state = state
        if self.on_transition is not None:
            self.on_transition(ts.key, start, state)

    # ---------------------------------------------------------------- executions

    def _start_executions(self) -> None:
        while self.running and len(self.executing) < self.nthreads:
            ts = self._next_runnable()
            if ts is None:
                return
            ts.held_resources = dict(ts.resource_restrictions)
            for name, amount in ts.held_resources.items():
                self.available_resources[name] -= amount
            ts.execution_started = self._now
            self.executing.add(ts)
            self._set_state(ts, "executing")
            self._emit(
                Execute(
                    key=ts.key,
                    run_id=ts.run_id,
                    run_spec=ts.run_spec,
                    stimulus_id=self._stimulus_id,
                )
            )

    def _next_runnable(self) -> TaskState | None:
        """The highest-priority ready task, or constrained task whose resources are free.

        Only the first constrained task is considered, so that a task waiting for
        resources is not overtaken by lower-priority ones needing fewer.
        """
        ready = self.ready.peek()
        constrained = self.constrained.peek()
        if constrained is not None and not self._resources_available(constrained):
            constrained = None
        if constrained is None:
            return None if ready is None else self.ready.pop()
        if ready is not None and ready.priority <= constrained.priority:
            return self.ready.pop()
        return self.constrained.pop()

    def _resources_available(self, ts: TaskState) -> bool:
        return all(
            self.available_resources.get(name, 0) >= amount
            for name, amount in ts.resource_restrictions.items()
        )

    def _finish_execution(self, key: Key) -> TaskState | None:
        """Free the slot and resources of the execution of ``key``, if one runs."""
        ts = self.tasks.get(key)
        if ts is None or (ts not in self.executing and ts not in self.long_running):
            return None
        self.executing.discard(ts)
        self.long_running.discard(ts)
        for name, amount in ts.held_resources.items():
            self.available_resources[name] += amount
        ts.held_resources = {}
        ts.execution_started = None
        self.executed_count += 1
        return ts

    # ----------------------------------------------------------------- transfers

    def _start_gathers(self) -> None:
        if not self.running:
            return
        candidates = []
        for worker, queue in list(self.data_needed.items()):
            top = queue.peek()
            if top is None:
                del self.data_needed[worker]
            elif worker not in self.in_flight_workers and worker not in self.busy_workers:
                candidates.append((top.priority, -len(queue), worker))
        # Peers holding the most urgent key first; among equals, those holding most.
        heapq.heapify(candidates)
        while candidates and not self._incoming_transfers_saturated():
            rank = heapq.heappop(candidates)
            worker = rank[2]
            queue = self.data_needed[worker]
            top = queue.peek()
            if top is None:
                del self.data_needed[worker]
                continue
            current_rank = (top.priority, -len(queue), worker)
            if current_rank != rank:
                # An earlier batch took some of this peer's keys: rank it anew.
                heapq.heappush(candidates, current_rank)
                continue
            batch, nbytes = self._take_batch(queue)
            if not batch:
                return
            self._gather_from(worker, batch, nbytes)
            if not queue:
                del self.data_needed[worker]

    def _incoming_transfers_saturated(self) -> bool:
        return (
            len(self.in_flight_workers) >= self.transfer_incoming_count_limit
            or self.transfer_incoming_bytes >= self.transfer_incoming_bytes_limit
        )

    def _take_batch(self, queue: PriorityQueue[TaskState]) -> tuple[list[TaskState], int]:
        """Pop from ``queue``, in priority order, the tasks that fit in one request."""
        batch: list[TaskState] = []
        nbytes = 0
        while (ts := queue.peek()) is not None:
            size = ts.get_nbytes()
            if not self._transfer_has_room(size, nbytes):
                break
            queue.discard(ts)
            for holder in ts.who_has:
                holder_queue = self.data_needed.get(holder)
                if holder_queue is not None:
                    holder_queue.discard(ts)
            batch.append(ts)
            nbytes += size
        return batch, nbytes

    def _transfer_has_room(self, size: int, message_nbytes: int) -> bool:
        if message_nbytes == 0 and self.transfer_incoming_bytes == 0:
            # Alone on the wire, a key goes however large it is, so progress is certain.
            return True
        room = self.transfer_incoming_bytes_limit - self.transfer_incoming_bytes - message_nbytes
        if message_nbytes:
            room = min(room, self.transfer_message_bytes_limit - message_nbytes)
        return size <= room

    def _gather_from(self, worker: str, batch: list[TaskState], nbytes: int) -> None:
        for ts in batch:
            ts.coming_from = worker
            self.in_flight_tasks.add(ts)
            self._set_state(ts, "flight")
        gather = GatherDep(
            worker=worker,
            keys=tuple(ts.key for ts in batch),
            total_nbytes=nbytes,
            stimulus_id=self._stimulus_id,
        )
        self.in_flight_workers[worker] = gather
        self.transfer_incoming_bytes += nbytes
        self._emit(gather)

    def _finish_transfer(self, worker: str) -> list[TaskState]:
        """Close the transfer outstanding from ``worker``; return the tasks it carried."""
        gather = self.in_flight_workers.pop(worker, None)
        if gather is None:
            return []
        self.transfer_incoming_bytes -= gather.total_nbytes
        carried = []
        for key in gather.keys:
            ts = self.tasks.get(key)
            if ts is not None and ts in self.in_flight_tasks:
                self.in_flight_tasks.discard(ts)
                ts.coming_from = None
                carried.append(ts)
        return carried

    def _transfer_failed(self, ts: TaskState, when_flight: Callable[[TaskState], None]) -> None:
        """A transfer ended without the task's value; ``when_flight`` handles the
        ordinary case."""
        if ts.state == "cancelled":
            self._release(ts)
        elif ts.state == "resumed":
            # The scheduler asked us to compute it meanwhile: do so.
            ts.previous = ts.next = None
            self._enter_waiting(ts)
        else:
            when_flight(ts)

    # ------------------------------------------------------------- who has what

    def _update_who_has(self, who_has: Mapping[Key, Collection[str]]) -> None:
        for key, workers in who_has.items():
            ts = self.tasks.get(key)
            if ts is None:
                continue
            holders = set(workers)
            holders.discard(self.address)
            for worker in ts.who_has - holders:
                self._unlink_holder(worker, ts)
            for worker in holders - ts.who_has:
                self.has_what.setdefault(worker, set()).add(key)
                if ts.state == "fetch":
                    self.data_needed.setdefault(worker, PriorityQueue()).add(ts)
            ts.who_has = holders
            if ts.state == "missing" and holders:
                self.missing.discard(ts)
                self._enter_fetch(ts)
            elif ts.state == "fetch" and not holders:
                self._enter_missing(ts)

    def _unlink_holder(self, worker: str, ts: TaskState) -> None:
        """Stop believing that ``worker`` holds ``ts``."""
        ts.who_has.discard(worker)
        keys = self.has_what.get(worker)
        if keys is not None:
            keys.discard(ts.key)
            if not keys:
                del self.has_what[worker]
        queue = self.data_needed.get(worker)
        if queue is not None:
            queue.discard(ts)

    def _forget_peer(self, worker: str) -> None:
        self.data_needed.pop(worker, None)
        self.busy_workers.discard(worker)
        for key in self.has_what.pop(worker, ()):
            ts = self.tasks.get(key)
            if ts is None:
                continue
            ts.who_has.discard(worker)
            if ts.state == "fetch" and not ts.who_has:
                self._enter_missing(ts)

    # --------------------------------------------------------------- transitions

    def _ensure_task(self, key: Key, priority: tuple[int, ...] = ()) -> TaskState:
        ts = self.tasks.get(key)
        if ts is None:
            ts = self.tasks[key] = TaskState(key)
        if not ts.priority:
            ts.priority = priority
        return ts

    def _set_dependencies(
        self, ts: TaskState, keys: Mapping[Key, None], nbytes: Mapping[Key, int]
    ) -> None:
        """Link ``ts`` to exactly these dependencies (a new run_spec may change them)."""
        dependencies = set()
        for key in keys:
            if key == ts.key:
                continue
            dep = self._ensure_task(key, priority=ts.priority)
            if dep.state != "memory" and nbytes.get(key) is not None:
                dep.nbytes = nbytes[key]
            dependencies.add(dep)
        for dep in ts.dependencies - dependencies:
            dep.dependents.discard(ts)
            dep.waiters.discard(ts)
            ts.waiting_for_data.discard(dep)
            if dep.state == "released" and not dep.dependents:
                self._recommend(dep, self._forget)
            elif not dep.waiters and dep.state in _RELEASABLE_DEPENDENCY:
                self._recommend(dep, self._release)
        for dep in dependencies - ts.dependencies:
            dep.dependents.add(ts)
        ts.dependencies = dependencies

    def _is_running(self, ts: TaskState) -> bool:
        """Whether an execution or a transfer of ``ts`` is under way."""
        return ts in self.executing or ts in self.long_running or ts in self.in_flight_tasks

    def _compute(self, ts: TaskState) -> None:
        """Make ``ts`` computed here (the target of compute-task)."""
        match ts.state:
            case "released":
                self._enter_waiting(ts)
            case "cancelled" | "resumed" if ts.previous == "flight":
                # Let the transfer finish: its value will do; if it fails, compute.
                ts.next = "waiting"
                self._set_state(ts, "resumed")
            case "cancelled" | "resumed":
                # Its execution still runs: adopt it again.
                running_as = ts.previous
                assert running_as in ("executing", "long-running"), ts
                ts.previous = ts.next = None
                self._set_state(ts, running_as)
                if running_as == "long-running":
                    # The scheduler forgot the secession when it dropped the task.
                    self._emit(
                        LongRunningMsg(
                            key=ts.key,
                            run_id=ts.run_id,
                            compute_duration=None,
                            stimulus_id=self._stimulus_id,
                        )
                    )
            case "fetch" | "missing" | "error" | "flight":
                self._release(ts)
                self._compute(ts)
            case "waiting" | "ready" | "constrained" | "executing" | "long-running" | "memory":
                pass  # computed here already, or on the way
            case "rescheduled" | "forgotten":
                # Passed through within one transition: no recommendation finds them.
                raise InvalidTransition(ts.key, ts.state, "waiting", self.story(ts.key))

    def _enter_waiting(self, ts: TaskState) -> None:
        self._set_state(ts, "waiting")
        ts.waiting_for_data = {dep for dep in ts.dependencies if dep.state != "memory"}
        for dep in ts.waiting_for_data:
            dep.waiters.add(ts)
            self._recommend(dep, self._fetch)
        if not ts.waiting_for_data:
            self._recommend(ts, self._make_ready)

    def _make_ready(self, ts: TaskState) -> None:
        if ts.state != "waiting" or ts.waiting_for_data:
            return
        if ts.resource_restrictions:
            self._set_state(ts, "constrained")
            self.constrained.add(ts)
        else:
            self._set_state(ts, "ready")
            self.ready.add(ts)

    def _fetch(self, ts: TaskState) -> None:
        """Make ``ts`` come from a peer (the target for dependencies and replicas)."""
        match ts.state:
            case "memory" | "fetch" | "flight" | "missing" | "forgotten":
                pass  # new holders move a missing task to fetch in _update_who_has
            case "released":
                self._enter_fetch(ts)
            case "cancelled" | "resumed" if ts.previous == "flight":
                # The transfer under way is exactly what is wanted again.
                ts.previous = ts.next = None
                self._set_state(ts, "flight")
            case "cancelled":
                # Let the execution finish: its value will do; if it fails, fetch.
                ts.next = "fetch"
                self._set_state(ts, "resumed")
            case "resumed":
                pass  # already resumed towards fetch
            case "waiting" | "ready" | "constrained" | "error" | "executing" | "long-running":
                # Drop the local run, or cancel the running execution (and resume it
                # towards fetch). Releasing forgets the holders, which are needed again
                # right away.
                holders = set(ts.who_has)
                self._release(ts)
                self._update_who_has({ts.key: holders})
                self._fetch(ts)
            case "rescheduled":
                # Passed through within one transition: no recommendation finds it.
                raise InvalidTransition(ts.key, ts.state, "fetch", self.story(ts.key))

    def _enter_fetch(self, ts: TaskState) -> None:
        if not ts.who_has:
            self._enter_missing(ts)
            return
        self._set_state(ts, "fetch")
        for worker in ts.who_has:
            self.data_needed.setdefault(worker, PriorityQueue()).add(ts)

    def _enter_missing(self, ts: TaskState) -> None:
        self._set_state(ts, "missing")
        self.missing.add(ts)
        self._refresh_batch[ts] = None

    def _to_memory(
        self, ts: TaskState, value: object, *, report: str | None, run_id: int, actor: bool = False
    ) -> None:
        """Store the value of ``ts`` (in ``actors`` if it is an actor computed here);
        ``report`` names the message telling the scheduler."""
        if actor:
            self.actors[ts.key] = value
        else:
            self.data[ts.key] = value
        if ts.nbytes is None:
            ts.nbytes = DEFAULT_NBYTES
        self.nbytes += ts.nbytes
        ts.value_type = type(value)
        self._set_state(ts, "memory")
        for dependent in ts.waiters:
            dependent.waiting_for_data.discard(ts)
            if not dependent.waiting_for_data:
                self._recommend(dependent, self._make_ready)
        ts.waiters.clear()
        if report == "task-finished":
            self._send_task_finished(ts, run_id)
        elif report == "add-keys":
            self._add_keys_batch[ts] = None

    def _send_task_finished(self, ts: TaskState, run_id: int) -> None:
        assert ts.value_type is not None and ts.nbytes is not None
        self._emit(
            TaskFinishedMsg(
                key=ts.key,
                run_id=run_id,
                nbytes=ts.nbytes,
                type=pickled_type(ts.value_type),
                typename=typename(ts.value_type),
                thread=ts.thread,
                startstops=list(ts.startstops),
                stimulus_id=self._stimulus_id,
            )
        )

    def _to_error(
        self, ts: TaskState, failure: ExecuteFailure | GatherDepFailure, *, run_id: int
    ) -> None:
        ts.exception = failure.exception
        ts.traceback = failure.traceback
        ts.exception_text = failure.exception_text
        ts.traceback_text = failure.traceback_text
        self._set_state(ts, "error")
        self._emit(
            TaskErredMsg(
                key=ts.key,
                run_id=run_id,
                exception=failure.exception,
                traceback=failure.traceback,
                exception_text=failure.exception_text,
                traceback_text=failure.traceback_text,
                thread=ts.thread,
                startstops=list(ts.startstops),
                stimulus_id=self._stimulus_id,
            )
        )

    def _release(self, ts: TaskState) -> None:
        """Drop ``ts`` as the scheduler no longer wants it here; running work goes on
        (as ``cancelled``) until it ends."""
        match ts.state:
            case "released" | "forgotten":
                return
            case "executing" | "long-running" | "flight":
                ts.previous = ts.state
                self._set_state(ts, "cancelled")
                return
            case "resumed":
                ts.next = None
                self._set_state(ts, "cancelled")
                return
            case "cancelled" if self._is_running(ts):
                return
            case "memory":
                self._drop_value(ts)
        self._purge(ts)
        for dep in ts.dependencies:
            if not dep.waiters and dep.state in _RELEASABLE_DEPENDENCY:
                self._recommend(dep, self._release)
        self._set_state(ts, "released")
        if not ts.dependents:
            self._recommend(ts, self._forget)

    def _drop_value(self, ts: TaskState) -> None:
        # `in` then `del` rather than pop(): a spilling mapping would load it from disk.
        if ts.key in self.actors:
            del self.actors[ts.key]
        elif ts.key in self.data:
            del self.data[ts.key]
        self.nbytes -= ts.get_nbytes()
        self._emit(ReleaseWorkerDataMsg(key=ts.key, stimulus_id=self._stimulus_id))
        # Local tasks that counted on this value must wait for it again; this keeps
        # every task that starts executing supplied with all its dependencies.
        for dependent in ts.dependents:
            if dependent.state in _NEEDS_DEPENDENCIES:
                if dependent.state != "waiting":
                    self.ready.discard(dependent)
                    self.constrained.discard(dependent)
                    self._set_state(dependent, "waiting")
                dependent.waiting_for_data.add(ts)
                ts.waiters.add(dependent)

    def _purge(self, ts: TaskState) -> None:
        """Clear everything that tied ``ts`` to a state other than released."""
        for worker in list(ts.who_has):
            self._unlink_holder(worker, ts)
        self.ready.discard(ts)
        self.constrained.discard(ts)
        self.missing.discard(ts)
        for dep in ts.waiting_for_data:
            dep.waiters.discard(ts)
        ts.waiting_for_data.clear()
        ts.previous = ts.next = None
        ts.exception = ts.traceback = None
        ts.exception_text = ts.traceback_text = ""
        ts.thread = None
        ts.startstops = []

    def _forget(self, ts: TaskState) -> None:
        if ts.state != "released" or ts.dependents:
            return
        for dep in ts.dependencies:
            dep.dependents.discard(ts)
            dep.waiters.discard(ts)
            if dep.state == "released" and not dep.dependents:
                self._recommend(dep, self._forget)
        ts.dependencies.clear()
        for worker in list(ts.who_has):
            self._unlink_holder(worker, ts)
        self._set_state(ts, "forgotten")
        if self.tasks.get(ts.key) is ts:
            del self.tasks[ts.key]
