"""Unit and property tests of the sans-io worker state machine."""

from __future__ import annotations

import inspect
import itertools
import pickle
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, get_args

import pytest

from clusterlaunch.protocol.markers import Serialize
from clusterlaunch.worker.state import (
    DEFAULT_NBYTES,
    TRANSITIONS,
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
    InvalidTransition,
    InvariantViolation,
    Pause,
    RefreshWhoHas,
    RemoveReplicas,
    RemoveWorker,
    RescheduleRequested,
    RetryBusyWorker,
    RetryBusyWorkerLater,
    Secede,
    SendMessageToScheduler,
    State,
    StealRequest,
    Unpause,
    UpdateData,
    WorkerState,
    WorkerStatusChange,
    scheduler_message_to_event,
)

ME = "tcp://10.0.0.1:9000"
PEER_A = "tcp://10.0.0.2:9000"
PEER_B = "tcp://10.0.0.3:9000"
PEER_C = "tcp://10.0.0.4:9000"

#: Exactly the fields dask's worker sends for each op (scheduler.py, stealing.py).
MESSAGE_FIELDS = {
    "task-finished": {
        "op",
        "status",
        "key",
        "run_id",
        "nbytes",
        "type",
        "typename",
        "metadata",
        "thread",
        "startstops",
        "stimulus_id",
    },
    "task-erred": {
        "op",
        "status",
        "key",
        "run_id",
        "exception",
        "traceback",
        "exception_text",
        "traceback_text",
        "thread",
        "startstops",
        "stimulus_id",
    },
    "release-worker-data": {"op", "key", "stimulus_id"},
    "add-keys": {"op", "keys", "stimulus_id"},
    "long-running": {"op", "key", "run_id", "compute_duration", "stimulus_id"},
    "reschedule": {"op", "key", "stimulus_id"},
    "request-refresh-who-has": {"op", "keys", "stimulus_id"},
    "steal-response": {"op", "key", "state", "stimulus_id"},
    "worker-status-change": {"op", "status", "stimulus_id"},
}

_stimulus_ids = itertools.count()


def sid() -> str:
    return f"test-{next(_stimulus_ids)}"


def compute(
    key: str,
    *,
    deps: Mapping[str, Sequence[str]] | None = None,
    nbytes: Mapping[str, int] | None = None,
    priority: tuple[int, ...] = (0,),
    run_id: int = 1,
    resources: Mapping[str, float] | None = None,
) -> ComputeTask:
    deps = dict(deps or {})
    return ComputeTask(
        key=key,
        run_id=run_id,
        run_spec=f"spec-of-{key}",
        priority=priority,
        who_has=deps,
        nbytes=dict(nbytes) if nbytes is not None else dict.fromkeys(deps, 100),
        resource_restrictions=dict(resources or {}),
        stimulus_id=sid(),
    )


def success(key: str, value: object = None, *, run_id: int = 1, nbytes: int = 8) -> ExecuteSuccess:
    return ExecuteSuccess(
        key=key,
        run_id=run_id,
        value=f"value-of-{key}" if value is None else value,
        nbytes=nbytes,
        start=1.0,
        stop=2.0,
        thread=7,
        stimulus_id=sid(),
    )


def failure(key: str, *, run_id: int = 1) -> ExecuteFailure:
    return ExecuteFailure(
        key=key,
        run_id=run_id,
        exception=pickle.dumps(ValueError("boom")),
        traceback=pickle.dumps("traceback text"),
        exception_text="ValueError('boom')",
        traceback_text="  File ...",
        start=1.0,
        stop=2.0,
        thread=7,
        stimulus_id=sid(),
    )


def gathered(
    worker: str, data: Mapping[str, object], start: float = 10.0, stop: float = 11.0
) -> GatherDepSuccess:
    return GatherDepSuccess(
        worker=worker, data=dict(data), start=start, stop=stop, stimulus_id=sid()
    )


def messages(instructions: Iterable[Instruction], op: str | None = None) -> list[dict]:
    return [
        i.to_dict()
        for i in instructions
        if isinstance(i, SendMessageToScheduler) and (op is None or i.op == op)
    ]


def of_type(instructions: Iterable[Instruction], cls: type) -> list:
    return [i for i in instructions if isinstance(i, cls)]


def executed_keys(instructions: Iterable[Instruction]) -> list:
    return [i.key for i in of_type(instructions, Execute)]


def state_of(ws: WorkerState, key: str) -> str:
    return ws.tasks[key].state if key in ws.tasks else "forgotten"


def make_ready_with_value(ws: WorkerState, key: str, value: object = 1) -> None:
    """Put ``key`` in memory as if it were computed here."""
    ws.handle(compute(key))
    ws.handle(success(key, value))


# ------------------------------------------------------------- scheduler stream parsing


