"""The pytest plugin, run in an inner pytest session (pytester) that finds it through
the pytest11 entry point: fixtures work, the marker sizes the cluster, nothing leaks."""

from __future__ import annotations

# Imported here, not first inside an inner in-process session: pytester drops the
# modules an inner run imported, and losing dask's importlib_metadata that way stops
# later inner sessions from finding entry-point plugins at all.
import dask  # noqa: F401
import pytest
from procs import no_processes_left

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(120)

INNER_TESTS = """
import os
import pytest
from operator import add

SEEN = {}


def test_default_cluster(local_cluster, dask_client):
    assert len(local_cluster.workers) == 2
    assert dask_client.submit(add, 1, 2).result() == 3
    SEEN["function"] = local_cluster.scheduler_address


@pytest.mark.clusterlaunch(n=1, nthreads=3)
def test_marker_sizes_the_cluster(local_cluster, dask_client):
    (info,) = dask_client.scheduler_info()["workers"].values()
    assert info["nthreads"] == 3
    # a fresh cluster, not the previous test's
    assert local_cluster.scheduler_address != SEEN["function"]


def test_shared_first(shared_local_cluster, shared_dask_client):
    assert shared_dask_client.submit(add, 2, 2).result() == 4
    SEEN["shared"] = shared_local_cluster.scheduler_address


def test_shared_second(shared_local_cluster):
    assert shared_local_cluster.scheduler_address == SEEN["shared"]
    assert len(shared_local_cluster.workers) == 3
"""


def test_fixtures_marker_and_no_leaks(pytester):
    pytester.makepyfile(test_inner=INNER_TESTS)
    pytester.makeini("[pytest]\nclusterlaunch_shared_n = 3\n")
    with no_processes_left("the inner session's processes"):
        result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
        result.assert_outcomes(passed=4)


def test_marker_is_registered(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.clusterlaunch(n=2, nthreads=1, **options)*"])
