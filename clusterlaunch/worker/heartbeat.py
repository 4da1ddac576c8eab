"""What the worker tells the scheduler about itself, and how often.

``Heartbeat`` runs the heartbeat loop (``heartbeat_worker`` to the scheduler, with the
metrics and the tasks executing), the event-loop tick loop that ``metrics`` reports as
``event_loop_interval``, and builds the metrics dict that registration and every
heartbeat carry (and keeps a history of, for ``get_monitor_info``). The measurements
themselves are the plain objects of ``metrics.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import psutil

from clusterlaunch.comm.timeouts import wait_for
from clusterlaunch.protocol import ProtocolError
from clusterlaunch.worker.diagnostics import MonitorHistory
from clusterlaunch.worker.memory import spilled_total
from clusterlaunch.worker.metrics import TICK_INTERVAL, TICK_LIMIT, LoopTicks

if TYPE_CHECKING:
    from clusterlaunch.worker.worker import Worker

logger = logging.getLogger("clusterlaunch.worker")


class Heartbeat:
    """The heartbeat and tick loops of one worker, and its metrics."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        #: Seconds between heartbeats; the scheduler's replies may change it.
        self.interval = worker.options.heartbeat_interval
        self.ticks = LoopTicks(time.monotonic())
        self._process = psutil.Process()
        self._last_io = (time.monotonic(), psutil.net_io_counters(), psutil.disk_io_counters())
        #: Each report's cpu, memory and I/O, for ``get_monitor_info``.
        self.monitor = MonitorHistory()

    async def heartbeat_loop(self) -> None:
        worker = self.worker
        while True:
            await asyncio.sleep(self.interval)
            if worker.status != "running":
                continue
            sent = time.time()
            try:
                response = await wait_for(
                    worker.pool(worker.scheduler_address).heartbeat_worker(
                        address=worker.address,
                        now=time.time(),
                        metrics=self.metrics(),
                        executing=worker.state.executing_durations(time.time()),
                        extensions={},
                    ),
                    max(10.0, 5 * self.interval),
                )
            except (OSError, asyncio.TimeoutError, ProtocolError) as e:
                logger.info("%s: heartbeat failed: %s", worker.address, e)
                continue
            if response.get("status") == "missing":
                logger.warning(
                    "%s: the scheduler no longer knows this worker; closing", worker.address
                )
                worker.begin_close("heartbeat-missing", report=False)
                return
            worker.scheduler_clock.observe(sent, time.time(), response.get("time"))
            worker.transfers.bandwidth.clear_samples()
            self.interval = response.get("heartbeat-interval", self.interval)

    async def tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            duration = self.ticks.tick(time.monotonic())
            if duration > TICK_LIMIT:
                logger.info(
                    "%s: event loop was unresponsive for %.2f s; task code holding the GIL "
                    "or moving large values can cause this, and timeouts with it",
                    self.worker.address,
                    duration,
                )

    def metrics(self) -> dict[str, Any]:
        """What the heartbeat reports; the scheduler and dashboard read these keys."""
        now = time.monotonic()
        net, disk = psutil.net_io_counters(), psutil.disk_io_counters()
        last_time, last_net, last_disk = self._last_io
        elapsed = max(now - last_time, 1e-3)
        self._last_io = (now, net, disk)

        def rate(new: Any, old: Any, field: str) -> float:
            if new is None or old is None:
                return 0.0
            return max(0.0, (getattr(new, field) - getattr(old, field)) / elapsed)

        with self._process.oneshot():
            memory = self._process.memory_info().rss
            cpu = self._process.cpu_percent()
            num_fds = self._process.num_fds()
        state = self.worker.state
        transfers = self.worker.transfers
        metrics = {
            "task_counts": state.summary(),
            "bandwidth": transfers.bandwidth.report(),
            "digests_total_since_heartbeat": {},
            "managed_bytes": state.nbytes,
            "spilled_bytes": dict(zip(("memory", "disk"), spilled_total(state.data))),
            "transfer": {
                "incoming_bytes": state.transfer_incoming_bytes,
                "incoming_count": len(state.in_flight_workers),
                "incoming_count_total": transfers.incoming_count_total,
                "outgoing_bytes": transfers.outgoing_bytes,
                "outgoing_count": transfers.outgoing_count,
                "outgoing_count_total": transfers.outgoing_count_total,
            },
            "event_loop_interval": self.ticks.cycle(now),
            "cpu": cpu,
            "memory": memory,
            "time": time.time(),
            "host_net_io": {
                "read_bps": rate(net, last_net, "bytes_recv"),
                "write_bps": rate(net, last_net, "bytes_sent"),
            },
            "host_disk_io": {
                "read_bps": rate(disk, last_disk, "read_bytes"),
                "write_bps": rate(disk, last_disk, "write_bytes"),
            },
            "num_fds": num_fds,
        }
        self.monitor.record(metrics)
        return metrics
