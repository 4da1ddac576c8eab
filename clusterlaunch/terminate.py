"""The ``terminate`` op: ask a dask worker (ours or stock) at an address to exit.

Used by the launcher for its own workers (while it watches their processes exit)
and by ``shutdown`` for any other worker (it watches the address stop answering).
"""

from __future__ import annotations

import asyncio
import logging
import time

from clusterlaunch.comm.rpc import send_recv
from clusterlaunch.comm.tcp import Comm, connect
from clusterlaunch.comm.timeouts import wait_for

logger = logging.getLogger(__name__)

#: Seconds one liveness probe of a foreign worker may take; refused connections are
#: retried within it, so this is also how late we notice that a worker is gone.
PROBE_TIMEOUT = 0.25


async def _connect_or_none(address: str, timeout: float) -> Comm | None:
    # A handshaken connection (not a bare TCP probe), so the worker has nothing to log.
    try:
        return await connect(address, timeout=timeout)
    except (OSError, asyncio.TimeoutError):
        return None


async def _send_terminate(comm: Comm, timeout: float) -> None:
    try:
        # The reply arrives once the worker has closed (stock dask) or at once (ours);
        # the connection dropping as the process exits is just as good an answer.
        await wait_for(send_recv(comm, op="terminate", reply=True), timeout)
    except (OSError, asyncio.TimeoutError, EOFError):
        pass
    except Exception as e:  # the worker refused: say so; we still wait for it
        logger.warning("terminate on %s answered with %r", comm.peer_address, e)
    finally:
        comm.abort()


async def ask_to_terminate(address: str, timeout: float) -> None:
    """Send ``terminate`` to a worker we know is running; don't wait for it to go."""
    comm = await _connect_or_none(address, min(timeout, 2.0))
    if comm is not None:
        await _send_terminate(comm, timeout)


async def terminate_and_wait(address: str, deadline: float) -> bool:
    """Terminate the worker at ``address``; True once it stops accepting connections,
    False if it still does at ``deadline`` (``time.monotonic()``)."""
    asked = False
    delay = 0.01
    while True:
        comm = await _connect_or_none(address, PROBE_TIMEOUT)
        if comm is None:
            return True
        if asked:
            comm.abort()
        else:
            asked = True
            await _send_terminate(comm, max(deadline - time.monotonic(), 0.1))
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
