"""Spilling to disk and pausing under memory pressure.

Unit tests drive ``SpillBuffer`` and ``MemoryThresholds`` directly; the integration
tests run our worker with a small ``--memory-limit`` under a real scheduler and client.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tasks
from procs import LocalProcesses, registered, wait_for, worker_address
from tasks import MB

from clusterlaunch.worker.memory import MemoryThresholds, SpillBuffer


def nbytes(value):
    return value.nbytes if hasattr(value, "nbytes") else 100


@pytest.fixture
def buffer(tmp_path):
    spill = SpillBuffer(str(tmp_path), target=3 * MB, sizeof=nbytes)
    yield spill
    spill.close()
    assert not os.path.exists(spill.directory)


def array(i: int, megabytes: float = 1) -> np.ndarray:
    return np.full(int(megabytes * MB), i % 250, dtype="u1")


def test_keeps_values_in_memory_up_to_the_target(buffer):
    for i in range(3):
        buffer[i] = array(i)
    assert set(buffer.fast) == {0, 1, 2}
    assert not buffer.slow
    assert buffer.fast_bytes == 3 * MB


def test_spills_least_recently_used_past_the_target(buffer):
    for i in range(3):
        buffer[i] = array(i)
    buffer[0]  # touch 0: 1 is now the least recently used
    buffer[3] = array(3)
    assert set(buffer.slow) == {1}
    assert buffer.fast_bytes == 3 * MB
    assert buffer.spilled_total[0] == MB
    assert buffer.spilled_total[1] >= MB
    assert len(buffer) == 4 and set(buffer) == {0, 1, 2, 3}


def test_reads_spilled_values_back_and_spills_others(buffer):
    for i in range(5):
        buffer[i] = array(i)
    assert set(buffer.slow) == {0, 1}
    value = buffer[0]
    np.testing.assert_array_equal(value, array(0))
    assert 0 in buffer.fast and 0 not in buffer.slow
    assert buffer.unspill_count == 1
    assert buffer.fast_bytes <= 3 * MB
    assert set(buffer) == set(range(5))


def test_value_larger_than_target_goes_straight_to_disk(buffer):
    buffer["small"] = array(1)
    buffer["big"] = array(2, megabytes=5)
    assert "big" in buffer.slow and "small" in buffer.fast
    np.testing.assert_array_equal(buffer["big"], array(2, megabytes=5))


def test_delete_removes_files_and_accounting(buffer):
    for i in range(5):
        buffer[i] = array(i)
    paths = list(buffer.slow.values())
    for i in range(5):
        del buffer[i]
    assert len(buffer) == 0 and buffer.fast_bytes == 0 and buffer.spilled_bytes == 0
    assert not any(os.path.exists(p) for p in paths)
    with pytest.raises(KeyError):
        del buffer[0]


def test_overwrite_replaces_the_old_value(buffer):
    for i in range(5):
        buffer[i] = array(i)
    buffer[0] = array(9)
    np.testing.assert_array_equal(buffer[0], array(9))
    assert len(buffer) == 5


def test_unpicklable_value_stays_in_memory(buffer, caplog):
    import threading

    lock = threading.Lock()
    buffer["lock"] = lock
    for i in range(4):
        buffer[i] = array(i)
    buffer.evict_until(0)
    assert buffer.fast == {"lock": lock}
    assert "could not spill" in caplog.text


def test_thresholds_follow_dask_defaults():
    thresholds = MemoryThresholds(1000)
    assert thresholds.managed_target == 600
    assert thresholds.bytes_to_spill(700) == 0
    assert thresholds.bytes_to_spill(750) == 150
    assert not thresholds.should_pause(800)
    assert thresholds.should_pause(801)
    unlimited = MemoryThresholds(0)
    assert unlimited.managed_target == float("inf")
    assert not unlimited.should_pause(10**12)
    assert unlimited.bytes_to_spill(10**12) == 0


@pytest.mark.timeout(180)
def test_worker_spills_under_its_memory_limit_and_still_serves_everything(
    processes: LocalProcesses, tmp_path: Path
) -> None:
    from distributed import Client

    spill_root = tmp_path / "spill"
    spill_root.mkdir()
    proc = processes.start_worker("--memory-limit", "600MB", "--local-directory", str(spill_root))
    with Client(processes.address, timeout=30) as client:
        address = worker_address(client, proc)
        arrays = client.map(tasks.filled_20mb, range(30))  # 600 MB of values
        sums = client.gather(client.map(tasks.byte_sum, arrays))
        assert sums == [20 * MB * (i % 250) for i in range(30)]

        def spilled(dask_worker):
            data = dask_worker.state.data
            return type(data).__name__, len(data.slow), data.fast_bytes

        kind, on_disk, in_memory = client.run(spilled, workers=[address])[address]
        assert kind == "SpillBuffer"
        assert on_disk > 0
        assert in_memory <= 0.6 * 600 * MB
        spill_files = [f for d in spill_root.iterdir() for f in d.iterdir()]
        assert len(spill_files) == on_disk

        # Every value, spilled or not, comes back intact.
        values = client.gather(arrays)
        for i, value in enumerate(values):
            assert value.shape == (20 * MB,) and value[0] == i % 250

        # The scheduler hears about spilled bytes through heartbeats.
        def reported_spill() -> bool:
            info = registered(client)[address]
            return info["metrics"]["spilled_bytes"]["memory"] > 0

        wait_for(reported_spill, 30, "spilled bytes in the worker's metrics")
        del arrays, values


@pytest.mark.timeout(180)
def test_worker_pauses_past_the_pause_threshold_and_resumes(
    processes: LocalProcesses, tmp_path: Path
) -> None:
    from distributed import Client

    proc = processes.start_worker("--memory-limit", "400MB", "--nthreads", "2")
    with Client(processes.address, timeout=30) as client:
        address = worker_address(client, proc)

        def status() -> str:
            return registered(client)[address]["status"]

        release = tmp_path / "release"
        hog = client.submit(tasks.hold_memory, 400, str(release), pure=False)
        wait_for(lambda: status() == "paused", 60, "the worker to pause")
        release.touch()  # the hog lets go of its memory only now that the pause was seen
        assert hog.result(timeout=60) == 400 * MB
        del hog
        wait_for(lambda: status() == "running", 60, "the worker to resume")
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
