"""Testing code that uses dask with the fixtures of clusterlaunch's pytest plugin.

Installing clusterlaunch registers the plugin; run ``pytest examples/test_with_fixtures.py``.

* ``dask_client`` / ``local_cluster``: a fresh cluster per test, sized by
  ``@pytest.mark.clusterlaunch(n=..., nthreads=...)``;
* ``shared_dask_client`` / ``shared_local_cluster``: one cluster for the session.
"""

import dask.bag as db
import pytest


def inc(x):
    return x + 1


def test_futures(dask_client):
    futures = dask_client.map(inc, range(5))
    assert dask_client.gather(futures) == [1, 2, 3, 4, 5]


@pytest.mark.clusterlaunch(n=3, nthreads=2)
def test_sized_cluster(local_cluster, dask_client):
    assert len(local_cluster.workers) == 3
    threads = {w["nthreads"] for w in dask_client.scheduler_info()["workers"].values()}
    assert threads == {2}


def test_bag_on_shared_cluster(shared_dask_client):
    bag = db.from_sequence(range(100), npartitions=4).map(inc).filter(lambda x: x % 2 == 0)
    assert bag.sum().compute() == sum(x for x in range(1, 101) if x % 2 == 0)


def test_scaling_the_shared_cluster_back(shared_local_cluster):
    shared_local_cluster.scale(3)
    assert len(shared_local_cluster.workers) == 3
    shared_local_cluster.scale(2)  # leave it as we found it