def test_state_machine_imports_no_event_loop_or_distributed():
    code = (
        "import sys, clusterlaunch.worker.state; "
        "print(sorted({m.split('.')[0] for m in sys.modules} "
        "& {'asyncio', 'distributed', 'tornado', 'dask'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_compute_task_message_matches_the_scheduler_fields():
    run_spec = object()
    msg = {
        "op": "compute-task",
        "key": ("x", 0),
        "run_id": 5,
        "priority": [0, 3, 1],
        "stimulus_id": "compute-task-1.5",
        "who_has": {"y": [PEER_A, PEER_B]},
        "nbytes": {"y": 123},
        "run_spec": run_spec,
        "resource_restrictions": {"GPU": 1},
        "actor": False,
        "annotations": {"retries": 2},
        "span_id": "span-1",
    }
    ev = scheduler_message_to_event(msg)
    assert ev == ComputeTask(
        key=("x", 0),
        run_id=5,
        run_spec=run_spec,
        priority=(0, 3, 1),
        who_has={"y": (PEER_A, PEER_B)},
        nbytes={"y": 123},
        resource_restrictions={"GPU": 1},
        actor=False,
        annotations={"retries": 2},
        span_id="span-1",
        stimulus_id="compute-task-1.5",
    )


def test_compute_task_event_carries_every_field_of_dasks_event():
    from dataclasses import fields

    from distributed.worker_state_machine import ComputeTaskEvent

    ours = {f.name for f in fields(ComputeTask)}
    # Older distributed (2025.1) also sends the task's expected ``duration``; the worker
    # ignores it (unknown fields are dropped when a message becomes an event).
    theirs = {f.name for f in fields(ComputeTaskEvent)} - {"duration"}
    assert theirs <= ours


def test_every_worker_stream_operation_has_an_event():
    import distributed.worker

    # The ops dask's own worker accepts on its scheduler stream.
    source = inspect.getsource(distributed.worker.Worker.__init__)
    start = source.index("stream_handlers = {")
    handled_ops = set(
        re.findall(r'^\s*"([a-z-]+)":', source[start : source.index("}", start)], re.M)
    )
    samples = {
        "close": {"op": "close", "reason": "scheduler-close"},
        "cancel-compute": {"op": "cancel-compute", "key": "x", "stimulus_id": "s"},
        "acquire-replicas": {
            "op": "acquire-replicas",
            "who_has": {"x": [PEER_A]},
            "nbytes": {"x": 5},
            "stimulus_id": "s",
        },
        "compute-task": {
            "op": "compute-task",
            "key": "x",
            "run_id": 1,
            "priority": (0,),
            "run_spec": None,
            "stimulus_id": "s",
        },
        "free-keys": {"op": "free-keys", "keys": ["x"], "stimulus_id": "s"},
        "remove-replicas": {"op": "remove-replicas", "keys": ["x"], "stimulus_id": "s"},
        "steal-request": {"op": "steal-request", "key": "x", "stimulus_id": "s"},
        "refresh-who-has": {"op": "refresh-who-has", "who_has": {"x": []}, "stimulus_id": "s"},
        "worker-status-change": {
            "op": "worker-status-change",
            "status": "paused",
            "stimulus_id": "s",
        },
        "remove-worker": {"op": "remove-worker", "worker": PEER_A, "stimulus_id": "s"},
    }
    assert handled_ops == set(samples)
    expected = {
        "close": CloseRequested(reason="scheduler-close", stimulus_id="close-from-scheduler"),
        "cancel-compute": CancelCompute(key="x", stimulus_id="s"),
        "acquire-replicas": AcquireReplicas(
            who_has={"x": (PEER_A,)}, nbytes={"x": 5}, stimulus_id="s"
        ),
        "free-keys": FreeKeys(keys=("x",), stimulus_id="s"),
        "remove-replicas": RemoveReplicas(keys=("x",), stimulus_id="s"),
        "steal-request": StealRequest(key="x", stimulus_id="s"),
        "refresh-who-has": RefreshWhoHas(who_has={"x": ()}, stimulus_id="s"),
        "worker-status-change": WorkerStatusChange(status="paused", stimulus_id="s"),
        "remove-worker": RemoveWorker(worker=PEER_A, stimulus_id="s"),
    }
    for op, msg in samples.items():
        ev = scheduler_message_to_event(msg)
        if op == "compute-task":
            assert isinstance(ev, ComputeTask) and ev.key == "x" and ev.who_has == {}
        else:
            assert ev == expected[op]


def test_malformed_scheduler_messages_raise_value_error():
    with pytest.raises(ValueError, match="unknown operation"):
        scheduler_message_to_event({"op": "no-such-op"})
    with pytest.raises(ValueError, match="unknown operation"):
        scheduler_message_to_event({"key": "x"})
    with pytest.raises(ValueError, match="lacks the field 'key'"):
        scheduler_message_to_event({"op": "steal-request", "stimulus_id": "s"})


def test_unknown_event_type_is_a_type_error():
    with pytest.raises(TypeError):
        WorkerState(address=ME).handle(Event(stimulus_id="s"))


# ------------------------------------------------------- messages fit the scheduler


def _bind(handler: Any, msg: dict, **extra: Any) -> None:
    """Bind a message to a scheduler handler the way Server.handle_stream calls it."""
    fields = {k: v for k, v in msg.items() if k != "op"}
    inspect.signature(handler).bind(None, **extra, **fields)


def test_messages_bind_to_the_scheduler_handlers():
    from distributed.scheduler import Scheduler, SchedulerState
    from distributed.stealing import WorkStealing

    ws = WorkerState(address=ME, nthreads=1)
    out = ws.handle(compute("x"))
    out += ws.handle(Secede(key="x", compute_duration=0.5, stimulus_id=sid()))
    out += ws.handle(success("x"))
    finished, long_running = messages(out, "task-finished"), messages(out, "long-running")
    _bind(Scheduler.handle_task_finished, finished[0], worker=ME)
    _bind(Scheduler.stimulus_task_finished, finished[0], worker=ME)
    state_args = {k: v for k, v in finished[0].items() if k not in ("op", "key", "stimulus_id")}
    inspect.signature(SchedulerState._transition_processing_memory).bind(
        None, "x", "sid", worker=ME, **state_args
    )
    if "run_id" in inspect.signature(Scheduler.handle_long_running).parameters:
        # Older distributed (2025.1) takes no run_id with long-running. Only a seceding task
        # sends this message, and our worker's tasks can't secede (that needs
        # distributed in the worker), so it never reaches an older scheduler.
        _bind(Scheduler.handle_long_running, long_running[0], worker=ME)

    out = ws.handle(compute("y"))
    out += ws.handle(failure("y"))
    erred = messages(out, "task-erred")[0]
    _bind(Scheduler.handle_task_erred, erred, worker=ME)
    _bind(Scheduler.stimulus_task_erred, erred, worker=ME)
    state_args = {k: v for k, v in erred.items() if k not in ("op", "key", "stimulus_id")}
    inspect.signature(SchedulerState._transition_processing_erred).bind(
        None, "y", "sid", worker=ME, **state_args
    )

    out = ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    _bind(Scheduler.release_worker_data, messages(out, "release-worker-data")[0], worker=ME)
    out = ws.handle(StealRequest(key="y", stimulus_id=sid()))
    _bind(WorkStealing.move_task_confirm, messages(out, "steal-response")[0], worker=ME)
    out = ws.handle(compute("z", deps={"d": [PEER_A]}))
    out += ws.handle(gathered(PEER_A, {"d": 1}))
    _bind(Scheduler.add_keys, messages(out, "add-keys")[0], worker=ME)
    out = ws.handle(compute("w", deps={"e": []}))
    _bind(
        Scheduler.handle_request_refresh_who_has,
        messages(out, "request-refresh-who-has")[0],
        worker=ME,
    )
    out = ws.handle(compute("v"))
    out += ws.handle(success("z"))
    out += ws.handle(RescheduleRequested(key="v", run_id=1, stimulus_id=sid()))
    _bind(Scheduler._reschedule, messages(out, "reschedule")[0], worker=ME)
    out = ws.handle(Pause(stimulus_id=sid()))
    _bind(Scheduler.handle_worker_status_change, messages(out)[0], worker=ME)


# ------------------------------------------------------------------ computing


def test_compute_without_dependencies_runs_and_reports_task_finished():
    ws = WorkerState(address=ME, nthreads=2)
    out = ws.handle(compute("x", run_id=3))
    assert out == [Execute(key="x", run_id=3, run_spec="spec-of-x", stimulus_id=out[0].stimulus_id)]
    assert state_of(ws, "x") == "executing"

    out = ws.handle(success("x", 42, run_id=3, nbytes=28))
    [msg] = messages(out)
    assert set(msg) == MESSAGE_FIELDS["task-finished"]
    assert msg["op"] == "task-finished"
    assert msg["status"] == "OK"
    assert msg["key"] == "x"
    assert msg["run_id"] == 3
    assert msg["nbytes"] == 28
    assert pickle.loads(msg["type"]) is int
    assert msg["typename"] == "int"
    assert msg["thread"] == 7
    assert msg["startstops"] == [{"action": "compute", "start": 1.0, "stop": 2.0}]
    assert state_of(ws, "x") == "memory"
    assert ws.data == {"x": 42}
    assert ws.nbytes == 28
    assert ws.executed_count == 1


def test_unpicklable_type_travels_as_its_name():
    class Local:
        pass

    ws = WorkerState(address=ME)
    ws.handle(compute("x"))
    [msg] = messages(ws.handle(success("x", Local())))
    assert pickle.loads(msg["type"]).endswith("Local")


def test_execution_failure_reports_task_erred_with_serialized_payloads():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", run_id=4))
    ev = failure("x", run_id=4)
    [msg] = messages(ws.handle(ev))
    assert set(msg) == MESSAGE_FIELDS["task-erred"]
    assert msg["op"] == "task-erred"
    assert msg["status"] == "error"
    assert msg["run_id"] == 4
    assert isinstance(msg["exception"], Serialize)
    assert msg["exception"].data == ev.exception
    assert isinstance(msg["traceback"], Serialize)
    assert msg["traceback"].data == ev.traceback
    assert msg["exception_text"] == "ValueError('boom')"
    assert msg["traceback_text"] == "  File ..."
    assert state_of(ws, "x") == "error"
    assert ws.data == {}

    # A missing traceback stays None, as in dask's error_message.
    ws.handle(compute("y"))
    no_tb = ExecuteFailure(
        key="y",
        run_id=1,
        exception=b"e",
        traceback=None,
        exception_text="e",
        traceback_text="",
        stimulus_id=sid(),
    )
    [msg] = messages(ws.handle(no_tb))
    assert msg["traceback"] is None

    # The scheduler may retry an erred task: it runs again.
    out = ws.handle(compute("x", run_id=5))
    assert executed_keys(out) == ["x"]
    assert ws.tasks["x"].exception is None

    assert ws.handle(FreeKeys(keys=["y"], stimulus_id=sid())) == []
    assert "y" not in ws.tasks


def test_dependencies_in_memory_make_the_task_ready_at_once():
    ws = WorkerState(address=ME)
    make_ready_with_value(ws, "a")
    out = ws.handle(compute("b", deps={"a": [ME]}))
    assert executed_keys(out) == ["b"]
    assert not of_type(out, GatherDep)


def test_tasks_run_in_priority_order_within_the_thread_slots():
    ws = WorkerState(address=ME, nthreads=1)
    assert executed_keys(ws.handle(compute("first", priority=(0, 9)))) == ["first"]
    for key, priority in [("low", (0, 5)), ("high", (0, 1)), ("mid", (0, 3))]:
        assert executed_keys(ws.handle(compute(key, priority=priority))) == []
    order = []
    for key in ["first", "high", "mid"]:
        order += executed_keys(ws.handle(success(key)))
    assert order == ["high", "mid", "low"]


def test_equal_priorities_run_most_recent_first():
    ws = WorkerState(address=ME, nthreads=1)
    ws.handle(compute("running"))
    ws.handle(compute("older"), compute("newer"))
    assert executed_keys(ws.handle(success("running"))) == ["newer"]


def test_nthreads_bounds_concurrent_executions():
    ws = WorkerState(address=ME, nthreads=3)
    started = []
    for i in range(5):
        started += executed_keys(ws.handle(compute(f"t{i}")))
    assert started == ["t0", "t1", "t2"]
    assert len(ws.executing) == 3
    assert executed_keys(ws.handle(success("t1"))) == ["t4"]


def test_resources_serialise_tasks_that_need_them():
    ws = WorkerState(address=ME, nthreads=4, resources={"GPU": 2})
    started = []
    for i in range(4):
        started += executed_keys(ws.handle(compute(f"g{i}", resources={"GPU": 1})))
    assert started == ["g0", "g1"]
    assert ws.available_resources == {"GPU": 0}
    assert state_of(ws, "g2") == "constrained"
    # Tasks without restrictions use the remaining threads.
    assert executed_keys(ws.handle(compute("cpu"))) == ["cpu"]
    assert executed_keys(ws.handle(success("g0"))) == ["g3"]
    assert ws.available_resources == {"GPU": 0}
    ws.handle(success("g1"))
    ws.handle(success("g3"))
    assert executed_keys(ws.handle(success("cpu"))) == []
    ws.handle(success("g2"))
    assert ws.available_resources == {"GPU": 2}


def test_task_needing_more_than_available_waits_without_blocking_others():
    ws = WorkerState(address=ME, nthreads=2, resources={"GPU": 1})
    out = ws.handle(compute("big", resources={"GPU": 2}))
    assert executed_keys(out) == []
    assert executed_keys(ws.handle(compute("plain"))) == ["plain"]
    assert ws.available_resources == {"GPU": 1}


def test_higher_priority_constrained_task_goes_before_ready_one():
    ws = WorkerState(address=ME, nthreads=1, resources={"R": 1})
    ws.handle(compute("blocker"))
    ws.handle(compute("plain", priority=(5,)))
    ws.handle(compute("needs-r", priority=(1,), resources={"R": 1}))
    assert executed_keys(ws.handle(success("blocker"))) == ["needs-r"]
    assert executed_keys(ws.handle(success("needs-r"))) == ["plain"]


def test_secede_frees_the_slot_but_keeps_resources():
    ws = WorkerState(address=ME, nthreads=1, resources={"R": 1})
    ws.handle(compute("lr", resources={"R": 1}, run_id=8))
    ws.handle(compute("other"))
    ws.handle(compute("needs-r", resources={"R": 1}))
    out = ws.handle(Secede(key="lr", compute_duration=1.5, stimulus_id=sid()))
    [msg] = messages(out)
    assert msg == {
        "op": "long-running",
        "key": "lr",
        "run_id": 8,
        "compute_duration": 1.5,
        "stimulus_id": msg["stimulus_id"],
    }
    assert executed_keys(out) == ["other"]
    assert state_of(ws, "lr") == "long-running"
    assert ws.available_resources == {"R": 0}
    out = ws.handle(success("lr", run_id=8))
    assert messages(out)[0]["op"] == "task-finished"
    assert ws.available_resources == {"R": 1}
    assert executed_keys(out) == []  # the only thread is still busy with "other"
    assert executed_keys(ws.handle(success("other"))) == ["needs-r"]
    assert ws.available_resources == {"R": 0}


def test_reschedule_tells_the_scheduler_and_forgets_the_task():
    ws = WorkerState(address=ME)
    ws.handle(compute("x"))
    out = ws.handle(RescheduleRequested(key="x", run_id=1, stimulus_id=sid()))
    assert [m["op"] for m in messages(out)] == ["reschedule"]
    assert set(messages(out)[0]) == MESSAGE_FIELDS["reschedule"]
    assert "x" not in ws.tasks
    assert [entry[2] for entry in ws.story("x")][-3:] == ["rescheduled", "released", "forgotten"]


# -------------------------------------------------------------------- fetching


def test_dependencies_are_batched_per_peer():
    ws = WorkerState(address=ME)
    deps = {"a": [PEER_A], "b": [PEER_A], "c": [PEER_B]}
    out = ws.handle(compute("x", deps=deps, nbytes={"a": 10, "b": 20, "c": 30}))
    gathers = {g.worker: g for g in of_type(out, GatherDep)}
    assert set(gathers) == {PEER_A, PEER_B}
    assert sorted(gathers[PEER_A].keys) == ["a", "b"]
    assert gathers[PEER_A].total_nbytes == 30
    assert gathers[PEER_B].keys == ("c",)
    assert ws.transfer_incoming_bytes == 60
    assert {state_of(ws, k) for k in deps} == {"flight"}

    out = ws.handle(gathered(PEER_A, {"a": 1, "b": 2}))
    [msg] = messages(out)
    assert msg["op"] == "add-keys" and sorted(msg["keys"]) == ["a", "b"]
    assert state_of(ws, "x") == "waiting"
    out = ws.handle(gathered(PEER_B, {"c": 3}))
    assert executed_keys(out) == ["x"]
    assert ws.data == {"a": 1, "b": 2, "c": 3}
    assert ws.transfer_incoming_bytes == 0


def test_a_transfer_shows_in_the_startstops_of_the_dependent_that_runs_first():
    ws = WorkerState(address=ME, nthreads=2)
    ws.handle(compute("late", deps={"a": [PEER_A]}, priority=(5,)))
    ws.handle(compute("early", deps={"a": [PEER_A]}, priority=(1,)))
    ws.handle(gathered(PEER_A, {"a": 1}, start=10.0, stop=12.5))
    out = ws.handle(success("early"))
    [msg] = messages(out, "task-finished")
    assert msg["startstops"] == [
        {"action": "transfer", "start": 10.0, "stop": 12.5, "source": PEER_A},
        {"action": "compute", "start": 1.0, "stop": 2.0},
    ]
    [msg] = messages(ws.handle(success("late")), "task-finished")
    assert [s["action"] for s in msg["startstops"]] == ["compute"]


def test_a_transfer_without_dependents_is_recorded_on_the_fetched_key():
    ws = WorkerState(address=ME)
    ws.handle(AcquireReplicas(who_has={"r": [PEER_A]}, nbytes={"r": 100}, stimulus_id=sid()))
    ws.handle(gathered(PEER_A, {"r": 2}, start=3.0, stop=4.0))
    assert ws.tasks["r"].startstops == [
        {"action": "transfer", "start": 3.0, "stop": 4.0, "source": PEER_A}
    ]


def test_a_transfer_that_brought_nothing_records_nothing():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A, PEER_B]}))
    ws.handle(gathered(PEER_A, {}))
    assert ws.tasks["x"].startstops == [] and ws.tasks["a"].startstops == []


