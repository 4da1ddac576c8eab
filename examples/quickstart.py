"""Quickstart: a dask.array computation on 4 clusterlaunch workers under the embedded
dask scheduler, through the stock ``distributed.Client``.

Run it with ``python examples/quickstart.py``; open the printed dashboard link while
it runs to watch the tasks. No ``if __name__ == "__main__":`` guard is needed:
workers are forked from a helper process that never re-imports this script.
"""

import time

import dask.array as da
from distributed import Client

from clusterlaunch import LocalCluster

started = time.perf_counter()
with LocalCluster(n=4) as cluster, Client(cluster) as client:
    print(f"{len(cluster.workers)} workers up in {time.perf_counter() - started:.2f} s")
    print(f"dashboard: {cluster.dashboard_link or 'none (pip install bokeh)'}")

    x = da.random.default_rng(0).random((4_000, 4_000), chunks=(1_000, 1_000))
    mean = (x + x.T).mean().compute()  # 16 chunks; the transpose moves them between workers
    print(f"mean of x + x.T = {mean:.3f}")
    assert abs(mean - 1.0) < 0.01
