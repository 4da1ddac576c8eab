"""Values moving between workers: fetching dependencies from peers, serving our own.

``Transfers`` carries out the state machine's ``GatherDep`` instructions (one
``get_data`` request to a peer, its outcome fed back as an event, its bandwidth
recorded for the scheduler), nudges the state machine to ask the scheduler about keys
no known peer holds, and answers peers' ``get_data`` requests, throttled as dask's
worker throttles them. It keeps the transfer counters the heartbeat reports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from clusterlaunch.comm.addressing import parse_address
from clusterlaunch.comm.rpc import ConnectionPool, send_recv
from clusterlaunch.comm.server import NO_REPLY
from clusterlaunch.comm.tcp import Comm
from clusterlaunch.comm.timeouts import tcp_timeout, wait_for
from clusterlaunch.protocol import ProtocolError, Serialize, Undecodable
from clusterlaunch.protocol.remote_errors import error_fields
from clusterlaunch.worker import state as sm
from clusterlaunch.worker.metrics import TransferBandwidth

if TYPE_CHECKING:
    from clusterlaunch.worker.worker import Worker

logger = logging.getLogger("clusterlaunch.worker")

#: Concurrent get_data requests we serve before answering "busy" (doubled for peers
#: on our host), as dask's worker does.
TRANSFER_OUTGOING_COUNT_LIMIT = 4
#: Seconds to wait for a peer's get_data reply before counting it as failed.
TRANSFER_TIMEOUT = 300.0
#: Seconds between asking the scheduler about keys no known peer has.
FIND_MISSING_INTERVAL = 1.0


class Transfers:
    """Incoming and outgoing transfers of one worker, and their counters."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.bandwidth = TransferBandwidth()
        self.incoming_count_total = 0
        self.outgoing_count = 0
        self.outgoing_count_total = 0
        self.outgoing_bytes = 0

    # -------------------------------------------------------------------- incoming

    async def gather_dep(self, instruction: sm.GatherDep, session: int) -> None:
        """Fetch ``instruction.keys`` from its peer and feed the outcome."""
        worker = self.worker
        peer = instruction.worker
        stimulus_id = f"gather-dep-{time.time()}"
        self.incoming_count_total += 1
        start = time.time()
        try:
            response = await wait_for(
                fetch_from_peer(worker.pool, peer, instruction.keys, who=worker.address),
                TRANSFER_TIMEOUT,
            )
        except (OSError, asyncio.TimeoutError, ProtocolError) as e:
            logger.info("%s: fetching from %s failed: %s", worker.address, peer, e)
            event: sm.Event = sm.GatherDepNetworkFailure(worker=peer, stimulus_id=stimulus_id)
        except Exception as e:
            event = sm.GatherDepFailure(worker=peer, **error_fields(e), stimulus_id=stimulus_id)
        else:
            if response.get("status") == "busy":
                event = sm.GatherDepBusy(worker=peer, stimulus_id=stimulus_id)
            else:
                data = dict(response.get("data") or {})
                undecodable = {k: v for k, v in data.items() if isinstance(v, Undecodable)}
                if undecodable:
                    error = next(iter(undecodable.values())).error
                    logger.warning(
                        "%s: data from %s could not be decoded: %s", worker.address, peer, error
                    )
                    event = sm.GatherDepFailure(
                        worker=peer, **error_fields(error), stimulus_id=stimulus_id
                    )
                else:
                    stop = time.time()
                    self._record_bandwidth(peer, data, stop - start)
                    event = sm.GatherDepSuccess(
                        worker=peer,
                        data=data,
                        start=worker.scheduler_clock.to_scheduler(start),
                        stop=worker.scheduler_clock.to_scheduler(stop),
                        stimulus_id=stimulus_id,
                    )
        worker.feed_if_current(session, event)

    def _record_bandwidth(self, peer: str, data: Mapping, seconds: float) -> None:
        tasks = self.worker.state.tasks
        nbytes = sum(tasks[key].get_nbytes() for key in data if key in tasks)
        types = {sm.typename(type(value)) for value in data.values()}
        self.bandwidth.record(peer, nbytes, seconds, types)

    async def find_missing_loop(self) -> None:
        """Now and then, have the state machine ask where keys no known peer has are."""
        worker = self.worker
        while True:
            await asyncio.sleep(FIND_MISSING_INTERVAL)
            if worker.status == "running" and worker.state.missing:
                worker.handle_events(sm.FindMissing(stimulus_id=f"find-missing-{time.time()}"))

    # -------------------------------------------------------------------- outgoing

    async def get_data(self, comm: Comm, keys: Collection, who: str | None = None, **_: Any) -> Any:
        """The ``get_data`` op: send what we hold of ``keys``, or "busy" past the limit."""
        state = self.worker.state
        limit = TRANSFER_OUTGOING_COUNT_LIMIT
        if _same_host(comm.peer_address, self.worker.address):
            limit *= 2
        if state.status == "paused":
            limit = 1
        if self.outgoing_count >= limit:
            return {"status": "busy"}
        data = {key: state.data[key] for key in keys if key in state.data}
        if state.actors:
            data.update(self.worker.actor_host.references(keys))
        nbytes = sum(state.tasks[key].get_nbytes() for key in data if key in state.tasks)
        self.outgoing_count += 1
        self.outgoing_count_total += 1
        self.outgoing_bytes += nbytes
        try:
            await comm.write(
                {"status": "OK", "data": {key: Serialize(value) for key, value in data.items()}}
            )
            try:
                # A peer gets distributed.comm.timeouts.tcp to acknowledge our data.
                ack = await wait_for(comm.read(), tcp_timeout())
            except asyncio.TimeoutError:
                # A peer that never acknowledges must not hold an outgoing slot for good.
                comm.abort()
                logger.warning(
                    "%s: no get_data acknowledgement from %s within %g s "
                    "(distributed.comm.timeouts.tcp); closed the connection",
                    self.worker.address,
                    who or comm.peer_address,
                    tcp_timeout(),
                )
                return NO_REPLY
            if ack != "OK":
                logger.warning(
                    "%s: unexpected get_data acknowledgement %r from %s",
                    self.worker.address,
                    ack,
                    who,
                )
        finally:
            self.outgoing_count -= 1
            self.outgoing_bytes -= nbytes
        return NO_REPLY


async def fetch_from_peer(
    pool: ConnectionPool, peer: str, keys: Collection, *, who: str | None = None
) -> dict:
    """A peer's ``get_data`` reply for ``keys``, acknowledged as dask's peers expect."""
    comm = await pool.connect(peer)
    try:
        # Stock workers then send everything as pickle, which every worker can read.
        response = await send_recv(
            comm, op="get_data", keys=list(keys), who=who, serializers=["pickle"]
        )
        if not isinstance(response, dict):
            raise ProtocolError(f"unexpected get_data reply from {peer}: {response!r:.200}")
        if response.get("status") == "OK":
            await comm.write("OK")
        return response
    finally:
        pool.reuse(peer, comm)


def _same_host(a: str, b: str) -> bool:
    try:
        return parse_address(a)[0] == parse_address(b)[0]
    except ValueError:
        return False