def test_batch_respects_the_message_byte_target_in_priority_order():
    ws = WorkerState(address=ME, transfer_message_bytes_limit=100)
    ws.handle(compute("x1", deps={"a": [PEER_A]}, nbytes={"a": 40}, priority=(1,)))
    ws.handle(Pause(stimulus_id=sid()))
    ws.handle(compute("x2", deps={"b": [PEER_A]}, nbytes={"b": 40}, priority=(2,)))
    ws.handle(compute("x3", deps={"c": [PEER_A]}, nbytes={"c": 40}, priority=(3,)))
    ws.handle(gathered(PEER_A, {"a": 1}))
    [gather] = of_type(ws.handle(Unpause(stimulus_id=sid())), GatherDep)
    assert gather.keys == ("b", "c")
    assert gather.total_nbytes == 80

    ws.handle(compute("x4", deps={"d": [PEER_A]}, nbytes={"d": 30}, priority=(4,)))
    ws.handle(compute("x5", deps={"e": [PEER_A]}, nbytes={"e": 30}, priority=(5,)))
    ws.handle(compute("x6", deps={"f": [PEER_A]}, nbytes={"f": 30}, priority=(6,)))
    [gather] = of_type(ws.handle(gathered(PEER_A, {"b": 2, "c": 3})), GatherDep)
    assert gather.keys == ("d", "e", "f")
    assert gather.total_nbytes == 90


def test_a_key_larger_than_the_byte_target_still_goes_alone():
    ws = WorkerState(address=ME, transfer_message_bytes_limit=100)
    out = ws.handle(
        compute("x", deps={"huge": [PEER_A], "small": [PEER_A]}, nbytes={"huge": 500, "small": 1})
    )
    [gather] = of_type(out, GatherDep)
    assert gather.total_nbytes in (500, 1)
    assert len(gather.keys) == 1
    [gather] = of_type(ws.handle(gathered(PEER_A, {gather.keys[0]: 0})), GatherDep)
    assert len(gather.keys) == 1


def test_default_message_byte_target_is_50_mb():
    ws = WorkerState(address=ME)
    assert ws.transfer_message_bytes_limit == 50e6
    out = ws.handle(
        compute("x", deps={"a": [PEER_A], "b": [PEER_A]}, nbytes={"a": 30_000_000, "b": 30_000_000})
    )
    [gather] = of_type(out, GatherDep)
    assert len(gather.keys) == 1


def test_unknown_sizes_count_as_the_default():
    ws = WorkerState(address=ME)
    [gather] = of_type(ws.handle(compute("x", deps={"a": [PEER_A]}, nbytes={})), GatherDep)
    assert gather.total_nbytes == DEFAULT_NBYTES


