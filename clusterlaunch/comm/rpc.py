"""Calling ops on remote dask servers: ``send_recv``, a connection pool and ``rpc``.

``pool(address).some_op(**kwargs)`` sends ``{"op": "some_op", **kwargs}`` on a pooled
connection and returns the reply; an ``uncaught-error`` reply is re-raised locally as
the remote exception with its remote traceback, as dask's rpc does.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from clusterlaunch.comm.addressing import normalize_address
from clusterlaunch.comm.tcp import DEFAULT_CONNECT_TIMEOUT, Comm, CommClosedError, connect
from clusterlaunch.comm.tls import TLSConfig
from clusterlaunch.protocol.remote_errors import rebuild_exception


async def send_recv(comm: Comm, *, reply: bool = True, **msg: Any) -> Any:
    """Send one request on ``comm`` and return the reply (None if ``reply`` is False).

    With ``close=True`` the server closes the connection after this request, so we
    close our end too and a pool never hands the dead connection out again.
    """
    msg["reply"] = reply
    try:
        await comm.write(msg)
        response = await comm.read() if reply else None
    except BaseException:
        # Whatever was half sent or half read makes the connection unusable.
        comm.abort()
        raise
    if msg.get("close"):
        await comm.close()
    if isinstance(response, dict) and response.get("status") == "uncaught-error":
        exc, tb = rebuild_exception(**response)
        raise exc.with_traceback(tb)
    return response


class ConnectionPool:
    """At most ``limit`` open connections, reused across calls to the same address.

    When the limit is reached, idle connections are closed first; if every connection
    is busy, callers wait for one to be given back.
    """

    def __init__(
        self,
        limit: int = 512,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        tls: TLSConfig | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError(f"connection limit must be >= 1, not {limit}")
        self.limit = limit
        self.timeout = timeout
        self.tls = tls
        self._idle: dict[str, list[Comm]] = defaultdict(list)
        self._busy: dict[str, set[Comm]] = defaultdict(set)
        self._slots = asyncio.Semaphore(limit)
        self._waiting = 0
        self._closed = False

    @property
    def open(self) -> int:
        return self.active + sum(len(c) for c in self._idle.values())

    @property
    def active(self) -> int:
        return sum(len(c) for c in self._busy.values())

    def __repr__(self) -> str:
        return f"<ConnectionPool: open={self.open}, active={self.active}, limit={self.limit}>"

    async def connect(self, address: str) -> Comm:
        """A connection to ``address``: an idle one if there is one, else a new one."""
        if self._closed:
            raise CommClosedError("connection pool is closed")
        address = normalize_address(address)
        idle = self._idle[address]
        while idle:
            comm = idle.pop()
            if not comm.closed():
                self._busy[address].add(comm)
                return comm
            self._slots.release()
        if self._slots.locked():
            self._close_idle()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            comm = await connect(address, timeout=self.timeout, tls=self.tls)
        except BaseException:
            self._slots.release()
            raise
        self._busy[address].add(comm)
        return comm

    def reuse(self, address: str, comm: Comm) -> None:
        """Give ``comm`` back after a call; closed connections free their slot."""
        address = normalize_address(address)
        self._busy[address].discard(comm)
        if comm.closed() or self._closed or self._waiting:
            # A caller waiting for a slot needs this connection's more than we need it idle.
            comm.abort()
            self._slots.release()
        else:
            self._idle[address].append(comm)

    def _close_idle(self) -> None:
        for comms in self._idle.values():
            for comm in comms:
                comm.abort()
                self._slots.release()
            comms.clear()

    def remove(self, address: str) -> None:
        """Close the idle connections to ``address`` (e.g. a peer that went away)."""
        address = normalize_address(address)
        for comm in self._idle.pop(address, []):
            comm.abort()
            self._slots.release()

    async def close(self) -> None:
        self._closed = True
        self._close_idle()
        for comms in self._busy.values():
            for comm in comms:
                comm.abort()

    def __call__(self, address: str) -> PooledRPC:
        return PooledRPC(self, address)


class PooledRPC:
    """``await proxy.op(**kwargs)`` over a pooled connection to one address."""

    def __init__(self, pool: ConnectionPool, address: str) -> None:
        self.pool = pool
        self.address = address

    def __getattr__(self, op: str) -> Any:
        if op.startswith("__"):
            raise AttributeError(op)

        async def call(**kwargs: Any) -> Any:
            comm = await self.pool.connect(self.address)
            try:
                return await send_recv(comm, op=op, **kwargs)
            finally:
                self.pool.reuse(self.address, comm)

        call.__name__ = op
        return call


class rpc:  # noqa: N801 - named as dask names it
    """Calls to one address over connections of its own; ``async with`` closes them."""

    def __init__(
        self, address: str, timeout: float = DEFAULT_CONNECT_TIMEOUT, tls: TLSConfig | None = None
    ) -> None:
        self.address = normalize_address(address)
        self._pool = ConnectionPool(limit=1 << 16, timeout=timeout, tls=tls)

    def __getattr__(self, op: str) -> Any:
        if op.startswith("_"):
            raise AttributeError(op)
        return getattr(PooledRPC(self._pool, self.address), op)

    async def close_rpc(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> rpc:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close_rpc()
