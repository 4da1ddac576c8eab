"""The consistency rules of a :class:`~clusterlaunch.worker.state.WorkerState`.

They hold between events (not within one). Checking them is O(tasks): the property
tests check after every event, a worker only when asked to (a debug flag).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clusterlaunch.worker.tasks import RESTING_STATES, StoryEntry, TaskState, format_story

if TYPE_CHECKING:
    from dask.typing import Key

    from clusterlaunch.worker.state import WorkerState

__all__ = ["InvariantViolation", "check_invariants"]


class InvariantViolation(AssertionError):
    """The bookkeeping of a worker state is inconsistent: a bug in the state machine."""

    def __init__(self, key: Key | None, invariant: str, story: list[StoryEntry]) -> None:
        self.key = key
        self.invariant = invariant
        self.story = story
        about = "worker state" if key is None else f"task {key!r}"
        message = f"{about}: {invariant}"
        if key is not None:
            message += f"; its story:\n{format_story(story)}"
        super().__init__(message)


def check_invariants(ws: WorkerState) -> None:
    """Raise :class:`InvariantViolation` for the first rule ``ws`` breaks."""
    for key, ts in ws.tasks.items():
        if ts.key != key:
            _violated(ws, key, f"filed under the key {key!r}")
        _check_task(ws, ts)
    _check_executions(ws)
    _check_transfers(ws)
    for worker, keys in ws.has_what.items():
        if not keys:
            _violated(ws, None, f"has_what[{worker!r}] is empty")
        for key in keys:
            if key not in ws.tasks or worker not in ws.tasks[key].who_has:
                _violated(ws, key, f"in has_what[{worker!r}] but not held by it in who_has")
    for key in ws.data:
        if key not in ws.tasks:
            _violated(ws, key, "in data but not in tasks")
    _check_actors(ws)
    if ws.nbytes != sum(ws.tasks[key].get_nbytes() for key in (*ws.data, *ws.actors)):
        _violated(ws, None, "nbytes is not the total size of the values in data and actors")


def _violated(ws: WorkerState, key: Key | None, invariant: str) -> None:
    raise InvariantViolation(key, invariant, [] if key is None else ws.story(key))


def _check_task(ws: WorkerState, ts: TaskState) -> None:
    key, state = ts.key, ts.state

    def check(holds: bool, invariant: str) -> None:
        if not holds:
            _violated(ws, key, f"{invariant} (state {state})")

    check(state in RESTING_STATES, "rests in a passing state")
    check(ws.address not in ts.who_has, "lists this worker in who_has")
    for dep in ts.dependencies:
        check(ts in dep.dependents, f"dependency {dep.key!r} lacks it in dependents")
        check(ws.tasks.get(dep.key) is dep, f"dependency {dep.key!r} is not in tasks")
    for dependent in ts.dependents:
        check(ts in dependent.dependencies, f"dependent {dependent.key!r} lacks it")
        check(ws.tasks.get(dependent.key) is dependent, f"dependent {dependent.key!r} not in tasks")
    check(ts.waiting_for_data <= ts.dependencies, "waits for data it does not depend on")
    for dep in ts.waiting_for_data:
        check(ts in dep.waiters, f"waits for {dep.key!r}, which lacks it in waiters")
        check(dep.state != "memory", f"waits for {dep.key!r}, which is in memory")
    for waiter in ts.waiters:
        check(ts in waiter.waiting_for_data, f"waiter {waiter.key!r} does not wait for it")
    for worker in ts.who_has:
        check(key in ws.has_what.get(worker, ()), f"held by {worker!r}, not in has_what")
    check((ts in ws.ready) == (state == "ready"), "in the ready queue iff ready")
    check((ts in ws.constrained) == (state == "constrained"), "in constrained iff constrained")
    check(
        (key in ws.data or key in ws.actors) == (state == "memory"),
        "in data or actors iff in memory",
    )
    check((ts in ws.missing) == (state == "missing"), "in missing iff missing")
    match state:
        case "waiting":
            check(bool(ts.waiting_for_data), "waits for no data")
        case "ready" | "constrained":
            check(
                all(dep.state == "memory" for dep in ts.dependencies),
                "runnable without all its dependencies in memory",
            )
        case "fetch":
            check(bool(ts.who_has), "to fetch from nobody")
            check(
                all(ts in ws.data_needed.get(worker, ()) for worker in ts.who_has),
                "to fetch, but not in data_needed of each holder",
            )
        case "missing":
            check(not ts.who_has, "missing while holders are known")
        case "error":
            check(ts.exception is not None, "in error without an exception")
        case "released":
            check(bool(ts.dependents), "released with no dependents (should be forgotten)")
        case "cancelled" | "resumed":
            check(ws._is_running(ts), "cancelled or resumed while nothing runs")
            expected_next = {None} if state == "cancelled" else {"fetch", "waiting"}
            check(ts.next in expected_next, f"next is {ts.next!r}")


def _check_actors(ws: WorkerState) -> None:
    for key in ws.actors:
        ts = ws.tasks.get(key)
        if ts is None:
            _violated(ws, key, "hosted as an actor but not in tasks")
        elif key in ws.data:
            _violated(ws, key, "both in data and hosted as an actor")
        elif not ts.actor:
            _violated(ws, key, "hosted as an actor but not an actor task")


def _check_executions(ws: WorkerState) -> None:
    if ws.executing & ws.long_running:
        ts = next(iter(ws.executing & ws.long_running))
        _violated(ws, ts.key, "both executing and long-running")
    if len(ws.executing) > ws.nthreads:
        _violated(ws, None, f"{len(ws.executing)} tasks executing on {ws.nthreads} threads")
    running = ws.executing | ws.long_running
    for ts in running:
        if ws.tasks.get(ts.key) is not ts:
            _violated(ws, ts.key, "runs but is not in tasks")
        running_as = "long-running" if ts in ws.long_running else "executing"
        current = ts.previous if ts.state in ("cancelled", "resumed") else ts.state
        if current != running_as:
            _violated(ws, ts.key, f"runs as {running_as} but its state is {ts!r}")
    for name, total in ws.total_resources.items():
        held = sum(ts.held_resources.get(name, 0) for ts in running)
        available = ws.available_resources[name]
        if not 0 <= available <= total or available + held != total:
            _violated(
                ws, None, f"resource {name!r}: {available} available + {held} held != {total}"
            )
    if ws.running and len(ws.executing) < ws.nthreads:
        constrained = ws.constrained.peek()
        if ws.ready or (constrained is not None and ws._resources_available(constrained)):
            _violated(ws, None, "a thread is idle while a task could run")


def _check_transfers(ws: WorkerState) -> None:
    nbytes = sum(gather.total_nbytes for gather in ws.in_flight_workers.values())
    if ws.transfer_incoming_bytes != nbytes:
        _violated(ws, None, "transfer_incoming_bytes is not the size of the transfers")
    if len(ws.in_flight_workers) > ws.transfer_incoming_count_limit:
        _violated(ws, None, "more transfers than transfer_incoming_count_limit")
    if len(ws.in_flight_workers) > 1 and nbytes > ws.transfer_incoming_bytes_limit:
        _violated(ws, None, "transfers together over transfer_incoming_bytes_limit")
    carried = {
        (gather.worker, key) for gather in ws.in_flight_workers.values() for key in gather.keys
    }
    if {(ts.coming_from, ts.key) for ts in ws.in_flight_tasks} != carried:
        _violated(ws, None, "in_flight_tasks are not the keys of the transfers under way")
    for ts in ws.in_flight_tasks:
        if ws.tasks.get(ts.key) is not ts:
            _violated(ws, ts.key, "in flight but not in tasks")
        if ts.state != "flight" and ts.previous != "flight":
            _violated(ws, ts.key, f"in flight but its state is {ts!r}")
    for worker, queue in ws.data_needed.items():
        for ts in queue:
            if ts.state != "fetch" or worker not in ts.who_has:
                _violated(ws, ts.key, f"in data_needed[{worker!r}] but {ts!r} or not held there")
    # With nothing in flight, anything fits: every fetchable key is being fetched.
    if ws.running and not ws.in_flight_workers:
        for ts in ws.tasks.values():
            if ts.state == "fetch" and not ts.who_has <= ws.busy_workers:
                _violated(ws, ts.key, "to fetch from an idle peer while nothing is in flight")