def test_concurrent_transfer_count_is_limited():
    ws = WorkerState(address=ME, transfer_incoming_count_limit=2)
    deps = {"a": [PEER_A], "b": [PEER_B], "c": [PEER_C]}
    gathers = of_type(ws.handle(compute("x", deps=deps)), GatherDep)
    assert len(gathers) == 2
    assert len(ws.in_flight_workers) == 2
    first = gathers[0]
    [nxt] = of_type(ws.handle(gathered(first.worker, dict.fromkeys(first.keys, 0))), GatherDep)
    assert nxt.worker not in {g.worker for g in gathers}


def test_concurrent_transfer_bytes_are_limited():
    ws = WorkerState(address=ME, transfer_incoming_bytes_limit=100)
    deps = {"a": [PEER_A], "b": [PEER_B]}
    [gather] = of_type(ws.handle(compute("x", deps=deps, nbytes={"a": 80, "b": 50})), GatherDep)
    assert gather.keys == ("a",) or gather.keys == ("b",)
    other = "b" if gather.keys == ("a",) else "a"
    assert state_of(ws, other) == "fetch"
    [nxt] = of_type(ws.handle(gathered(gather.worker, {gather.keys[0]: 0})), GatherDep)
    assert nxt.keys == (other,)


def test_one_transfer_per_peer_at_a_time():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    out = ws.handle(compute("y", deps={"b": [PEER_A]}))
    assert of_type(out, GatherDep) == []
    [gather] = of_type(ws.handle(gathered(PEER_A, {"a": 1})), GatherDep)
    assert gather.keys == ("b",)


def test_own_address_is_never_a_source():
    ws = WorkerState(address=ME)
    out = ws.handle(compute("x", deps={"a": [ME, PEER_A]}))
    [gather] = of_type(out, GatherDep)
    assert gather.worker == PEER_A
    assert ws.tasks["a"].who_has == {PEER_A}


def test_busy_peer_is_retried_later_and_others_are_tried_now():
    ws = WorkerState(address=ME)
    out = ws.handle(compute("x", deps={"a": [PEER_A, PEER_B]}))
    [gather] = of_type(out, GatherDep)
    first, second = gather.worker, ({PEER_A, PEER_B} - {gather.worker}).pop()
    out = ws.handle(GatherDepBusy(worker=first, stimulus_id=sid()))
    assert of_type(out, RetryBusyWorkerLater) == [
        RetryBusyWorkerLater(worker=first, stimulus_id=out[0].stimulus_id)
    ]
    [retry] = of_type(out, GatherDep)
    assert retry.worker == second
    assert messages(out) == []
    # Both holders busy: ask the scheduler for others, and wait for the retry.
    out = ws.handle(GatherDepBusy(worker=second, stimulus_id=sid()))
    assert of_type(out, GatherDep) == []
    [msg] = messages(out)
    assert msg["op"] == "request-refresh-who-has" and msg["keys"] == ["a"]
    assert set(msg) == MESSAGE_FIELDS["request-refresh-who-has"]
    assert state_of(ws, "a") == "fetch"
    [again] = of_type(ws.handle(RetryBusyWorker(worker=first, stimulus_id=sid())), GatherDep)
    assert again.worker == first and again.keys == ("a",)


def test_network_failure_falls_back_to_another_peer():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A, PEER_B]}))
    first = ws.tasks["a"].coming_from
    second = ({PEER_A, PEER_B} - {first}).pop()
    out = ws.handle(GatherDepNetworkFailure(worker=first, stimulus_id=sid()))
    [retry] = of_type(out, GatherDep)
    assert retry.worker == second
    assert first not in ws.has_what
    assert ws.tasks["a"].who_has == {second}


def test_network_failure_forgets_every_key_on_that_peer():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    ws.handle(compute("y", deps={"b": [PEER_A, PEER_B]}))  # PEER_A in flight: b from B
    ws.handle(compute("z", deps={"c": [PEER_A]}))
    assert state_of(ws, "c") == "fetch"
    out = ws.handle(GatherDepNetworkFailure(worker=PEER_A, stimulus_id=sid()))
    assert state_of(ws, "a") == "missing"
    assert state_of(ws, "c") == "missing"
    assert ws.tasks["b"].who_has == {PEER_B}
    [msg] = messages(out)
    assert msg["op"] == "request-refresh-who-has"
    assert sorted(msg["keys"]) == ["a", "c"]


def test_missing_keys_are_reported_and_found_again():
    ws = WorkerState(address=ME)
    out = ws.handle(compute("x", deps={"a": []}))
    assert state_of(ws, "a") == "missing"
    assert messages(out) == [
        {"op": "request-refresh-who-has", "keys": ["a"], "stimulus_id": out[0].stimulus_id}
    ]
    # Periodically asked again while still missing.
    out = ws.handle(FindMissing(stimulus_id=sid()))
    assert [m["keys"] for m in messages(out)] == [["a"]]
    # An empty answer changes nothing.
    assert ws.handle(RefreshWhoHas(who_has={"a": []}, stimulus_id=sid())) == []
    out = ws.handle(RefreshWhoHas(who_has={"a": [PEER_B]}, stimulus_id=sid()))
    [gather] = of_type(out, GatherDep)
    assert gather.worker == PEER_B
    assert ws.handle(FindMissing(stimulus_id=sid())) == []


def test_refresh_who_has_can_make_a_fetch_missing():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    ws.handle(compute("y", deps={"b": [PEER_A]}))  # waits: PEER_A busy with a
    out = ws.handle(RefreshWhoHas(who_has={"b": [], "unknown": [PEER_B]}, stimulus_id=sid()))
    assert state_of(ws, "b") == "missing"
    assert [m["keys"] for m in messages(out)] == [["b"]]


def test_peer_without_the_key_is_dropped_from_who_has():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A, PEER_B], "b": [PEER_A]}, nbytes={"a": 1, "b": 1}))
    holder = ws.tasks["b"].coming_from
    assert holder == PEER_A and ws.tasks["a"].coming_from == PEER_A
    out = ws.handle(gathered(PEER_A, {"b": 2}))
    assert ws.tasks["a"].who_has == {PEER_B}
    [gather] = of_type(out, GatherDep)
    assert gather.worker == PEER_B and gather.keys == ("a",)
    out = ws.handle(gathered(PEER_B, {}))
    assert state_of(ws, "a") == "missing"
    assert [m["op"] for m in messages(out)] == ["request-refresh-who-has"]


def test_transfer_failure_errs_the_dependency_and_its_waiting_dependents():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    ws.handle(compute("y", deps={"a": [PEER_A], "b": [PEER_B]}))
    out = ws.handle(
        GatherDepFailure(
            worker=PEER_A,
            exception=b"exc",
            traceback=None,
            exception_text="DeserializationError()",
            traceback_text="",
            stimulus_id=sid(),
        )
    )
    erred = messages(out, "task-erred")
    assert sorted(m["key"] for m in erred) == ["a", "x", "y"]
    assert {m["exception"].data for m in erred} == {b"exc"}
    assert [state_of(ws, k) for k in "axy"] == ["error"] * 3
    # y no longer waits for b, whose transfer goes on.
    assert not ws.tasks["b"].waiters and state_of(ws, "b") == "flight"


def test_acquire_replicas_fetches_after_compute_dependencies():
    ws = WorkerState(address=ME, transfer_message_bytes_limit=150)
    ws.handle(Pause(stimulus_id=sid()))
    ws.handle(AcquireReplicas(who_has={"r": [PEER_A]}, nbytes={"r": 100}, stimulus_id=sid()))
    ws.handle(compute("x", deps={"d": [PEER_A]}, nbytes={"d": 100}))
    [gather] = of_type(ws.handle(Unpause(stimulus_id=sid())), GatherDep)
    assert gather.keys == ("d",)
    [gather] = of_type(ws.handle(gathered(PEER_A, {"d": 1})), GatherDep)
    assert gather.keys == ("r",)
    out = ws.handle(gathered(PEER_A, {"r": 2}))
    assert [m["keys"] for m in messages(out, "add-keys")] == [["r"]]
    assert ws.data["r"] == 2


def test_acquire_replicas_of_a_key_in_memory_does_nothing():
    ws = WorkerState(address=ME)
    make_ready_with_value(ws, "a")
    out = ws.handle(AcquireReplicas(who_has={"a": [PEER_A]}, nbytes={"a": 5}, stimulus_id=sid()))
    assert out == []
    assert state_of(ws, "a") == "memory"


def test_remove_worker_drops_the_peer():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    ws.handle(compute("y", deps={"b": [PEER_A, PEER_B], "c": [PEER_A]}))
    out = ws.handle(RemoveWorker(worker=PEER_A, stimulus_id=sid()))
    assert DropPeer(worker=PEER_A, stimulus_id=out[0].stimulus_id) in out
    assert PEER_A not in ws.has_what
    assert ws.tasks["b"].who_has == {PEER_B}
    assert state_of(ws, "c") == "missing"
    # The transfer under way ends on its own; the key then has nowhere to come from.
    assert state_of(ws, "a") == "flight"
    ws.handle(GatherDepNetworkFailure(worker=PEER_A, stimulus_id=sid()))
    assert state_of(ws, "a") == "missing"


