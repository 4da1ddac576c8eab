"""The dask-worker surface: tasks that talk to the worker they run on through
distributed (get_worker, get_client, worker_client, secede/rejoin, Lock, Semaphore,
MultiLock, Queue, Variable, Event), on our workers and on a cluster that mixes ours
with a stock ``dask worker``; and a plain workload that never imports distributed.

Task functions live in ``surface_tasks`` (which imports distributed) and ``tasks``
(which does not), pickled by reference.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import surface_tasks as st
import tasks
from distributed import Client, Queue, Variable
from procs import LocalProcesses, worker_address

pytestmark = pytest.mark.timeout(120)

RESULT_TIMEOUT = 60


def _loaded_distributed(client: Client) -> dict[str, list[str]]:
    """The distributed modules each worker has loaded (the function goes by value: by
    reference, loading this module would import distributed there)."""
    return client.run(
        lambda: sorted(m for m in sys.modules if m.partition(".")[0] == "distributed")
    )


class Cluster:
    def __init__(self, procs: LocalProcesses, client: Client, ours: list[str], stock: list[str]):
        self.procs = procs
        self.client = client
        self.ours = ours
        self.stock = stock


@contextmanager
def _running(ours: int, stock: int) -> Iterator[Cluster]:
    """A scheduler, ``ours`` of our one-thread workers, ``stock`` stock ones, a client."""
    with LocalProcesses() as procs:
        procs.start_scheduler()
        our_procs = [procs.start_worker("--nthreads", "1") for _ in range(ours)]
        stock_procs = [procs.start_worker("--nthreads", "1", stock=True) for _ in range(stock)]
        client = Client(procs.address, timeout=30, set_as_default=False)
        try:
            yield Cluster(
                procs,
                client,
                [worker_address(client, p) for p in our_procs],
                [worker_address(client, p) for p in stock_procs],
            )
        finally:
            client.close()


@pytest.fixture(scope="module")
def ours() -> Iterator[Cluster]:
    """A scheduler and two of our one-thread workers."""
    with _running(ours=2, stock=0) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def mixed() -> Iterator[Cluster]:
    """A scheduler, one of our one-thread workers and one stock one."""
    with _running(ours=1, stock=1) as cluster:
        yield cluster


def test_a_plain_workload_leaves_distributed_unimported() -> None:
    """Registering, plain tasks and transfers never import distributed in a worker."""
    with _running(ours=2, stock=0) as cluster:
        client = cluster.client
        a, b = cluster.ours
        x = client.submit(tasks.big_array, 2_000_000, 1, workers=[a])
        y = client.submit(tasks.checksum, x, workers=[b])
        assert y.result(RESULT_TIMEOUT)[1] == 2_000_000
        assert _loaded_distributed(client) == dict.fromkeys(cluster.ours, [])
        # The first task that names distributed imports it, once, there only.
        where = client.submit(st.worker_identity, workers=[a]).result(RESULT_TIMEOUT)
        assert where["address"] == a
        loaded = _loaded_distributed(client)
        assert loaded[a] and not loaded[b]


def test_get_worker_is_ours_and_knows_its_task(ours: Cluster) -> None:
    client = ours.client
    a = ours.ours[0]
    future = client.submit(st.worker_identity, workers=[a], pure=False)
    info = future.result(RESULT_TIMEOUT)
    assert info["address"] == a
    assert info["nthreads"] == 1
    assert info["type"] == "clusterlaunch.worker.surface.DaskWorker"
    assert info["scheduler"] == ours.procs.address
    assert info["key"] == future.key


def test_tasks_importing_distributed_in_their_bodies_find_their_worker(tmp_path: Path) -> None:
    """Two tasks running at once on a fresh two-thread worker each import distributed in
    their bodies (not while unpickling): the one whose import comes second was already
    running when distributed arrived, and finds its worker all the same."""
    with LocalProcesses() as procs:
        procs.start_scheduler()
        proc = procs.start_worker("--nthreads", "2")
        client = Client(procs.address, timeout=30, set_as_default=False)
        try:
            address = worker_address(client, proc)
            futures = client.map(
                tasks.imports_distributed_in_body,
                [str(tmp_path / "arrived")] * 2,
                [2] * 2,
                pure=False,
            )
            assert client.gather(futures) == [address, address]
        finally:
            client.close()


def test_worker_client_parents_do_not_deadlock(ours: Cluster) -> None:
    """Three parents on two one-thread workers, each gathering children from inside its
    task: only seceding frees the slots the children need."""
    client = ours.client
    parents = [client.submit(st.gather_children, 5, 10 * i, pure=False) for i in range(3)]
    assert client.gather(parents) == [sum(range(10 * i + 1, 10 * i + 6)) for i in range(3)]


def test_get_client_submit_secede_rejoin(ours: Cluster) -> None:
    client = ours.client
    futures = client.map(st.submit_and_wait, range(20), pure=False)
    assert client.gather(futures) == [x + 1 for x in range(20)]


def test_tasks_of_one_worker_share_its_client(ours: Cluster) -> None:
    client = ours.client
    a = ours.ours[0]
    seen = client.gather(
        [client.submit(st.client_identity, workers=[a], pure=False) for _ in range(4)]
    )
    assert len({client_id for client_id, _ in seen}) == 1
    assert {address for _, address in seen} == {ours.procs.address}


def test_async_task_gets_its_worker_and_an_async_client(ours: Cluster) -> None:
    client = ours.client
    a = ours.ours[0]
    got = client.submit(st.async_identity, workers=[a], pure=False).result(RESULT_TIMEOUT)
    assert got == (a, True, 42)


@pytest.mark.parametrize("cluster_name", ["ours", "mixed"])
def test_lock_serialises_tasks(
    cluster_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    cluster: Cluster = request.getfixturevalue(cluster_name)
    client = cluster.client
    counter = tmp_path / "counter"
    counter.write_text("0")
    name = f"lock-{uuid.uuid4().hex}"
    futures = client.map(st.locked_increment, [str(counter)] * 12, [name] * 12, pure=False)
    assert sorted(client.gather(futures)) == list(range(1, 13))
    assert counter.read_text() == "12"


def test_semaphore_and_multilock(ours: Cluster, tmp_path: Path) -> None:
    client = ours.client
    holders = tmp_path / "holders"
    holders.write_text("")
    name = f"sem-{uuid.uuid4().hex}"
    peaks = client.gather(
        client.map(st.semaphore_peak, [str(holders)] * 6, [name] * 6, [1] * 6, pure=False)
    )
    assert peaks == [1] * 6
    names = [f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"]
    assert client.gather(client.map(st.multi_locked, [names] * 4, pure=False)) == [True] * 4


@pytest.mark.parametrize("cluster_name", ["ours", "mixed"])
def test_queue_variable_event_between_tasks(
    cluster_name: str, request: pytest.FixtureRequest
) -> None:
    cluster: Cluster = request.getfixturevalue(cluster_name)
    client = cluster.client
    workers = cluster.ours + cluster.stock
    first, last = workers[0], workers[-1]
    name = uuid.uuid4().hex
    got = client.submit(st.queue_get, f"q-{name}", 3, workers=[last], pure=False)
    put = client.submit(st.queue_put, f"q-{name}", [1, "two", 3.5], workers=[first], pure=False)
    assert put.result(RESULT_TIMEOUT) == 3
    assert got.result(RESULT_TIMEOUT) == [1, "two", 3.5]
    Queue(f"client-q-{name}", client=client).put("from the client")
    assert client.submit(st.queue_get, f"client-q-{name}", 1, pure=False).result(
        RESULT_TIMEOUT
    ) == ["from the client"]

    client.submit(st.variable_set, f"v-{name}", {"x": 1}, workers=[first], pure=False).result(
        RESULT_TIMEOUT
    )
    assert Variable(f"v-{name}", client=client).get(timeout=30) == {"x": 1}
    assert client.submit(st.variable_get, f"v-{name}", workers=[last], pure=False).result(
        RESULT_TIMEOUT
    ) == {"x": 1}

    waiter = client.submit(st.event_wait, f"e-{name}", workers=[first], pure=False)
    client.submit(st.event_set, f"e-{name}", workers=[last], pure=False).result(RESULT_TIMEOUT)
    assert waiter.result(RESULT_TIMEOUT) is True


def test_worker_client_on_a_mixed_cluster(mixed: Cluster) -> None:
    client = mixed.client
    parents = [
        client.submit(st.gather_children, 4, 100 * i, workers=[w], pure=False)
        for i, w in enumerate(mixed.ours + mixed.stock)
    ]
    assert client.gather(parents) == [sum(range(100 * i + 1, 100 * i + 5)) for i in range(2)]


def test_an_attribute_we_lack_says_so(ours: Cluster) -> None:
    client = ours.client

    def transfer_incoming_bytes_limit() -> object:
        from distributed import get_worker

        return get_worker().transfer_incoming_bytes_limit

    with pytest.raises(AttributeError, match="clusterlaunch worker has no 'transfer_incoming"):
        client.submit(transfer_incoming_bytes_limit, pure=False).result(RESULT_TIMEOUT)


def test_pub_sub_says_what_to_use_instead(ours: Cluster) -> None:
    """Pub/Sub (in the releases that still have it) needs a worker extension ours lack."""
    pytest.importorskip("distributed.pubsub")
    with pytest.raises(AttributeError, match=r"Pub/Sub .* use distributed.Queue"):
        ours.client.submit(st.publish, uuid.uuid4().hex, pure=False).result(RESULT_TIMEOUT)


def test_joblib_dask_backend_runs_nested(ours: Cluster) -> None:
    """scikit-learn's GridSearchCV under joblib's dask backend: its tasks call
    get_client() on the worker."""
    sklearn = pytest.importorskip("sklearn")
    from joblib import parallel_backend
    from sklearn.datasets import make_classification
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    del sklearn
    X, y = make_classification(n_samples=120, n_features=6, random_state=0)
    search = GridSearchCV(SVC(), {"C": [0.1, 1.0, 10.0], "kernel": ["linear", "rbf"]}, cv=3)
    with parallel_backend("dask", client=ours.client):
        search.fit(X, y)
    assert len(search.cv_results_["params"]) == 6
    assert 0.5 < search.best_score_ <= 1.0
