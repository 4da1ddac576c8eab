"""addprocs-style launching: add workers to a running scheduler, then shut them down.

Like Julia's ``addprocs``/``rmprocs``: ``addprocs(n, scheduler)`` starts n worker
processes for the scheduler and returns their addresses; ``shutdown(addresses)``
asks those workers to terminate and waits until they are gone. ``shutdown`` works
on any dask worker address, also on stock ``dask worker`` processes.
"""

from clusterlaunch import LocalCluster, addprocs, shutdown

# A scheduler with no workers yet. (Any running `dask scheduler` works the same.)
with LocalCluster(n=0) as cluster, cluster.get_client() as client:
    scheduler = cluster.scheduler_address

    first = addprocs(2, scheduler)
    print(f"added {len(first)} workers: {first}")
    more = addprocs(2, scheduler, nthreads=1)
    print(f"added {len(more)} more")
    assert len(client.scheduler_info()["workers"]) == 4

    print("work on 4 workers:", sum(client.gather(client.map(abs, range(-50, 50)))))

    shutdown(first)
    print(f"shut down {first}")
    client.wait_for_workers(2)
    assert set(client.scheduler_info()["workers"]) == set(more)

    shutdown(more)
    print("all workers shut down; the scheduler stays until the cluster closes")