# ---------------------------------------------------------------- cancellation


def test_cancelled_execution_keeps_its_slot_and_its_result_is_discarded():
    ws = WorkerState(address=ME, nthreads=1)
    ws.handle(compute("x"))
    ws.handle(compute("y"))
    out = ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    assert out == []
    assert repr(ws.tasks["x"]) == "<TaskState 'x' cancelled(executing)>"
    assert len(ws.executing) == 1
    out = ws.handle(success("x"))
    assert messages(out) == []
    assert executed_keys(out) == ["y"]
    assert "x" not in ws.tasks and "x" not in ws.data


def test_cancelled_execution_failure_is_discarded_too():
    ws = WorkerState(address=ME)
    ws.handle(compute("x"))
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    assert messages(ws.handle(failure("x"))) == []
    assert "x" not in ws.tasks


def test_cancelled_execution_is_adopted_again_by_compute_task():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", run_id=1))
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    out = ws.handle(compute("x", run_id=2))
    assert out == []  # no second execution
    assert state_of(ws, "x") == "executing"
    [msg] = messages(ws.handle(success("x", run_id=1)))
    # Reported with the run it came from: the scheduler decides if it is stale.
    assert msg["op"] == "task-finished" and msg["run_id"] == 1


def test_cancelled_long_running_task_readopted_restates_its_secession():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", run_id=1))
    ws.handle(Secede(key="x", compute_duration=1.0, stimulus_id=sid()))
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    out = ws.handle(compute("x", run_id=2))
    assert messages(out) == [
        {
            "op": "long-running",
            "key": "x",
            "run_id": 2,
            "compute_duration": None,
            "stimulus_id": out[0].stimulus_id,
        }
    ]
    assert state_of(ws, "x") == "long-running"


def test_secede_while_cancelled_stays_quiet():
    ws = WorkerState(address=ME, nthreads=1)
    ws.handle(compute("x"))
    ws.handle(compute("y"))
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    out = ws.handle(Secede(key="x", compute_duration=1.0, stimulus_id=sid()))
    assert messages(out) == []
    assert executed_keys(out) == ["y"]
    assert ws.tasks["x"].previous == "long-running"


def test_execution_resumed_towards_fetch_reports_a_replica():
    ws = WorkerState(address=ME)
    ws.handle(compute("x"))
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    # x now lives elsewhere and a new task here needs it.
    out = ws.handle(compute("y", deps={"x": [PEER_A]}))
    assert of_type(out, GatherDep) == []
    assert repr(ws.tasks["x"]) == "<TaskState 'x' resumed(executing->fetch)>"
    out = ws.handle(success("x"))
    assert [m["op"] for m in messages(out)] == ["add-keys"]
    assert executed_keys(out) == ["y"]


def test_failed_execution_resumed_towards_fetch_fetches():
    ws = WorkerState(address=ME)
    ws.handle(compute("x"))
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    ws.handle(compute("y", deps={"x": [PEER_A]}))
    out = ws.handle(failure("x"))
    assert messages(out) == []
    [gather] = of_type(out, GatherDep)
    assert gather.keys == ("x",)


def test_rescheduled_execution_resumed_towards_fetch_fetches():
    ws = WorkerState(address=ME)
    ws.handle(compute("x"))
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    ws.handle(AcquireReplicas(who_has={"x": [PEER_A]}, nbytes={"x": 1}, stimulus_id=sid()))
    out = ws.handle(RescheduleRequested(key="x", run_id=1, stimulus_id=sid()))
    assert messages(out) == []
    assert [g.keys for g in of_type(out, GatherDep)] == [("x",)]


def test_resumed_execution_freed_again_is_cancelled():
    ws = WorkerState(address=ME)
    ws.handle(compute("x"))
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    ws.handle(AcquireReplicas(who_has={"x": [PEER_A]}, nbytes={"x": 1}, stimulus_id=sid()))
    assert state_of(ws, "x") == "resumed"
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    assert state_of(ws, "x") == "cancelled"
    out = ws.handle(RescheduleRequested(key="x", run_id=1, stimulus_id=sid()))
    assert messages(out) == []
    assert "x" not in ws.tasks


def test_cancelled_transfer_is_discarded():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    assert "x" not in ws.tasks
    assert repr(ws.tasks["a"]) == "<TaskState 'a' cancelled(flight)>"
    out = ws.handle(gathered(PEER_A, {"a": 1}))
    assert messages(out) == []
    assert ws.tasks == {} and ws.data == {}
    assert ws.transfer_incoming_bytes == 0


def test_cancelled_transfer_wanted_again_continues():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    out = ws.handle(compute("y", deps={"a": [PEER_A]}))
    assert of_type(out, GatherDep) == []
    assert state_of(ws, "a") == "flight"
    assert executed_keys(ws.handle(gathered(PEER_A, {"a": 1}))) == ["y"]


def test_transfer_resumed_towards_compute_reports_task_finished():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    # The holder of a is lost for the scheduler, which asks us to compute a.
    out = ws.handle(compute("a", run_id=9))
    assert out == []
    assert repr(ws.tasks["a"]) == "<TaskState 'a' resumed(flight->waiting)>"
    out = ws.handle(gathered(PEER_A, {"a": 1}))
    [msg] = messages(out)
    assert msg["op"] == "task-finished" and msg["key"] == "a" and msg["run_id"] == 9
    assert executed_keys(out) == ["x"]


def test_failed_transfer_resumed_towards_compute_computes():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    ws.handle(compute("a", run_id=9))
    out = ws.handle(GatherDepNetworkFailure(worker=PEER_A, stimulus_id=sid()))
    assert executed_keys(out) == ["a"]
    assert messages(out) == []
    assert executed_keys(ws.handle(success("a", run_id=9))) == ["x"]


def test_transfer_resumed_then_fetched_again_is_plain_flight():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    ws.handle(compute("a", run_id=9))
    ws.handle(StealRequest(key="a", stimulus_id=sid()))
    ws.handle(AcquireReplicas(who_has={"a": [PEER_A]}, stimulus_id=sid()))
    assert state_of(ws, "a") == "flight"
    out = ws.handle(gathered(PEER_A, {"a": 1}))
    assert [m["op"] for m in messages(out)] == ["add-keys"]


# -------------------------------------------------------------- scheduler messages


def test_steal_request_gives_up_tasks_that_have_not_started():
    ws = WorkerState(address=ME, nthreads=1)
    ws.handle(compute("running"))
    ws.handle(compute("ready"))
    ws.handle(compute("waiting", deps={"a": [PEER_A]}))
    for key, state in [("ready", "ready"), ("waiting", "waiting"), ("running", "executing")]:
        out = ws.handle(StealRequest(key=key, stimulus_id="steal-1"))
        assert messages(out) == [
            {"op": "steal-response", "key": key, "state": state, "stimulus_id": "steal-1"}
        ]
    assert "ready" not in ws.tasks and "waiting" not in ws.tasks
    assert state_of(ws, "running") == "executing"
    assert state_of(ws, "a") == "cancelled"
    [msg] = messages(ws.handle(StealRequest(key="unknown", stimulus_id="steal-2")))
    assert msg["state"] is None


def test_steal_request_of_a_constrained_task():
    ws = WorkerState(address=ME, nthreads=2, resources={"R": 1})
    ws.handle(compute("a", resources={"R": 1}))
    ws.handle(compute("b", resources={"R": 1}))
    [msg] = messages(ws.handle(StealRequest(key="b", stimulus_id=sid())))
    assert msg["state"] == "constrained"
    assert "b" not in ws.tasks
    assert ws.available_resources == {"R": 0}


def test_free_keys_of_in_memory_data_releases_it():
    ws = WorkerState(address=ME)
    make_ready_with_value(ws, "x", 5)
    assert ws.nbytes == 8
    out = ws.handle(FreeKeys(keys=["x", "never-heard-of"], stimulus_id=sid()))
    [msg] = messages(out)
    assert msg == {"op": "release-worker-data", "key": "x", "stimulus_id": msg["stimulus_id"]}
    assert ws.data == {} and ws.tasks == {} and ws.nbytes == 0


def test_free_keys_of_unknown_keys_does_nothing():
    ws = WorkerState(address=ME)
    assert ws.handle(FreeKeys(keys=["a", ("b", 1)], stimulus_id=sid())) == []
    assert ws.tasks == {}


