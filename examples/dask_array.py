"""A dask.array computation on clusterlaunch workers.

Chunks are computed on the workers and moved between them peer to peer, exactly as
with stock dask workers; the client and the scheduler are unmodified ``distributed``.
(Not named ``array.py``: next to the other examples it would shadow the standard
library's ``array`` module, which ``socket`` imports.)
"""

import dask.array as da
import numpy as np

from clusterlaunch import LocalCluster

with LocalCluster(n=2, nthreads=2) as cluster, cluster.get_client() as client:
    x = da.random.default_rng(42).random((2_000, 2_000), chunks=(500, 500))
    y = (x + x.T) / 2  # transpose: chunks travel between workers
    column_means = y.mean(axis=0).compute()
    print(f"{y.numblocks[0] * y.numblocks[1]} chunks, column means ~ {column_means.mean():.3f}")
    assert column_means.shape == (2_000,)
    assert np.allclose(column_means.mean(), 0.5, atol=0.01)

    # Persisted chunks stay on the workers until released.
    y = y.persist()
    print(f"trace = {da.trace(y).compute():.1f}")
