"""BackgroundTasks: what it starts, close() cancels and awaits; failures are logged once."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from procs import run_async, wait_for_async

from clusterlaunch.comm.background import BackgroundTasks


def in_new_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function in a fresh event loop of its own, with a timeout."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        run_async(test(*args, **kwargs))

    return wrapper


@in_new_loop
async def test_close_cancels_and_awaits_every_task_and_timer() -> None:
    tasks = BackgroundTasks("test")
    cleaned: list[str] = []
    fired: list[int] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits still runs to the end
            cleaned.append(name)

    started = [tasks.spawn(forever(f"t{i}"), name=f"t{i}") for i in range(3)]
    tasks.call_later(0.01, fired.append, 1)
    tasks.call_later(3600, fired.append, 2)
    assert len(tasks) == 5
    await wait_for_async(lambda: fired, 10, "the short timer to fire")
    assert fired == [1]
    await tasks.close()
    assert sorted(cleaned) == ["t0", "t1", "t2"]
    assert all(task.cancelled() for task in started)
    assert len(tasks) == 0 and tasks.closed


@in_new_loop
async def test_nothing_new_starts_after_close() -> None:
    tasks = BackgroundTasks("test")
    await tasks.close()

    async def work() -> None:
        raise AssertionError("must never run")

    with pytest.raises(RuntimeError, match="test is closed"):
        tasks.spawn(work())
    with pytest.raises(RuntimeError, match="test is closed"):
        tasks.call_later(0, print)


@in_new_loop
async def test_a_failed_task_is_logged_once_and_close_still_works(caplog) -> None:
    tasks = BackgroundTasks("owner-x")

    async def boom() -> None:
        raise ValueError("broken")

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "background task boom failed" in r.getMessage()]

    with caplog.at_level(logging.ERROR, logger="clusterlaunch.comm.background"):
        tasks.spawn(boom(), name="boom")
        records = await wait_for_async(failures, 10, "the failure to be logged")
    assert len(records) == 1 and "owner-x" in records[0].getMessage()
    await tasks.close()


@in_new_loop
async def test_close_from_inside_an_owned_task_does_not_cancel_itself() -> None:
    tasks = BackgroundTasks("test")
    other = tasks.spawn(asyncio.sleep(3600))

    async def closer() -> str:
        await tasks.close()
        return "closed"

    task = tasks.spawn(closer())
    assert await task == "closed"
    assert other.cancelled()


@in_new_loop
async def test_a_task_that_swallows_cancellation_is_named_after_the_timeout(caplog) -> None:
    tasks = BackgroundTasks("test")
    release = asyncio.Event()
    started = asyncio.Event()

    async def stubborn() -> None:
        started.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = tasks.spawn(stubborn(), name="stubborn")
    await started.wait()
    with caplog.at_level(logging.WARNING, logger="clusterlaunch.comm.background"):
        await tasks.close(timeout=0.05)
    assert "stubborn" in caplog.text
    release.set()
    await task


@in_new_loop
async def test_a_task_that_swallowed_one_cancel_is_cancelled_again(caplog) -> None:
    # asyncio.wait_for before Python 3.12 swallows a cancel that lands as its call
    # completes; the task then runs on, and close must cancel it once more.
    tasks = BackgroundTasks("test")
    cancels: list[int] = []

    async def swallows_the_first() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels.append(1)
                if len(cancels) > 1:
                    raise

    task = tasks.spawn(swallows_the_first(), name="swallows")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="clusterlaunch.comm.background"):
        await tasks.close(timeout=10)
    assert task.cancelled() and len(cancels) == 2
    assert "still running" not in caplog.text