def test_freeing_a_task_releases_the_dependencies_only_it_needed():
    ws = WorkerState(address=ME)
    make_ready_with_value(ws, "shared")
    ws.handle(compute("x", deps={"a": [PEER_A], "shared": [ME]}))
    ws.handle(compute("y", deps={"b": [PEER_A], "shared": [ME]}))
    assert state_of(ws, "b") == "fetch"
    ws.handle(FreeKeys(keys=["y"], stimulus_id=sid()))
    assert "b" not in ws.tasks
    assert state_of(ws, "shared") == "memory"
    assert PEER_A in ws.has_what and ws.has_what[PEER_A] == {"a"}


def test_compute_task_for_a_key_in_memory_answers_task_finished():
    ws = WorkerState(address=ME)
    ws.handle(UpdateData(data={"x": [1, 2]}, nbytes={"x": 64}, stimulus_id=sid()))
    out = ws.handle(compute("x", run_id=12))
    [msg] = messages(out)
    assert msg["op"] == "task-finished" and msg["run_id"] == 12 and msg["nbytes"] == 64
    assert pickle.loads(msg["type"]) is list
    assert executed_keys(out) == []


def test_duplicate_compute_task_is_harmless():
    ws = WorkerState(address=ME, nthreads=1)
    ws.handle(compute("x"))
    ws.handle(compute("w", deps={"a": [PEER_A]}))
    ws.handle(compute("r"))
    for key in ["x", "w", "r"]:
        assert ws.handle(compute(key, run_id=2)) == []
    assert executed_keys(ws.handle(success("x"))) == ["r"]


def test_compute_task_replaces_stale_dependencies():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"old": []}))
    assert state_of(ws, "old") == "missing"
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    ws.handle(compute("x", deps={"new": [PEER_A]}))
    assert "old" not in ws.tasks
    assert {d.key for d in ws.tasks["x"].dependencies} == {"new"}


def test_compute_task_for_a_key_being_fetched_computes_it():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    ws.handle(compute("y", deps={"b": [PEER_A]}))
    assert state_of(ws, "b") == "fetch"
    out = ws.handle(compute("b"))
    assert executed_keys(out) == ["b"]
    assert PEER_A in ws.has_what and "b" not in ws.has_what[PEER_A]
    assert executed_keys(ws.handle(success("b"))) == ["y"]


def test_compute_task_for_a_missing_key_computes_it():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": []}))
    assert executed_keys(ws.handle(compute("a"))) == ["a"]
    assert ws.missing == set()


def test_dependency_computed_here_but_wanted_from_peer_is_fetched():
    ws = WorkerState(address=ME, nthreads=1)
    ws.handle(compute("blocker"))
    ws.handle(compute("a"))
    out = ws.handle(compute("x", deps={"a": [PEER_A]}))
    assert state_of(ws, "a") == "flight"
    assert of_type(out, GatherDep)[0].keys == ("a",)


def test_remove_replicas_drops_unneeded_copies_and_keeps_needed_ones():
    ws = WorkerState(address=ME)
    make_ready_with_value(ws, "spare")
    make_ready_with_value(ws, "needed")
    ws.handle(compute("x", deps={"needed": [ME], "other": [PEER_A]}))
    out = ws.handle(RemoveReplicas(keys=["spare", "needed", "other", "unknown"], stimulus_id=sid()))
    assert sorted(m["op"] for m in messages(out)) == ["add-keys", "release-worker-data"]
    assert messages(out, "add-keys")[0]["keys"] == ["needed"]
    assert messages(out, "release-worker-data")[0]["key"] == "spare"
    assert "spare" not in ws.data and "needed" in ws.data
    assert state_of(ws, "other") == "flight"


def test_cancel_compute_only_before_execution():
    ws = WorkerState(address=ME, nthreads=1)
    ws.handle(compute("running"))
    ws.handle(compute("queued"))
    assert ws.handle(CancelCompute(key="queued", stimulus_id=sid())) == []
    assert "queued" not in ws.tasks
    ws.handle(CancelCompute(key="running", stimulus_id=sid()))
    ws.handle(CancelCompute(key="unknown", stimulus_id=sid()))
    assert state_of(ws, "running") == "executing"


def test_freeing_a_dependency_sends_ready_dependents_back_to_waiting():
    ws = WorkerState(address=ME, nthreads=1)
    ws.handle(compute("blocker"))
    make_ready_with_value(ws, "a")  # queued behind blocker, then run
    ws.handle(success("blocker"))
    ws.handle(compute("blocker2"))
    ws.handle(success("a"))
    ws.handle(compute("x", deps={"a": [ME]}))
    assert state_of(ws, "x") == "ready"
    ws.handle(FreeKeys(keys=["a"], stimulus_id=sid()))
    assert state_of(ws, "x") == "waiting"
    assert executed_keys(ws.handle(success("blocker2"))) == []


def test_update_data_stores_values_without_telling_the_scheduler():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A], "b": []}))
    assert state_of(ws, "b") == "missing"
    out = ws.handle(UpdateData(data={"b": 2, "c": 3}, nbytes={"b": 10}, stimulus_id=sid()))
    assert messages(out) == []
    assert ws.data == {"b": 2, "c": 3}
    assert ws.missing == set()
    assert ws.nbytes == 10 + DEFAULT_NBYTES
    # Overwriting a value keeps the byte count right.
    ws.handle(UpdateData(data={"c": 4}, nbytes={"c": 1}, stimulus_id=sid()))
    assert ws.data["c"] == 4 and ws.nbytes == 11
    assert executed_keys(ws.handle(gathered(PEER_A, {"a": 1}))) == ["x"]


def test_update_data_leaves_running_work_alone():
    ws = WorkerState(address=ME)
    ws.handle(compute("x"))
    assert ws.handle(UpdateData(data={"x": 1}, stimulus_id=sid())) == []
    assert state_of(ws, "x") == "executing" and ws.data == {}


def test_stray_shell_events_are_ignored():
    ws = WorkerState(address=ME)
    assert ws.handle(success("nothing")) == []
    assert ws.handle(failure("nothing")) == []
    assert ws.handle(Secede(key="nothing", compute_duration=1, stimulus_id=sid())) == []
    assert ws.handle(gathered(PEER_A, {"a": 1})) == []
    assert ws.handle(GatherDepNetworkFailure(worker=PEER_A, stimulus_id=sid())) == []
    assert ws.tasks == {} and ws.data == {}


# --------------------------------------------------------------------- status


def test_paused_worker_starts_no_tasks_or_transfers():
    ws = WorkerState(address=ME, nthreads=2)
    out = ws.handle(Pause(stimulus_id="p"))
    assert messages(out) == [{"op": "worker-status-change", "status": "paused", "stimulus_id": "p"}]
    assert not ws.running
    out = ws.handle(compute("x"), compute("y", deps={"a": [PEER_A]}))
    assert executed_keys(out) == [] and of_type(out, GatherDep) == []
    out = ws.handle(Unpause(stimulus_id="u"))
    assert messages(out)[0] == {
        "op": "worker-status-change",
        "status": "running",
        "stimulus_id": "u",
    }
    assert executed_keys(out) == ["x"]
    assert len(of_type(out, GatherDep)) == 1


def test_paused_worker_lets_running_work_finish():
    ws = WorkerState(address=ME, nthreads=1)
    ws.handle(compute("x"), compute("y"))
    ws.handle(WorkerStatusChange(status="paused", stimulus_id=sid()))
    out = ws.handle(success("x"))
    assert [m["op"] for m in messages(out)] == ["task-finished"]
    assert executed_keys(out) == []


def test_scheduler_status_changes_are_confirmed():
    ws = WorkerState(address=ME)
    for status in ["paused", "running", "closing_gracefully"]:
        [msg] = messages(ws.handle(WorkerStatusChange(status=status, stimulus_id="s")))
        assert msg == {"op": "worker-status-change", "status": status, "stimulus_id": "s"}
        assert ws.status == status
    assert executed_keys(ws.handle(compute("x"))) == []  # retiring: nothing new starts
    # Pause and Unpause from the memory monitor do not override retirement.
    assert ws.handle(Pause(stimulus_id=sid()), Unpause(stimulus_id=sid())) == []
    [msg] = messages(ws.handle(WorkerStatusChange(status="bogus", stimulus_id="s")))
    assert msg["status"] == "closing_gracefully"
    assert executed_keys(ws.handle(WorkerStatusChange(status="running", stimulus_id="s"))) == ["x"]


def test_close_stops_everything_and_tells_the_shell():
    ws = WorkerState(address=ME)
    out = ws.handle(scheduler_message_to_event({"op": "close", "reason": "scheduler-close"}))
    assert out == [CloseWorker(reason="scheduler-close", stimulus_id="close-from-scheduler")]
    assert executed_keys(ws.handle(compute("x"))) == []
    [msg] = messages(ws.handle(WorkerStatusChange(status="running", stimulus_id="s")))
    assert msg["status"] == "closing"


