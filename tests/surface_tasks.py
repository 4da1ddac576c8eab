"""Task functions that use distributed's in-task API (get_worker, get_client,
worker_client, secede, Lock, Queue, ...), pickled by reference.

Unlike ``tasks``, this module imports distributed: loading any of these tasks is what
makes a worker import it. ``imports_distributed_in_body`` lives in ``tasks``, which
does not.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distributed import (
    Event,
    Lock,
    MultiLock,
    Queue,
    Semaphore,
    Variable,
    get_client,
    get_worker,
    rejoin,
    secede,
    worker_client,
)


def inc(x: int) -> int:
    return x + 1


def worker_identity() -> dict[str, Any]:
    worker = get_worker()
    return {
        "address": worker.address,
        "name": worker.name,
        "nthreads": worker.nthreads,
        "type": type(worker).__module__ + "." + type(worker).__qualname__,
        "scheduler": worker.scheduler.address,
        "key": worker.get_current_task(),
    }


def gather_children(n: int, base: int) -> int:
    """A parent that submits ``n`` children from inside its task and waits for them:
    without seceding, parents filling every thread slot deadlock."""
    with worker_client() as client:
        futures = client.map(inc, range(base, base + n), pure=False)
        return sum(client.gather(futures))


def submit_and_wait(x: int) -> int:
    """``get_client().submit`` from a task, waiting seceded (the slot freed meanwhile)."""
    client = get_client()
    future = client.submit(inc, x, pure=False)
    secede()
    value = future.result()
    rejoin()
    return value


def client_identity() -> tuple[str, str]:
    client = get_client()
    return client.id, client.scheduler.address


def locked_increment(path: str, lock_name: str) -> int:
    """Read, pause and write a counter under ``Lock(lock_name)``: without the lock,
    concurrent increments are lost."""
    with Lock(lock_name):
        counter = Path(path)
        value = int(counter.read_text()) + 1
        time.sleep(0.01)
        counter.write_text(str(value))
    return value


def semaphore_peak(path: str, name: str, leases: int) -> int:
    """Hold one of ``leases`` leases briefly; return how many holders there were then."""
    with Semaphore(max_leases=leases, name=name):
        holders = Path(path)
        with holders.open("a") as f:
            f.write("+")
        time.sleep(0.05)
        peak = holders.read_text().count("+") - holders.read_text().count("-")
        with holders.open("a") as f:
            f.write("-")
    return peak


def multi_locked(names: list[str]) -> bool:
    with MultiLock(names=names):
        return True


def queue_put(name: str, values: list[Any]) -> int:
    queue = Queue(name)
    for value in values:
        queue.put(value)
    return len(values)


def queue_get(name: str, n: int) -> list[Any]:
    queue = Queue(name)
    return [queue.get(timeout=30) for _ in range(n)]


def variable_set(name: str, value: Any) -> None:
    Variable(name).set(value)


def variable_get(name: str) -> Any:
    return Variable(name).get(timeout=30)


def event_wait(name: str) -> bool:
    return Event(name).wait(timeout=30)


def event_set(name: str) -> None:
    Event(name).set()


async def async_identity() -> tuple[str, bool, int]:
    """An ``async def`` task asking for its worker and an asynchronous client."""
    worker = get_worker()
    client = get_client()
    value = await client.submit(inc, 41, pure=False)
    return worker.address, client.asynchronous, value
