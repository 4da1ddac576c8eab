"""Actors hosted on this worker (``client.submit(Cls, actor=True)``).

The state machine runs an actor task like any task and keeps its value, the instance,
in ``WorkerState.actors``. This module is the rest of what dask's worker does for one:

- ``actor_execute`` calls a method as dask runs it: an ``async def`` method on the
  event loop, any other in the worker's one actor thread (or on the loop when the
  caller passes ``separate_thread=False``); ``actor_attribute`` reads an attribute.
  Both answer ``{"status": "OK", "result": ...}`` or ``{"status": "error",
  "exception": ...}``, which ``distributed.actor.Actor`` unwraps.
- ``get_data`` of an actor's key sends the ``Actor`` proxy, never the instance;
  a task here that depends on an actor gets an ``Actor`` bound to this worker.

Hosting an actor needs distributed (the proxy is a ``distributed.actor.Actor``, and
the methods may call ``get_worker()``): it activates the dask-worker surface.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any

from clusterlaunch.protocol import Serialize, Undecodable
from clusterlaunch.worker import surface
from clusterlaunch.worker.execution import TaskThreads

if TYPE_CHECKING:
    from dask.typing import Key

    from clusterlaunch.worker.worker import Worker

logger = logging.getLogger("clusterlaunch.worker")


class ActorHost:
    """The actor ops of one worker, and the proxies of the actors it hosts."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        #: As dask's worker: one thread runs every actor's (sync) methods, in turn.
        self.thread = TaskThreads(1, name=f"actor-{worker.id}")

    # ------------------------------------------------------------------- the ops

    async def execute(
        self,
        actor: Key | None = None,
        function: str | None = None,
        args: Collection = (),
        kwargs: dict | None = None,
        **_: Any,
    ) -> dict:
        """The ``actor_execute`` op: call ``function`` of the actor ``actor``."""
        try:
            call_args = [_decoded(arg) for arg in args]
            call_kwargs = {name: _decoded(value) for name, value in (kwargs or {}).items()}
            separate_thread = call_kwargs.pop("separate_thread", True)
            method = getattr(self._instance(actor), str(function))
            facade = self.worker.dask_surface()
            from dask.utils import key_split  # dask's, loaded with the first task

            # As dask names an actor's call in its thread state: "<key prefix>.<method>".
            name = f"{key_split(actor)}.{function}"
            if inspect.iscoroutinefunction(method):
                # On the loop, as dask's worker runs it: only get_worker() is the task's.
                token = surface.TASK_WORKER.set(facade)
                try:
                    result = await method(*call_args, **call_kwargs)
                finally:
                    surface.TASK_WORKER.reset(token)
            elif separate_thread:

                def call() -> Any:
                    leave = facade.enter_task(name, time.time(), actor=True)
                    try:
                        return method(*call_args, **call_kwargs)
                    finally:
                        leave()

                result = await self._in_actor_thread(call)
            else:
                token = surface.TASK_WORKER.set(facade)
                try:
                    result = method(*call_args, **call_kwargs)
                finally:
                    surface.TASK_WORKER.reset(token)
        except Exception as e:
            return {"status": "error", "exception": Serialize(e)}
        return {"status": "OK", "result": Serialize(result)}

    def attribute(self, actor: Key | None = None, attribute: str | None = None, **_: Any) -> dict:
        """The ``actor_attribute`` op: the value of an attribute of the actor ``actor``."""
        try:
            value = getattr(self._instance(actor), str(attribute))
        except Exception as e:
            return {"status": "error", "exception": Serialize(e)}
        return {"status": "OK", "result": Serialize(value)}

    # --------------------------------------------------------------- proxies

    def references(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """What ``get_data`` sends for the hosted actors among ``keys``: each pickles as
        the ``Actor`` proxy, which binds to a client where it is unpickled."""
        actors = self.worker.state.actors
        hosted = [key for key in keys if key in actors]
        if not hosted:
            return {}
        self.worker.dask_surface()
        actor_class = surface.actor_class()
        address = self.worker.address
        return {key: ActorReference(actor_class, type(actors[key]), address, key) for key in hosted}

    def task_inputs(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """The inputs of a task: values from ``data``, and for each hosted actor an
        ``Actor`` bound to this worker, as dask's worker gives a task."""
        state = self.worker.state
        inputs: dict[Key, Any] = {}
        for key in keys:
            if key in state.actors:
                facade = self.worker.dask_surface()
                inputs[key] = surface.actor_class()(
                    type(state.actors[key]), self.worker.address, key, worker=facade
                )
            else:
                inputs[key] = state.data[key]
        return inputs

    def close(self) -> None:
        """End the actor thread if idle; a method still running ends it when it returns."""
        if self.thread.close():
            logger.info(
                "%s: an actor method is still running; its thread ends when it returns",
                self.worker.address,
            )

    # ---------------------------------------------------------------- helpers

    def _instance(self, key: Key | None) -> object:
        try:
            return self.worker.state.actors[_hashable(key)]
        except KeyError:
            raise KeyError(f"no actor {key!r} on the worker {self.worker.address}") from None

    async def _in_actor_thread(self, call: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(outcome: tuple[Any, BaseException | None]) -> None:
            if not done.done():
                value, exc = outcome
                if exc is None:
                    done.set_result(value)
                else:
                    done.set_exception(exc)

        def run() -> None:
            try:
                outcome: tuple[Any, BaseException | None] = (call(), None)
            except Exception as e:
                outcome = (None, e)
            with contextlib.suppress(RuntimeError):  # the loop closed while it ran
                loop.call_soon_threadsafe(settle, outcome)

        self.thread.submit(run)
        return await done


class ActorReference:
    """Pickles as ``actor_class(cls, address, key)``: the ``Actor`` proxy, made only
    where it is unpickled (so that none binds to a client here)."""

    __slots__ = ("actor_class", "address", "cls", "key")

    def __init__(self, actor_class: type, cls: type, address: str, key: Key) -> None:
        self.actor_class = actor_class
        self.cls = cls
        self.address = address
        self.key = key

    def __reduce__(self) -> tuple:
        return (self.actor_class, (self.cls, self.address, self.key))

    def __repr__(self) -> str:
        return f"<ActorReference {self.cls.__name__} {self.key!r} on {self.address}>"


def _decoded(value: Any) -> Any:
    if isinstance(value, Undecodable):
        raise value.error
    return value


def _hashable(key: Any) -> Any:
    """A key as the state machine holds it: tuple keys may arrive as lists."""
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key