# --------------------------------------------------------------- introspection


def test_summary_and_repr_count_tasks_per_state():
    ws = WorkerState(address=ME, nthreads=2)
    assert repr(ws) == f"<WorkerState {ME} running, 0/2 threads busy, no tasks>"
    make_ready_with_value(ws, "m")
    ws.handle(compute("e"))
    ws.handle(compute("w", deps={"f": [PEER_A], "g": []}))
    assert ws.summary() == {
        "executing": 1,
        "flight": 1,
        "memory": 1,
        "missing": 1,
        "waiting": 1,
    }
    assert repr(ws) == (
        f"<WorkerState {ME} running, 1/2 threads busy, "
        "executing: 1, flight: 1, memory: 1, missing: 1, waiting: 1>"
    )


def test_story_lists_the_transitions_of_a_key():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    ws.handle(gathered(PEER_A, {"a": 1}))
    ws.handle(success("x"))
    ws.handle(FreeKeys(keys=["x", "a"], stimulus_id="free"))
    assert [(start, end) for _, start, end, _ in ws.story("a")] == [
        ("released", "fetch"),
        ("fetch", "flight"),
        ("flight", "memory"),
        ("memory", "released"),
        ("released", "forgotten"),
    ]
    assert ws.story("x")[-1] == ("x", "released", "forgotten", "free")


def test_executing_durations_are_timed_from_the_clock_the_shell_passes():
    ws = WorkerState(address=ME, nthreads=2)
    ws.handle(compute("x"), now=100.0)
    ws.handle(compute("y"), now=101.0)
    ws.handle(Secede(key="y", compute_duration=0.5, stimulus_id=sid()), now=102.0)
    assert ws.executing_durations(now=104.0) == {"x": 4.0, "y": 3.0}
    ws.handle(success("x"), now=105.0)
    assert ws.executing_durations(now=106.0) == {"y": 5.0}
    ws.handle(compute("z"))  # no clock: started, but of unknown duration
    assert executed_keys(ws.handle(success("y", run_id=1))) == []
    assert ws.executing_durations(now=107.0) == {}


def actor_task(key: str, *, deps: Mapping[str, Sequence[str]] | None = None) -> ComputeTask:
    event = compute(key, deps=deps)
    return ComputeTask(**{**_fields(event), "actor": True})


def _fields(event: Event) -> dict:
    return {name: getattr(event, name) for name in event.__dataclass_fields__}


def test_actor_task_runs_and_its_instance_is_hosted_outside_data():
    ws = WorkerState(address=ME)
    assert executed_keys(ws.handle(actor_task("a"))) == ["a"]
    instance = object()
    out = ws.handle(success("a", instance, nbytes=40))
    [msg] = messages(out, "task-finished")
    assert msg["key"] == "a" and msg["nbytes"] == 40
    assert ws.actors == {"a": instance} and "a" not in ws.data
    assert state_of(ws, "a") == "memory" and ws.nbytes == 40
    ws.validate()


def test_a_task_depending_on_a_hosted_actor_runs_here():
    ws = WorkerState(address=ME)
    ws.handle(actor_task("a"))
    ws.handle(success("a", object()))
    assert executed_keys(ws.handle(compute("b", deps={"a": []}))) == ["b"]
    ws.validate()


def test_releasing_an_actor_drops_its_instance():
    ws = WorkerState(address=ME)
    ws.handle(actor_task("a"))
    ws.handle(success("a", object()))
    out = ws.handle(FreeKeys(keys=["a"], stimulus_id=sid()))
    assert [m["op"] for m in messages(out)] == ["release-worker-data"]
    assert ws.actors == {} and ws.tasks == {} and ws.nbytes == 0
    ws.validate()


def test_an_actor_that_fails_to_start_errs_like_any_task():
    ws = WorkerState(address=ME)
    ws.handle(actor_task("a"))
    out = ws.handle(failure("a"))
    assert [m["op"] for m in messages(out)] == ["task-erred"]
    assert ws.actors == {} and state_of(ws, "a") == "error"


def test_a_fetched_actor_key_is_a_plain_value_here():
    """Fetched from its host, an actor's key is a proxy, kept in data like any value."""
    ws = WorkerState(address=ME)
    ws.handle(compute("b", deps={"a": [PEER_A]}))
    ws.handle(gathered(PEER_A, {"a": "proxy-of-a"}))
    assert ws.data["a"] == "proxy-of-a" and ws.actors == {}
    ws.validate()


def test_scattering_over_a_hosted_actor_replaces_it_with_the_value():
    ws = WorkerState(address=ME)
    ws.handle(actor_task("a"))
    ws.handle(success("a", object()))
    out = ws.handle(UpdateData(data={"a": 1}, nbytes={"a": 5}, stimulus_id=sid()))
    assert messages(out) == []  # the scheduler learns of scattered keys from the client
    assert ws.actors == {} and ws.data == {"a": 1} and ws.nbytes == 5
    ws.validate()


def test_on_transition_sees_every_change_of_state_as_dask_names_it():
    ws = WorkerState(address=ME)
    seen: list = []
    ws.on_transition = lambda key, start, finish: seen.append((key, start, finish))
    ws.handle(compute("x"))
    ws.handle(success("x"))
    ws.handle(FreeKeys(keys=["x"], stimulus_id=sid()))
    assert seen == [
        ("x", "released", "waiting"),
        ("x", "waiting", "ready"),
        ("x", "ready", "executing"),
        ("x", "executing", "memory"),
        ("x", "memory", "released"),
        ("x", "released", "forgotten"),
    ]
    assert seen == [entry[:3] for entry in ws.log]


def test_the_transition_table_covers_every_state():
    assert set(TRANSITIONS) == set(get_args(State))
    assert all(targets <= set(TRANSITIONS) for targets in TRANSITIONS.values())
    assert TRANSITIONS["forgotten"] == frozenset()


def test_an_impossible_transition_raises_with_the_story():
    ws = WorkerState(address=ME)
    ws.handle(compute("x", deps={"a": [PEER_A]}))
    ts = ws.tasks["x"]
    with pytest.raises(InvalidTransition) as caught:
        ws._set_state(ts, "memory")
    assert (caught.value.key, caught.value.start, caught.value.finish) == ("x", "waiting", "memory")
    assert "'x' cannot go from waiting to memory" in str(caught.value)
    assert "released -> waiting" in str(caught.value)
    assert caught.value.story == ws.story("x")


def test_validate_names_the_task_and_the_broken_invariant():
    ws = WorkerState(address=ME)
    make_ready_with_value(ws, "x")
    ws.validate()
    del ws.data["x"]
    with pytest.raises(
        InvariantViolation, match=r"task 'x': in data or actors iff in memory \(state memory\)"
    ) as caught:
        ws.validate()
    assert caught.value.key == "x" and "executing -> memory" in str(caught.value)


def test_validate_flag_checks_after_every_event():
    ws = WorkerState(address=ME, validate=True)
    make_ready_with_value(ws, "x")
    ws.nbytes += 1
    with pytest.raises(InvariantViolation, match="nbytes"):
        ws.handle(compute("y"))
    assert WorkerState(address=ME).validate_each_event is False


def test_shared_data_mapping_is_used_by_reference():
    store: dict = {}
    ws = WorkerState(address=ME, data=store)
    make_ready_with_value(ws, "x", 3)
    assert store == {"x": 3}


# ------------------------------------------------------ random scheduler sequences

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

CHAOS_KEYS = ("a", "b", "c", "d", ("e", 0))
CHAOS_PEERS = (PEER_A, PEER_B, PEER_C)
chaos_keys = st.sampled_from(CHAOS_KEYS)
chaos_holders = st.lists(st.sampled_from((*CHAOS_PEERS, ME)), max_size=3, unique=True)
chaos_who_has = st.dictionaries(chaos_keys, chaos_holders, max_size=3)


