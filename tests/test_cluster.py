"""LocalCluster: an embedded distributed.Scheduler plus our workers, driven by the
real distributed.Client, sync and async; nothing is left running after close."""

from __future__ import annotations

import asyncio

import pytest
from distributed.core import Status
from procs import LocalProcesses, free_port, no_processes_left, registered, wait_for, wait_gone
from tasks import add, block, worker_facts

from clusterlaunch import LocalCluster, SchedulerUnreachable
from clusterlaunch.scheduler import check_scheduler

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def no_processes_left_behind():
    with no_processes_left("the test's processes"):
        yield


def cluster_pids(cluster: LocalCluster) -> list[int]:
    return [
        *cluster.launcher.pids.values(),
        cluster.launcher.fork_server_pid,
        cluster.scheduler_pid,
    ]


def test_local_cluster_computes_scales_and_cleans_up():
    import dask.array as da

    with LocalCluster(n=2) as cluster, cluster.get_client() as client:
        assert len(cluster.workers) == 2
        assert set(cluster.workers) == set(registered(client))
        x = da.arange(10_000, chunks=1_000)
        assert int((x * 2).sum().compute()) == 2 * sum(range(10_000))
        assert len(cluster.scale(3)) == 3
        assert set(cluster.workers) <= set(registered(client))
        gone_worker = cluster.workers[0]
        cluster.remove_workers([gone_worker])
        assert gone_worker not in cluster.workers
        wait_for(lambda: gone_worker not in registered(client), 10, "the worker to leave")
        pids = cluster_pids(cluster)
        address = cluster.scheduler_address
    assert client.status == "closed"
    wait_gone(pids, what="scheduler, fork server and workers")
    with pytest.raises(SchedulerUnreachable):
        check_scheduler(address, 0.2)


def test_dataframe_merge_and_rechunk_work_with_default_config():
    """With a distributed.Client, dask would pick P2P, which our workers can't run:
    while the cluster is up, dask uses the task-based methods unless told otherwise."""
    import dask
    import dask.array as da
    import dask.dataframe as dd
    import pandas as pd

    assert dask.config.get("dataframe.shuffle.method", None) is None
    left = pd.DataFrame({"k": [i % 10 for i in range(200)], "x": range(200)})
    right = pd.DataFrame({"k": range(10), "y": range(10, 20)})
    with LocalCluster(n=2) as cluster, cluster.get_client() as client:
        merged = dd.from_pandas(left, npartitions=4).merge(
            dd.from_pandas(right, npartitions=2), on="k"
        )
        got = client.compute(merged).result(60)
        assert len(got) == 200 and (got.y == got.k + 10).all()
        x = da.ones((400, 400), chunks=(10, 400))
        assert int(x.rechunk((400, 10)).sum().compute()) == 400 * 400
        assert dask.config.get("array.rechunk.method") == "tasks"
        with dask.config.set({"dataframe.shuffle.method": "p2p"}):
            assert dask.config.get("dataframe.shuffle.method") == "p2p"  # the user's word
    assert dask.config.get("dataframe.shuffle.method", None) is None
    assert dask.config.get("array.rechunk.method", None) is None
    with dask.config.set({"array.rechunk.method": "p2p"}), LocalCluster(n=0):
        assert dask.config.get("array.rechunk.method") == "p2p"
        assert dask.config.get("dataframe.shuffle.method") == "tasks"


def test_async_local_cluster():
    async def main() -> list[int]:
        async with LocalCluster(n=1, asynchronous=True) as cluster:
            async with cluster.get_client() as client:
                assert await client.submit(add, 1, 2) == 3
                assert len(await cluster.scale(2)) == 2
                facts = await client.run(worker_facts)
                assert len(facts) == 2
            return cluster_pids(cluster)

    wait_gone(asyncio.run(main()), what="the async cluster's processes")


