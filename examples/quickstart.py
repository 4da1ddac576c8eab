"""Quickstart: a local dask cluster of clusterlaunch workers, used by the stock client.

Run it with ``python examples/quickstart.py``. No ``if __name__ == "__main__":``
guard is needed: workers are forked from a helper process that never re-imports
this script.
"""

import time

from clusterlaunch import LocalCluster

started = time.perf_counter()
with LocalCluster(n=4) as cluster, cluster.get_client() as client:
    print(f"scheduler {cluster.scheduler_address} with {len(cluster.workers)} workers")
    print(f"up in {time.perf_counter() - started:.2f} s")

    def square(x):
        return x * x

    futures = client.map(square, range(10))
    total = client.submit(sum, futures).result()
    print(f"sum of squares 0..9 = {total}")
    assert total == 285