class SchedulerChaos(RuleBasedStateMachine):
    """Feed arbitrary scheduler messages, and shell events that a correct shell could
    send, and check after every step that the bookkeeping is consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.ws = WorkerState(
            address=ME,
            nthreads=2,
            resources={"R": 1},
            transfer_message_bytes_limit=100,
            transfer_incoming_count_limit=2,
            transfer_incoming_bytes_limit=250,
        )
        # What the simulated shell is doing: key -> run_id, and peer -> GatherDep.
        self.executions: dict = {}
        self.seceded: set = set()
        self.gathers: dict[str, GatherDep] = {}
        self.busy_retries: set[str] = set()
        self.run_ids = itertools.count(1)
        # What a worker plugin's transition hook sees: every logged change, in order.
        self.transitions: list = []
        self.ws.on_transition = lambda key, start, finish: self.transitions.append(
            (key, start, finish)
        )

    def feed(self, event: Event) -> None:
        for instruction in self.ws.handle(event):
            assert instruction.stimulus_id == event.stimulus_id
            if isinstance(instruction, Execute):
                self.check_execute(instruction)
                self.executions[instruction.key] = instruction.run_id
            elif isinstance(instruction, GatherDep):
                self.check_gather(instruction)
                self.gathers[instruction.worker] = instruction
            elif isinstance(instruction, RetryBusyWorkerLater):
                self.busy_retries.add(instruction.worker)
            elif isinstance(instruction, SendMessageToScheduler):
                self.check_message(instruction.to_dict(), event)
            else:
                assert isinstance(instruction, DropPeer)

    def check_execute(self, instruction: Execute) -> None:
        assert instruction.key not in self.executions
        ts = self.ws.tasks[instruction.key]
        assert ts.state == "executing"
        assert instruction.run_spec == f"spec-of-{instruction.key}"
        # Every execution starts from ready or constrained, with all inputs at hand.
        _, came_from, _, _ = self.ws.story(instruction.key)[-1]
        assert came_from in ("ready", "constrained")
        assert all(dep.key in self.ws.data or dep.key in self.ws.actors for dep in ts.dependencies)

    def check_gather(self, gather: GatherDep) -> None:
        assert gather.worker not in self.gathers
        assert gather.worker != ME
        assert gather.keys
        assert len(gather.keys) == 1 or gather.total_nbytes <= 100
        assert gather.total_nbytes == sum(self.ws.tasks[k].get_nbytes() for k in gather.keys)
        for key in gather.keys:
            ts = self.ws.tasks[key]
            assert ts.state == "flight" and ts.coming_from == gather.worker

    def check_message(self, msg: dict, event: Event) -> None:
        assert set(msg) == MESSAGE_FIELDS[msg["op"]]
        assert msg["stimulus_id"] == event.stimulus_id
        held = {*self.ws.data, *self.ws.actors}
        if msg["op"] == "task-finished":
            assert msg["key"] in held
        elif msg["op"] == "release-worker-data":
            assert msg["key"] not in held
        elif msg["op"] == "add-keys":
            assert all(key in held for key in msg["keys"])
        elif msg["op"] == "request-refresh-who-has":
            assert msg["keys"]

    # --------------------------------------------------------- scheduler messages

    @rule(
        key=chaos_keys,
        who_has=chaos_who_has,
        priority=st.integers(-2, 2),
        constrained=st.booleans(),
        nbytes=st.integers(1, 200),
        actor=st.booleans(),
    )
    def compute_task(self, key, who_has, priority, constrained, nbytes, actor):
        self.feed(
            ComputeTask(
                key=key,
                run_id=next(self.run_ids),
                run_spec=f"spec-of-{key}",
                priority=(priority,),
                who_has=who_has,
                nbytes=dict.fromkeys(who_has, nbytes),
                resource_restrictions={"R": 1} if constrained else {},
                actor=actor,
                stimulus_id=sid(),
            )
        )

    @rule(keys=st.lists(chaos_keys, max_size=3))
    def free_keys(self, keys):
        self.feed(FreeKeys(keys=keys, stimulus_id=sid()))

    @rule(who_has=chaos_who_has, nbytes=st.integers(1, 200))
    def acquire_replicas(self, who_has, nbytes):
        self.feed(
            AcquireReplicas(
                who_has=who_has, nbytes=dict.fromkeys(who_has, nbytes), stimulus_id=sid()
            )
        )

    @rule(keys=st.lists(chaos_keys, max_size=3))
    def remove_replicas(self, keys):
        self.feed(RemoveReplicas(keys=keys, stimulus_id=sid()))

    @rule(key=chaos_keys)
    def steal_request(self, key):
        self.feed(StealRequest(key=key, stimulus_id=sid()))

    @rule(who_has=chaos_who_has)
    def refresh_who_has(self, who_has):
        self.feed(RefreshWhoHas(who_has=who_has, stimulus_id=sid()))

    @rule(key=chaos_keys)
    def cancel_compute(self, key):
        self.feed(CancelCompute(key=key, stimulus_id=sid()))

    @rule(status=st.sampled_from(["running", "paused", "closing_gracefully", "bogus"]))
    def worker_status_change(self, status):
        self.feed(WorkerStatusChange(status=status, stimulus_id=sid()))

    @rule(worker=st.sampled_from(CHAOS_PEERS))
    def remove_worker(self, worker):
        self.feed(RemoveWorker(worker=worker, stimulus_id=sid()))

    # ---------------------------------------------------------------- shell events

    @rule(pause=st.booleans())
    def memory_monitor(self, pause):
        self.feed(Pause(stimulus_id=sid()) if pause else Unpause(stimulus_id=sid()))

    @rule()
    def find_missing(self):
        self.feed(FindMissing(stimulus_id=sid()))

    @rule(
        keys=st.lists(chaos_keys, min_size=1, max_size=2),
        nbytes=st.none() | st.integers(1, 200),
    )
    def update_data(self, keys, nbytes):
        data = {key: f"scattered-{key}" for key in keys}
        sizes = {} if nbytes is None else dict.fromkeys(keys, nbytes)
        self.feed(UpdateData(data=data, nbytes=sizes, stimulus_id=sid()))

    @precondition(lambda self: self.executions)
    @rule(data=st.data(), outcome=st.sampled_from(["success", "failure", "reschedule"]))
    def finish_execution(self, data, outcome):
        key = data.draw(st.sampled_from(sorted(self.executions, key=repr)))
        run_id = self.executions.pop(key)
        self.seceded.discard(key)
        if outcome == "success":
            ts = self.ws.tasks[key]
            value = {"actor-instance": key} if ts.actor else None
            self.feed(success(key, value, run_id=run_id, nbytes=50))
        elif outcome == "failure":
            self.feed(failure(key, run_id=run_id))
        else:
            self.feed(RescheduleRequested(key=key, run_id=run_id, stimulus_id=sid()))

    @precondition(lambda self: set(self.executions) - self.seceded)
    @rule(data=st.data())
    def secede(self, data):
        key = data.draw(st.sampled_from(sorted(set(self.executions) - self.seceded, key=repr)))
        self.seceded.add(key)
        self.feed(Secede(key=key, compute_duration=1.0, stimulus_id=sid()))

    @precondition(lambda self: self.gathers)
    @rule(
        data=st.data(),
        outcome=st.sampled_from(["all", "some", "busy", "network", "failure"]),
    )
    def finish_gather(self, data, outcome):
        worker = data.draw(st.sampled_from(sorted(self.gathers)))
        keys = self.gathers.pop(worker).keys
        if outcome == "all":
            event: Event = gathered(worker, {key: f"fetched-{key}" for key in keys})
        elif outcome == "some":
            some = data.draw(st.lists(st.sampled_from(keys), unique=True))
            event = gathered(worker, {key: f"fetched-{key}" for key in some})
        elif outcome == "busy":
            event = GatherDepBusy(worker=worker, stimulus_id=sid())
        elif outcome == "network":
            event = GatherDepNetworkFailure(worker=worker, stimulus_id=sid())
        else:
            event = GatherDepFailure(
                worker=worker,
                exception=b"e",
                traceback=None,
                exception_text="e",
                traceback_text="",
                stimulus_id=sid(),
            )
        self.feed(event)

    @precondition(lambda self: self.busy_retries)
    @rule(data=st.data())
    def retry_busy_worker(self, data):
        worker = data.draw(st.sampled_from(sorted(self.busy_retries)))
        self.busy_retries.discard(worker)
        self.feed(RetryBusyWorker(worker=worker, stimulus_id=sid()))

    # ------------------------------------------------------------------ invariants

    @invariant()
    def bookkeeping_is_consistent(self):
        self.ws.validate()

    @invariant()
    def the_transition_hook_saw_what_the_story_logged(self):
        assert [entry[:3] for entry in self.ws.log] == self.transitions[-len(self.ws.log) :]

    @invariant()
    def hosted_actors_are_the_instances_their_tasks_computed(self):
        for key, instance in self.ws.actors.items():
            assert instance == {"actor-instance": key}

    @invariant()
    def bookkeeping_matches_the_shell(self):
        ws = self.ws
        assert {ts.key for ts in ws.executing | ws.long_running} == set(self.executions)
        assert {ts.key for ts in ws.long_running} == self.seceded
        assert set(ws.in_flight_workers) == set(self.gathers)
        assert ws.transfer_incoming_bytes == sum(g.total_nbytes for g in self.gathers.values())
        in_flight = {(g.worker, key) for g in self.gathers.values() for key in g.keys}
        assert {(ts.coming_from, ts.key) for ts in ws.in_flight_tasks} == in_flight


TestSchedulerChaos = SchedulerChaos.TestCase
TestSchedulerChaos.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
