"""The worker's self-measurements, fed with made-up timestamps."""

from __future__ import annotations

import pytest

from clusterlaunch.worker.metrics import (
    BANDWIDTH_SMOOTHING,
    DEFAULT_BANDWIDTH,
    TICK_INTERVAL,
    LoopTicks,
    SchedulerClock,
    TransferBandwidth,
)

PEER = "tcp://10.0.0.2:4000"


def test_bandwidth_starts_at_dasks_default_and_moves_towards_measurements():
    bandwidth = TransferBandwidth()
    assert bandwidth.report() == {"total": DEFAULT_BANDWIDTH, "workers": {}, "types": {}}
    bandwidth.record(PEER, 400_000_000, 1.0, {"numpy.ndarray"})
    expected = DEFAULT_BANDWIDTH * (1 - BANDWIDTH_SMOOTHING) + 400e6 * BANDWIDTH_SMOOTHING
    assert bandwidth.total == pytest.approx(expected)
    bandwidth.record(PEER, 200_000_000, 2.0, {"numpy.ndarray"})
    report = bandwidth.report()
    assert report["workers"] == {PEER: (500e6, 2)}
    assert report["types"] == {"numpy.ndarray": (500e6, 2)}


def test_small_transfers_are_not_bandwidth_samples():
    bandwidth = TransferBandwidth()
    bandwidth.record(PEER, 1_000_000, 0.0001, {"bytes"})
    assert bandwidth.report() == {"total": DEFAULT_BANDWIDTH, "workers": {}, "types": {}}


def test_mixed_types_count_for_the_peer_only():
    bandwidth = TransferBandwidth()
    bandwidth.record(PEER, 10_000_000, 0.1, {"numpy.ndarray", "pandas.DataFrame"})
    assert bandwidth.report()["workers"] == {PEER: (100e6, 1)}
    assert bandwidth.report()["types"] == {}


def test_an_instant_transfer_does_not_divide_by_zero():
    bandwidth = TransferBandwidth()
    bandwidth.record(PEER, 2_000_000, 0.0, {"bytes"})
    assert bandwidth.report()["workers"] == {PEER: (2e9, 1)}


def test_reported_samples_are_cleared_but_the_estimate_stays():
    bandwidth = TransferBandwidth()
    bandwidth.record(PEER, 10_000_000, 0.01, {"bytes"})
    total = bandwidth.total
    bandwidth.clear_samples()
    assert bandwidth.report() == {"total": total, "workers": {}, "types": {}}


def test_loop_ticks_average_over_a_cycle():
    ticks = LoopTicks(now=100.0)
    assert ticks.cycle(100.0) == TICK_INTERVAL  # nothing measured yet
    assert ticks.tick(100.02) == pytest.approx(0.02)
    assert ticks.tick(100.52) == pytest.approx(0.5)  # the loop was held
    assert ticks.cycle(100.52) == pytest.approx(0.26)
    # No tick since: the last figure stands rather than a zero, and the next cycle
    # spans both.
    assert ticks.cycle(100.53) == pytest.approx(0.26)
    ticks.tick(100.54)
    ticks.tick(100.56)
    assert ticks.cycle(100.56) == pytest.approx(0.02)


def test_scheduler_clock_takes_the_middle_of_the_round_trip():
    clock = SchedulerClock()
    assert clock.to_scheduler(5.0) == 5.0
    clock.observe(sent=10.0, received=10.2, scheduler_time=12.1)
    assert clock.delay == pytest.approx(2.0)
    assert clock.to_scheduler(20.0) == pytest.approx(22.0)
    clock.observe(sent=30.0, received=30.1, scheduler_time=None)  # an older reply
    assert clock.delay == pytest.approx(2.0)
