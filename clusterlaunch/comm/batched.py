"""Batched streams: many small messages sent as lists, at most one batch per interval.

Same semantics as dask's ``BatchedSend``: ``send`` never blocks; the background task
writes whatever accumulated as one list message once the interval since the last batch
has passed; ``close`` flushes what's left and closes the comm; a write failure aborts
the comm, drops the buffer, and makes later ``send`` calls raise ``CommClosedError``.
The writer task is owned by the stream's ``BackgroundTasks``: ``close`` ends it and
awaits it, within its timeout, whatever the peer does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from clusterlaunch.comm.background import BackgroundTasks
from clusterlaunch.comm.tcp import Comm, CommClosedError
from clusterlaunch.comm.timeouts import wait_for

logger = logging.getLogger(__name__)


class BatchedSend:
    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.comm: Comm | None = None
        self.buffer: list[Any] = []
        self.message_count = 0
        self.batch_count = 0
        self.byte_count = 0
        self._wake = asyncio.Event()
        self._next_batch_at = 0.0
        self._stopping = False
        self._background = BackgroundTasks("batched stream")
        self._writer: asyncio.Task | None = None

    def __repr__(self) -> str:
        if self.closed():
            return "<BatchedSend: closed>"
        return f"<BatchedSend: {len(self.buffer)} in buffer>"

    def start(self, comm: Comm) -> None:
        self.comm = comm
        self._background.owner = f"batched stream to {comm.peer_address}"
        self._writer = self._background.spawn(self._send_batches(), name="batched writes")

    def closed(self) -> bool:
        return self.comm is not None and self.comm.closed()

    def send(self, *msgs: Any) -> None:
        """Queue ``msgs`` for the next batch."""
        if self.comm is not None and self.comm.closed():
            raise CommClosedError(f"batched stream to {self.comm.peer_address} is closed")
        self.message_count += len(msgs)
        self.buffer.extend(msgs)
        self._wake.set()

    async def _send_batches(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.comm is not None
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if not self.buffer:
                continue
            delay = self._next_batch_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            batch, self.buffer = self.buffer, []
            self._next_batch_at = loop.time() + self.interval
            try:
                self.byte_count += await self.comm.write(batch)
                self.batch_count += 1
            except CommClosedError:
                logger.info("batched stream to %s closed", self.comm.peer_address)
                self.abort()
                return
            except Exception:
                logger.exception("batched write to %s failed", self.comm.peer_address)
                self.abort()
                return

    async def close(self, timeout: float | None = None) -> None:
        """Send what's queued, then close the comm; idempotent.

        Within ``timeout`` seconds (if given): a peer that stopped reading gets its
        comm aborted, and the writer task is awaited either way.
        """
        if self.comm is None:
            return
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self._stopping = True
        self._wake.set()
        if self._writer is not None:
            _, pending = await asyncio.wait([self._writer], timeout=timeout)
            if pending:
                self.abort()  # its write fails at once and the writer returns
        await self._background.close()
        if not self.comm.closed():
            if self.buffer:
                batch, self.buffer = self.buffer, []
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                with contextlib.suppress(CommClosedError, asyncio.TimeoutError):
                    await wait_for(self.comm.write(batch), remaining)
            await self.comm.close()

    def abort(self) -> None:
        """Close now, dropping whatever is queued."""
        self._stopping = True
        self.buffer = []
        self._wake.set()
        if self.comm is not None:
            self.comm.abort()