def test_workers_join_a_running_scheduler_which_close_leaves_running(processes: LocalProcesses):
    address = processes.address
    with LocalCluster(n=1, scheduler=address) as cluster, cluster.get_client() as client:
        assert cluster.scheduler_address == address
        assert cluster.scheduler_pid is None
        assert client.submit(add, 2, 2).result() == 4
        workers = list(cluster.launcher.pids.values())
    wait_gone(workers, what="the workers")
    assert processes.scheduler.alive()
    assert check_scheduler(address, 5)["workers"] == {}


def test_unreachable_scheduler_is_one_clear_error():
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(SchedulerUnreachable, match=f"dask scheduler at {address}"):
        LocalCluster(n=1, scheduler=address, timeout=1)


def test_threads_resources_and_memory_limit_reach_the_scheduler():
    with (
        LocalCluster(n=1, nthreads=2, resources="GPU=2", memory_limit="1GiB") as cluster,
        cluster.get_client() as client,
    ):
        (info,) = registered(client).values()
        assert info["nthreads"] == 2
        assert info["resources"] == {"GPU": 2}
        assert info["memory_limit"] == 2**30
        assert client.submit(add, 1, 1, resources={"GPU": 1}).result() == 2


def test_context_manager_kind_must_match():
    with pytest.raises(ValueError, match="n must be"):
        LocalCluster(n=-1)

    async def main() -> None:
        cluster = LocalCluster(n=0, asynchronous=True)  # not started until awaited
        with pytest.raises(TypeError, match="async with"), cluster:
            pass
        await cluster.close()
        assert cluster.status == Status.closed

    asyncio.run(main())


def test_distributed_client_of_the_cluster_as_dask_tutorials_connect():
    import dask.array as da
    from distributed import Client

    with LocalCluster(n=2, dashboard_address=None) as cluster:
        assert cluster.status == Status.running
        with Client(cluster) as client:
            assert client.cluster is cluster
            x = da.ones((1_000, 1_000), chunks=250)
            assert int((x + x.T).sum().compute()) == 2_000_000
            cluster.wait_for_workers(2, timeout=30)
            assert set(cluster.scheduler_info["workers"]) == set(cluster.workers)
            assert all(w in cluster._repr_html_() for w in cluster.workers)
            logs = cluster.get_logs()
            assert {"Cluster", "Scheduler", *cluster.workers} <= set(logs)
            assert cluster.dashboard_link == ""
            assert "dashboard" not in repr(cluster)
        pids = cluster_pids(cluster)
    assert cluster.status == Status.closed
    wait_gone(pids, what="the cluster's processes")


def test_adapt_follows_the_schedulers_adaptive_target(tmp_path):
    flag = str(tmp_path / "go")
    with LocalCluster(n=0, dashboard_address=None) as cluster, cluster.get_client() as client:
        adaptive = cluster.adapt(minimum=1, maximum=2, interval="100ms", target_duration="1s")
        wait_for(lambda: len(cluster.workers) == 1, 30, "adapt to start the minimum")
        futures = [client.submit(block, flag, 60, value=i, pure=False) for i in range(6)]
        wait_for(lambda: len(cluster.workers) == 2, 30, "adapt to scale up to the maximum")
        (tmp_path / "go").touch()
        assert sorted(client.gather(futures)) == list(range(6))
        wait_for(lambda: len(registered(client)) == 1, 30, "adapt to scale back down")
        wait_for(lambda: len(cluster.workers) == 1, 30, "the retired worker's process to go")
        adaptive.stop()


def test_async_cluster_with_distributed_client():
    from distributed import Client

    async def main() -> list[int]:
        async with LocalCluster(n=1, asynchronous=True, dashboard_address=None) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                assert await client.submit(add, 2, 3) == 5
                await cluster.scale(2)
                await cluster.wait_for_workers(2, timeout=30)
                logs = await cluster.get_logs(cluster=False, scheduler=False)
                assert set(logs) == set(cluster.workers)
            return cluster_pids(cluster)

    wait_gone(asyncio.run(main()), what="the async cluster's processes")
