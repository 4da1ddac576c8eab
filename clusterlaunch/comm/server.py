"""A Server that dispatches dask ``op`` messages to handlers.

Semantics follow dask's: each message on a connection is a dict with an ``op``; the
handler's return value is written back unless the message says ``reply: False``;
``close: True`` closes the connection after replying; the op ``close`` ends the
connection. A handler that raises is answered with an ``uncaught-error`` message that
carries the exception. Stream handlers serve long-lived batched connections.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

from clusterlaunch.comm.tcp import (
    Comm,
    CommClosedError,
    IncompleteMessageError,
    Listener,
    listen,
)
from clusterlaunch.protocol import ProtocolError
from clusterlaunch.protocol.remote_errors import error_message

logger = logging.getLogger(__name__)

#: A handler returns this to send no reply even though the caller asked for one.
NO_REPLY = object()


def _wants_comm(handler: Callable) -> bool:
    try:
        params = list(inspect.signature(handler).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "comm"


async def _call(handler: Callable, *args: Any, **kwargs: Any) -> Any:
    result = handler(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


class Server:
    """Serves ``handlers`` (op -> callable) on every connection it accepts."""

    def __init__(
        self,
        handlers: dict[str, Callable[..., Any]],
        stream_handlers: dict[str, Callable[..., Any]] | None = None,
        *,
        name: str = "server",
    ) -> None:
        self.handlers = {"identity": self.identity, **handlers}
        # handler -> whether it takes the comm first; inspecting a signature on every
        # request was a measurable share of a busy worker's time.
        self._takes_comm: dict[Callable, bool] = {}
        self.stream_handlers = dict(stream_handlers or {})
        self.name = name
        self.listener: Listener | None = None
        self._comms: set[Comm] = set()

    @property
    def address(self) -> str:
        if self.listener is None:
            raise RuntimeError(f"{self.name} is not listening")
        return self.listener.address

    def identity(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "id": self.name, "address": self.address}

    async def listen(self, address: str = "tcp://127.0.0.1:0", **kwargs: Any) -> str:
        self.listener = await listen(address, self.handle_comm, **kwargs)
        return self.listener.address

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self.listener is not None:
            await self.listener.stop()
        for comm in list(self._comms):
            comm.abort()

    async def handle_comm(self, comm: Comm) -> None:
        """Serve requests on ``comm`` until it closes."""
        self._comms.add(comm)
        try:
            await self._serve_requests(comm)
        except (ProtocolError, IncompleteMessageError) as e:
            # Log the text only: a retained record must not pin the exception's frames.
            logger.warning(
                "%s: closing connection from %s: %s", self.name, comm.peer_address, str(e)
            )
        except CommClosedError:
            pass
        finally:
            self._comms.discard(comm)
            comm.abort()

    async def _serve_requests(self, comm: Comm) -> None:
        while not comm.closed():
            msg = await comm.read()
            if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                raise ProtocolError(f"expected a message with an 'op', got {type(msg).__name__}")
            op = msg.pop("op")
            reply = msg.pop("reply", True)
            close_after = msg.pop("close", False)
            msg.pop("serializers", None)
            if op == "close":
                if reply:
                    await comm.write("OK")
                return
            result = await self._dispatch(comm, op, msg)
            if reply and result is not NO_REPLY:
                await comm.write(result)
            if close_after:
                await comm.close()
                return

    async def _dispatch(self, comm: Comm, op: str, msg: dict) -> Any:
        handler = self.handlers.get(op)
        try:
            if handler is None:
                raise ValueError(f"{self.name} has no handler for op {op!r}")
            takes_comm = self._takes_comm.get(handler)
            if takes_comm is None:
                takes_comm = self._takes_comm[handler] = _wants_comm(handler)
            if takes_comm:
                return await _call(handler, comm, **msg)
            return await _call(handler, **msg)
        except CommClosedError:
            raise
        except Exception as e:
            logger.info("%s: op %r from %s failed: %s", self.name, op, comm.peer_address, repr(e))
            return error_message(e, status="uncaught-error")

    async def handle_stream(self, comm: Comm, **extra: Any) -> None:
        """Dispatch batched messages from ``comm`` to stream handlers until the stream
        ends (the peer closes it or sends ``close-stream``); then close ``comm``."""
        try:
            while True:
                try:
                    batch = await comm.read()
                except CommClosedError:
                    return
                for msg in batch if isinstance(batch, (list, tuple)) else (batch,):
                    if msg == "OK":
                        continue
                    if not isinstance(msg, dict):
                        raise ProtocolError(f"expected a stream message dict, got {msg!r:.100}")
                    op = msg.pop("op", None)
                    if op == "close-stream":
                        return
                    handler = self.stream_handlers.get(op)
                    if handler is None:
                        logger.warning("%s: no stream handler for op %r", self.name, op)
                        continue
                    await _call(handler, **{**extra, **msg})
                await asyncio.sleep(0)
        finally:
            # abort, not close: close would wait for a write in progress, and a peer
            # that stopped reading could then hold up the end of the stream for good.
            comm.abort()
