"""``wait_for``: await something for at most ``timeout`` seconds, and never swallow a cancel.

Before Python 3.12, ``asyncio.wait_for`` runs the awaitable as a task of its own and,
when the caller is cancelled just as that task completes, returns its result instead
of raising: the cancel is lost and the caller runs on (seen: a worker's heartbeat,
cancelled by close as its connection opened, went on to a handshake with a stopped
scheduler). ``asyncio.timeout`` (3.11+) runs the awaitable in the caller's own task
and tells its own cancel from anyone else's, so a cancel always gets through; 3.12's
``wait_for`` is built on it. On 3.10 there is only ``asyncio.wait_for``;
``BackgroundTasks.close`` cancels again for that case.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


def config_seconds(key: str, default: float) -> float:
    """Seconds that dask's configuration gives ``key`` (``"30s"``, ``30``), or ``default``."""
    import dask.config
    from dask.utils import parse_timedelta

    value = dask.config.get(key, None)
    return default if value is None else float(parse_timedelta(value, default="s"))


@functools.cache
def tcp_timeout() -> float:
    """``distributed.comm.timeouts.tcp`` in seconds (30 by default), read once, on first
    use: importing the comm layer does not import dask."""
    return config_seconds("distributed.comm.timeouts.tcp", 30.0)


async def wait_for(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``await awaitable``, raising ``TimeoutError`` after ``timeout`` seconds."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await awaitable
    return await asyncio.wait_for(awaitable, timeout)
