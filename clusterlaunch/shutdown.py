"""``shutdown(addresses)``: stop dask workers by address, ours or stock.

It sends the ``terminate`` op and waits until each worker is gone: for workers a
launcher in this process started, until the process exited (killing it if it
overstays); for any other, until the address stops accepting connections.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from clusterlaunch.addprocs import close_idle_launchers
from clusterlaunch.bridge import run_sync
from clusterlaunch.comm.addressing import normalize_address
from clusterlaunch.launcher import DEFAULT_SHUTDOWN_TIMEOUT, Launcher
from clusterlaunch.terminate import terminate_and_wait


async def shutdown_async(
    addresses: Iterable[str], timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
) -> None:
    """Ask each worker at ``addresses`` to terminate and wait until all are gone.

    Raises ``TimeoutError`` naming the workers still up after ``timeout`` seconds.
    Workers a launcher in this process started are killed if they overstay.
    """
    normalized = [normalize_address(a) for a in addresses]
    owned: dict[Launcher, list[str]] = {}
    foreign: list[str] = []
    for address in dict.fromkeys(normalized):
        owner = next((la for la in Launcher.live() if la.owns(address)), None)
        if owner is None:
            foreign.append(address)
        else:
            owned.setdefault(owner, []).append(address)
    deadline = time.monotonic() + timeout

    async def stop_foreign(address: str) -> list[str]:
        return [] if await terminate_and_wait(address, deadline) else [address]

    # The launchers' stop is blocking (it waits on their processes): it runs in the
    # executor of the loop running this, which is a bridge's when called by shutdown().
    try:
        results = await asyncio.gather(
            *(stop_foreign(a) for a in foreign),
            *(
                asyncio.to_thread(launcher.stop_addresses, addrs, timeout)
                for launcher, addrs in owned.items()
            ),
        )
    finally:
        await asyncio.to_thread(close_idle_launchers)
    still_up = sorted({a for left in results for a in left})
    if still_up:
        raise TimeoutError(
            f"{len(still_up)} worker(s) still up {timeout:g} s after terminate: "
            + ", ".join(still_up)
        )


def shutdown(addresses: Iterable[str] | str, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
    """Terminate the dask workers at ``addresses`` (ours or stock) and wait until gone."""
    listed = [addresses] if isinstance(addresses, str) else list(addresses)
    run_sync(shutdown_async(listed, timeout))
