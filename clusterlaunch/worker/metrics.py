"""What the worker measures about itself for the scheduler: the bandwidth of incoming
transfers, how promptly its event loop turns, and the offset of its clock from the
scheduler's. Plain objects fed with timestamps, so they test without a loop.

The scheduler reads the heartbeat's ``bandwidth`` to cost moving data when it places
and steals tasks, and ``event_loop_interval`` for the dashboard, as dask's worker
reports them.
"""

from __future__ import annotations

#: dask's ``distributed.scheduler.bandwidth`` default (bytes/s): the estimate before
#: any transfer has been measured.
DEFAULT_BANDWIDTH = 100e6
#: Smaller transfers tell more about latency than bandwidth; dask ignores them too.
BANDWIDTH_SAMPLE_MIN_BYTES = 1_000_000
#: Weight of one new sample in the running bandwidth estimate (dask's).
BANDWIDTH_SMOOTHING = 0.05
#: Seconds between event-loop ticks when the loop is idle (dask's admin.tick.interval).
TICK_INTERVAL = 0.02
#: A tick later than this is logged: something held the loop (dask's admin.tick.limit).
TICK_LIMIT = 3.0


class TransferBandwidth:
    """Bandwidth of incoming transfers: a running estimate, and the samples per peer
    and per value type since the last heartbeat took them."""

    def __init__(self, initial: float = DEFAULT_BANDWIDTH) -> None:
        self.total = initial
        self._workers: dict[str, tuple[float, int]] = {}
        self._types: dict[str, tuple[float, int]] = {}

    def record(self, worker: str, nbytes: int, seconds: float, type_names: set[str]) -> None:
        """One transfer of ``nbytes`` from ``worker`` took ``seconds``; ``type_names``
        are the types of the values it carried."""
        if nbytes <= BANDWIDTH_SAMPLE_MIN_BYTES:
            return
        bandwidth = nbytes / max(seconds, 0.001)
        self.total = self.total * (1 - BANDWIDTH_SMOOTHING) + bandwidth * BANDWIDTH_SMOOTHING
        _add_sample(self._workers, worker, bandwidth)
        if len(type_names) == 1:
            _add_sample(self._types, next(iter(type_names)), bandwidth)

    def report(self) -> dict[str, object]:
        """The heartbeat's ``bandwidth``: samples are ``(sum of bandwidths, count)``."""
        return {"total": self.total, "workers": dict(self._workers), "types": dict(self._types)}

    def clear_samples(self) -> None:
        """The scheduler has the samples reported so far."""
        self._workers.clear()
        self._types.clear()


def _add_sample(samples: dict[str, tuple[float, int]], name: str, bandwidth: float) -> None:
    total, count = samples.get(name, (0.0, 0))
    samples[name] = (total + bandwidth, count + 1)


class LoopTicks:
    """Time between turns of a callback scheduled every :data:`TICK_INTERVAL`: about
    that long on a responsive loop, longer when tasks or transfers hold it."""

    def __init__(self, now: float) -> None:
        self._last_tick = now
        self._cycle_start = now
        self._ticks_in_cycle = 0
        self.observed_interval = TICK_INTERVAL

    def tick(self, now: float) -> float:
        """The callback ran at ``now``; returns the time since it last ran."""
        duration = now - self._last_tick
        self._last_tick = now
        self._ticks_in_cycle += 1
        return duration

    def cycle(self, now: float) -> float:
        """The mean interval since the last cycle (the last one if no tick came)."""
        if self._ticks_in_cycle:
            self.observed_interval = (now - self._cycle_start) / self._ticks_in_cycle
            self._cycle_start = now
            self._ticks_in_cycle = 0
        return self.observed_interval


class SchedulerClock:
    """The offset of the scheduler's clock from ours, from the times its replies carry,
    so that start and stop times we report line up with the scheduler's own."""

    def __init__(self) -> None:
        self.delay = 0.0

    def observe(self, sent: float, received: float, scheduler_time: float | None) -> None:
        """A request sent at ``sent`` was answered at ``received`` with the scheduler's
        ``scheduler_time``, taken as the middle of the round trip."""
        if scheduler_time is not None:
            self.delay = scheduler_time - (sent + received) / 2

    def to_scheduler(self, t: float) -> float:
        return t + self.delay
