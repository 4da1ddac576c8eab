"""pytest fixtures for code that runs on a dask cluster (registered as ``pytest11``).

* ``local_cluster``: a fresh ``LocalCluster`` (embedded scheduler + our workers) per
  test, sized by ``@pytest.mark.clusterlaunch(n=2, nthreads=1, ...)`` -- any keyword
  of ``LocalCluster`` goes;
* ``dask_client``: a ``distributed.Client`` on ``local_cluster``;
* ``shared_local_cluster`` / ``shared_dask_client``: one cluster and client for the
  whole session, for fast suites (size them with the ``clusterlaunch_shared_n`` and
  ``clusterlaunch_shared_nthreads`` ini options). Tests sharing them share workers'
  memory too, so they should not rely on a clean cluster.

Everything a fixture starts is stopped when it ends: no process and no port
outlives the test (or, for the shared ones, the session).

This module is imported by every pytest run in an environment where clusterlaunch
is installed, so it imports nothing heavy until a fixture is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

MARKER = "clusterlaunch"
DEFAULT_N = 2


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "clusterlaunch_shared_n", "workers of shared_local_cluster", default=str(DEFAULT_N)
    )
    parser.addini(
        "clusterlaunch_shared_nthreads", "threads per worker of shared_local_cluster", default="1"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(n=2, nthreads=1, **options): size the local_cluster fixture "
        "(options are LocalCluster's keywords)",
    )


def _cluster_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    # No dashboard unless a marker asks (dashboard_address=":0"): it doubles the start.
    options: dict[str, Any] = {"n": DEFAULT_N, "dashboard_address": None}
    # The closest marker wins: a test's over its class's over its module's.
    for marker in reversed(list(request.node.iter_markers(MARKER))):
        if marker.args:
            raise pytest.UsageError(
                f"@pytest.mark.{MARKER} takes keywords only, e.g. {MARKER}(n=2, nthreads=1)"
            )
        options.update(marker.kwargs)
    return options


@pytest.fixture
def local_cluster(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A ``clusterlaunch.LocalCluster`` for this test; see ``@pytest.mark.clusterlaunch``."""
    from clusterlaunch.cluster import LocalCluster

    with LocalCluster(**_cluster_options(request)) as cluster:
        yield cluster


@pytest.fixture
def dask_client(local_cluster: Any) -> Iterator[Any]:
    """A ``distributed.Client`` connected to ``local_cluster``."""
    with local_cluster.get_client() as client:
        yield client


@pytest.fixture(scope="session")
def shared_local_cluster(pytestconfig: pytest.Config) -> Iterator[Any]:
    """One ``LocalCluster`` for the whole session."""
    from clusterlaunch.cluster import LocalCluster

    n = int(pytestconfig.getini("clusterlaunch_shared_n"))
    nthreads = int(pytestconfig.getini("clusterlaunch_shared_nthreads"))
    with LocalCluster(n=n, nthreads=nthreads, dashboard_address=None) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def shared_dask_client(shared_local_cluster: Any) -> Iterator[Any]:
    """One ``distributed.Client`` on ``shared_local_cluster`` for the whole session."""
    with shared_local_cluster.get_client() as client:
        yield client
