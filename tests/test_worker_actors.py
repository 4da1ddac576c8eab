"""Actors hosted on our workers, through the real scheduler and ``distributed.Client``:
called from the client (methods, attributes, async methods, errors) and from tasks on
the hosting worker, on another of ours and on a stock ``dask worker``; and a task on
our worker using an actor a stock worker hosts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import tasks
from distributed import Client
from distributed.actor import Actor
from procs import LocalProcesses, wait_for, worker_address

pytestmark = pytest.mark.timeout(90)

RESULT_TIMEOUT = 60


@dataclass
class Mixed:
    procs: LocalProcesses
    client: Client
    ours: list[str]
    stock: str


@pytest.fixture(scope="module")
def mixed() -> Iterator[Mixed]:
    """A scheduler, two of our workers (two threads each) and a stock one."""
    with LocalProcesses() as procs:
        procs.start_scheduler()
        workers = [
            procs.start_worker("--nthreads", "2"),
            procs.start_worker("--nthreads", "2"),
            procs.start_worker("--nthreads", "2", stock=True),
        ]
        # The default client: an Actor proxy unpickled here binds to it.
        client = Client(procs.address, timeout=30)
        try:
            addresses = [worker_address(client, w) for w in workers]
            yield Mixed(procs, client, addresses[:2], addresses[2])
            for proc in workers:
                assert proc.alive(), f"{proc.label} died:\n{procs.logs()}"
        finally:
            client.close()


@pytest.fixture
def client(mixed: Mixed) -> Client:
    return mixed.client


def test_an_actor_on_our_worker_from_the_client(mixed: Mixed, client: Client) -> None:
    host = mixed.ours[0]
    future = client.submit(tasks.Counter, 10, actor=True, workers=[host])
    counter = future.result(RESULT_TIMEOUT)
    assert isinstance(counter, Actor)
    assert client.run(tasks.hosted_actors, workers=[host])[host] == [future.key]

    assert counter.increment().result(RESULT_TIMEOUT) == 11
    assert counter.increment(by=5).result(RESULT_TIMEOUT) == 16
    assert counter.n == 16
    assert counter.increment_later(2).result(RESULT_TIMEOUT) == 18
    with pytest.raises(tasks.TaskError, match="the actor's method failed"):
        counter.fail().result(RESULT_TIMEOUT)
    with pytest.raises(AttributeError):
        counter.no_such_attribute  # noqa: B018
    # Sync methods run in the worker's one actor thread, as on dask's workers.
    [thread] = counter.threads
    assert thread.startswith("actor-")
    # get_worker() inside a method names the hosting worker.
    assert counter.where().result(RESULT_TIMEOUT) == host


def test_many_calls_in_flight_run_one_at_a_time(mixed: Mixed, client: Client) -> None:
    counter = client.submit(tasks.Counter, actor=True, workers=[mixed.ours[0]]).result(
        RESULT_TIMEOUT
    )
    calls = [counter.increment() for _ in range(50)]
    assert sorted(call.result(RESULT_TIMEOUT) for call in calls) == list(range(1, 51))
    assert counter.n == 50


@pytest.mark.parametrize("where", ["host", "other of ours", "stock"])
def test_an_actor_on_our_worker_from_a_task(mixed: Mixed, client: Client, where: str) -> None:
    host = mixed.ours[0]
    runner = {"host": host, "other of ours": mixed.ours[1], "stock": mixed.stock}[where]
    future = client.submit(tasks.Counter, actor=True, workers=[host])
    used = client.submit(tasks.use_counter, future, 3, workers=[runner], pure=False)
    assert used.result(RESULT_TIMEOUT) == 3
    assert future.result(RESULT_TIMEOUT).n == 3


def test_a_task_on_our_worker_uses_an_actor_a_stock_worker_hosts(
    mixed: Mixed, client: Client
) -> None:
    future = client.submit(tasks.Counter, 5, actor=True, workers=[mixed.stock])
    used = client.submit(tasks.use_counter, future, 2, workers=[mixed.ours[0]], pure=False)
    assert used.result(RESULT_TIMEOUT) == 7


def test_a_released_actor_is_dropped(mixed: Mixed, client: Client) -> None:
    host = mixed.ours[1]
    future = client.submit(tasks.Counter, actor=True, workers=[host])
    counter = future.result(RESULT_TIMEOUT)
    key = future.key
    assert client.run(tasks.hosted_actors, workers=[host])[host] == [key]
    del future, counter
    wait_for(
        lambda: key not in client.run(tasks.hosted_actors, workers=[host])[host],
        RESULT_TIMEOUT,
        "the actor's release",
    )


def test_an_actor_whose_constructor_fails_errs_like_a_task(mixed: Mixed, client: Client) -> None:
    future = client.submit(tasks.fail, 3, actor=True, workers=[mixed.ours[0]])
    with pytest.raises(tasks.TaskError):
        future.result(RESULT_TIMEOUT)
