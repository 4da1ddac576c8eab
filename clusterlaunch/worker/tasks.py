"""A task as the worker's state machine sees it: its states, the transitions between
them, and what the worker knows about it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

if TYPE_CHECKING:
    from dask.typing import Key

__all__ = [
    "DEFAULT_NBYTES",
    "NO_RUN_ID",
    "RESTING_STATES",
    "TRANSITIONS",
    "InvalidTransition",
    "State",
    "StoryEntry",
    "TaskState",
    "format_story",
]

#: The states of a task on this worker, spelled as dask's worker and scheduler spell them.
State: TypeAlias = Literal[
    "released",
    "waiting",
    "ready",
    "constrained",
    "executing",
    "long-running",
    "rescheduled",
    "memory",
    "error",
    "fetch",
    "flight",
    "missing",
    "cancelled",
    "resumed",
    "forgotten",
]

#: Every transition a task may make: state -> the states it may go to next. The state
#: machine consults it on every change of state. (A resumed task is "resumed" again
#: when the scheduler repeats its compute-task while the transfer still runs.)
TRANSITIONS: dict[State, frozenset[State]] = {
    "released": frozenset({"waiting", "fetch", "missing", "memory", "forgotten"}),
    "waiting": frozenset({"ready", "constrained", "error", "released"}),
    "ready": frozenset({"executing", "waiting", "released"}),
    "constrained": frozenset({"executing", "waiting", "released"}),
    "executing": frozenset({"long-running", "memory", "error", "rescheduled", "cancelled"}),
    "long-running": frozenset({"memory", "error", "rescheduled", "cancelled"}),
    # Passed through on the way to released, so that the story shows why.
    "rescheduled": frozenset({"released"}),
    "memory": frozenset({"released"}),
    "error": frozenset({"released"}),
    "fetch": frozenset({"flight", "missing", "released"}),
    "flight": frozenset({"memory", "fetch", "missing", "error", "cancelled"}),
    "missing": frozenset({"fetch", "released"}),
    # Back to what still runs (adopted again), or resumed towards the other role.
    "cancelled": frozenset({"executing", "long-running", "flight", "resumed", "released"}),
    # Back to what still runs, or on to the role it was resumed towards once that
    # work ends (fetch, missing or waiting if it failed; memory if it succeeded).
    "resumed": frozenset(
        {
            "executing",
            "long-running",
            "flight",
            "resumed",
            "cancelled",
            "memory",
            "fetch",
            "missing",
            "waiting",
        }
    ),
    "forgotten": frozenset(),
}

#: States a task may rest in between events; the others are passed through.
RESTING_STATES: frozenset[State] = frozenset(TRANSITIONS) - {"rescheduled", "forgotten"}

#: One line of a task's story: (key, from state, to state, stimulus_id).
StoryEntry: TypeAlias = tuple["Key", State, State, str]


class InvalidTransition(RuntimeError):
    """A task was to make a transition outside :data:`TRANSITIONS`: a bug here."""

    def __init__(self, key: Key, start: State, finish: State, story: list[StoryEntry]) -> None:
        self.key = key
        self.start = start
        self.finish = finish
        self.story = story
        super().__init__(
            f"task {key!r} cannot go from {start} to {finish}; its story:\n{format_story(story)}"
        )


def format_story(story: list[StoryEntry]) -> str:
    """A task's story as indented lines, for error messages."""
    if not story:
        return "  (none logged)"
    return "\n".join(
        f"  {start} -> {finish}  ({stimulus_id})" for _, start, finish, stimulus_id in story
    )


#: Size assumed for a value whose size nobody told us (dask's default-data-size).
DEFAULT_NBYTES = 1024

#: run_id of a task this worker was never asked to compute.
NO_RUN_ID = -1

_task_counter = itertools.count()


@dataclass(eq=False, repr=False, slots=True)
class TaskState:
    """What this worker knows about one key. Compared and hashed by identity."""

    key: Key
    state: State = "released"
    #: The scheduler's priority plus a local tie-breaker; lower runs (and is fetched) first.
    priority: tuple[int, ...] = ()
    #: Creation order. It breaks ties between equal priorities (the dependencies of one
    #: task share its priority), so that what the worker does never depends on the
    #: iteration order of sets of tasks.
    serial: int = field(default_factory=_task_counter.__next__, init=False)
    run_id: int = NO_RUN_ID
    #: Opaque to the state machine; the shell unpickles and runs it.
    run_spec: object = None
    #: An actor task (``submit(..., actor=True)``): its value, computed here, is the
    #: instance the worker hosts (``WorkerState.actors``).
    actor: bool = False
    annotations: dict = field(default_factory=dict)
    span_id: str | None = None
    resource_restrictions: dict[str, float] = field(default_factory=dict)
    #: Resources taken when the current execution started; given back when it ends.
    held_resources: dict[str, float] = field(default_factory=dict)
    dependencies: set[TaskState] = field(default_factory=set)
    dependents: set[TaskState] = field(default_factory=set)
    #: Dependencies not yet in memory, while this task is waiting.
    waiting_for_data: set[TaskState] = field(default_factory=set)
    #: Dependents whose ``waiting_for_data`` holds this task.
    waiters: set[TaskState] = field(default_factory=set)
    #: Peers believed to hold the value (never this worker).
    who_has: set[str] = field(default_factory=set)
    coming_from: str | None = None
    nbytes: int | None = None
    value_type: type | None = None
    thread: int | None = None
    startstops: list[dict[str, Any]] = field(default_factory=list)
    #: Pickled exception and traceback of a failure, as the shell produced them.
    exception: bytes | None = None
    traceback: bytes | None = None
    exception_text: str = ""
    traceback_text: str = ""
    #: For cancelled/resumed tasks: what is still running ("executing", "long-running"
    #: or "flight") and, for resumed ones, what to become afterwards.
    previous: State | None = None
    next: State | None = None
    #: When the shell started the current execution (its clock, see ``handle``).
    execution_started: float | None = None

    def get_nbytes(self) -> int:
        return DEFAULT_NBYTES if self.nbytes is None else self.nbytes

    def __repr__(self) -> str:
        shown: str = self.state
        if self.state == "cancelled":
            shown = f"cancelled({self.previous})"
        elif self.state == "resumed":
            shown = f"resumed({self.previous}->{self.next})"
        return f"<TaskState {self.key!r} {shown}>"
