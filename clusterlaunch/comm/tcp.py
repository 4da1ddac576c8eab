"""Asyncio TCP and TLS transport speaking dask's framing and handshake.

A ``Comm`` drives a non-blocking socket directly: reads land in the buffers that
``FrameReceiver`` hands out (large frames straight into their own preallocated buffer)
and writes go out with ``sendmsg`` over memoryviews of the frames, so payloads are
never copied or joined on the way. Over ``tls://`` the socket is an ``ssl.SSLSocket``
driven the same way: OpenSSL decrypts straight into those buffers and encrypts
straight from the frames' memoryviews (one ``send`` per frame, as ``SSLSocket`` has
no ``sendmsg``), so TLS adds the cipher's pass over the bytes and no copy of ours.

An idle connection holds no receive buffer (it is dropped while the connection
waits for a next message), and a message that stops arriving, or trickles in, part way is cut after
``distributed.comm.timeouts.tcp``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from pickle import PickleBuffer
from typing import Any

import psutil

from clusterlaunch.comm.addressing import (
    address_scheme,
    format_address,
    is_wildcard,
    parse_address,
)
from clusterlaunch.comm.background import BackgroundTasks
from clusterlaunch.comm.timeouts import tcp_timeout, wait_for
from clusterlaunch.comm.tls import TLSConfig
from clusterlaunch.protocol import (
    DecodeError,
    FrameReceiver,
    ProtocolError,
    dumps,
    frames_header,
    loads,
)
from clusterlaunch.protocol import handshake as handshake_protocol

logger = logging.getLogger(__name__)

#: The most buffers one sendmsg call takes (the kernel's IOV_MAX).
MAX_IOV = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
#: Seconds a new connection gets to complete the handshake.
HANDSHAKE_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 30.0
#: A message part way through must bring MIN_PROGRESS_BYTES every
#: distributed.comm.timeouts.tcp seconds, or the rest of it: a sender that stalls or
#: trickles is cut.
MIN_PROGRESS_BYTES = 64 * 1024


class CommClosedError(OSError):
    """The connection is closed, or was closed while in use."""


class IncompleteMessageError(CommClosedError):
    """The peer closed the connection part way through a message."""


def default_max_message_bytes() -> int:
    """A peer can't make us reserve more than this machine's memory for one message."""
    return psutil.virtual_memory().total


class Comm:
    """One established, handshaken connection: ``read`` and ``write`` whole messages."""

    def __init__(self, sock: socket.socket, *, local_address: str, peer_address: str) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self.stall_timeout = tcp_timeout()
        # Mid-message, each stall_timeout window must bring MIN_PROGRESS_BYTES (or the rest).
        self._progress_deadline: float | None = None
        self._progress_bytes = 0
        self._receiver = FrameReceiver(max_message_bytes=default_max_message_bytes())
        self._write_lock = asyncio.Lock()
        self._waiters: set[asyncio.Future] = set()
        self.local_address = local_address
        self.peer_address = peer_address
        self.local_info: dict[str, Any] = {}
        self.remote_info: dict[str, Any] = {}
        self.options: dict[str, Any] = {"pickle-protocol": 5, "compression": None}
        self.name = ""

    def __repr__(self) -> str:
        state = " (closed)" if self.closed() else ""
        return f"<Comm{state} {self.name} local={self.local_address} remote={self.peer_address}>"

    def closed(self) -> bool:
        return self._sock is None

    @property
    def encrypted(self) -> bool:
        return isinstance(self._sock, ssl.SSLSocket)

    async def read(self) -> Any:
        """The next message. Raises ``CommClosedError`` when the peer is gone and
        ``ProtocolError`` (after closing) when the bytes are not dask's protocol."""
        frames = self._receiver.pop_message()
        while frames is None:
            nbytes = await self._receive()
            if nbytes == 0:
                self.abort()
                if self._receiver.idle:
                    raise CommClosedError(f"connection to {self.peer_address} closed by peer")
                raise IncompleteMessageError(
                    f"connection to {self.peer_address} closed mid-message"
                )
            try:
                self._receiver.buffer_updated(nbytes)
            except ProtocolError:
                self.abort()
                raise
            frames = self._receiver.pop_message()
        try:
            return loads(frames)
        except DecodeError as e:
            self.abort()
            raise ProtocolError(str(e)) from e

    async def write(self, msg: Any) -> int:
        """Send ``msg``; returns the number of bytes written."""
        if self._sock is None:
            raise CommClosedError(f"connection to {self.peer_address} is closed")
        frames = dumps(msg, pickle_protocol=self.options["pickle-protocol"])
        views = [_byte_view(frame) for frame in frames]
        buffers = [memoryview(frames_header([v.nbytes for v in views])), *views]
        total = sum(v.nbytes for v in buffers)
        async with self._write_lock:
            try:
                await self._send_all(buffers)
            except CommClosedError:
                raise
            except BaseException:
                # Part of the message may be on the wire: the stream can't be reused.
                self.abort()
                raise
        return total

    async def _receive(self) -> int:
        """Read what has arrived into the receiver's buffer; the number of bytes."""
        receiver = self._receiver

        def recv(sock: socket.socket) -> int:
            if not self.encrypted:
                return sock.recv_into(receiver.get_buffer())
            # SSLSocket.recv_into returns one TLS record (16 KiB) a call: take every
            # record already here, so a large frame costs one wake-up per socket read.
            buffer = receiver.get_buffer()
            total = 0
            while total < buffer.nbytes:
                try:
                    nbytes = sock.recv_into(buffer[total:])
                except ssl.SSLWantReadError:
                    if total:
                        break
                    raise
                if not nbytes:
                    break
                total += nbytes
            return total

        if receiver.idle:
            self._progress_deadline = None
            try:
                return await self._io(recv, writing=False, wait=False)
            except BlockingIOError:
                # Nothing of a next message yet: wait without holding a buffer.
                receiver.release()
                return await self._io(recv, writing=False)
        now = self._loop.time()
        if self._progress_deadline is None or now >= self._progress_deadline:
            self._progress_deadline = now + self.stall_timeout
            self._progress_bytes = 0
        try:
            nbytes = await wait_for(self._io(recv, writing=False), self._progress_deadline - now)
        except asyncio.TimeoutError:
            nbytes = -1
        self._progress_bytes += max(nbytes, 0)
        if nbytes < 0 or (
            self._loop.time() >= self._progress_deadline
            and self._progress_bytes < MIN_PROGRESS_BYTES
        ):
            self.abort()
            raise IncompleteMessageError(
                f"connection to {self.peer_address} stalled mid-message: less than "
                f"{MIN_PROGRESS_BYTES} bytes in {self.stall_timeout:g} s "
                "(distributed.comm.timeouts.tcp)"
            )
        return nbytes

    async def _send_all(self, buffers: list[memoryview]) -> None:
        pending = [b for b in buffers if b.nbytes]
        send: Callable[[socket.socket], int]
        if self.encrypted:
            send = lambda s: s.send(pending[0])  # noqa: E731
        else:
            send = lambda s: s.sendmsg(pending[:MAX_IOV])  # noqa: E731
        while pending:
            sent = await self._io(send, writing=True)
            while sent:
                head = pending[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    pending.pop(0)
                else:
                    pending[0] = head[sent:]
                    sent = 0

    async def _io(
        self, operation: Callable[[socket.socket], Any], *, writing: bool, wait: bool = True
    ) -> Any:
        """Run a non-blocking socket operation, waiting for readiness as needed
        (``wait=False``: raise ``BlockingIOError`` instead). TLS may need to write
        while reading and the other way round; it says which."""
        loop = self._loop
        while True:
            sock = self._sock
            if sock is None:
                raise CommClosedError(f"connection to {self.peer_address} is closed")
            needs_write = writing
            try:
                return operation(sock)
            except ssl.SSLWantReadError:
                needs_write = False
            except ssl.SSLWantWriteError:
                needs_write = True
            except (BlockingIOError, InterruptedError):
                pass
            except ssl.SSLEOFError as e:
                self.abort()
                raise CommClosedError(f"connection to {self.peer_address} closed by peer") from e
            except OSError as e:
                self.abort()
                raise CommClosedError(f"connection to {self.peer_address} lost: {e}") from e
            if not wait:
                raise BlockingIOError
            watch, unwatch = (
                (loop.add_writer, loop.remove_writer)
                if needs_write
                else (loop.add_reader, loop.remove_reader)
            )
            waiter = loop.create_future()
            self._waiters.add(waiter)
            watch(self._fd, _resolve, waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)
                if self._sock is not None:
                    unwatch(self._fd)

    async def close(self) -> None:
        """Close the connection after anything being written has gone out."""
        if self._sock is None:
            return
        async with self._write_lock:
            self.abort()

    def abort(self) -> None:
        """Close the connection now; pending reads and writes fail."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(
                    CommClosedError(f"connection to {self.peer_address} was closed")
                )
        self._waiters.clear()
        sock.close()


def _resolve(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _byte_view(frame: Any) -> memoryview:
    """A flat unsigned-byte view of ``frame``, copying only if it's not contiguous."""
    view = frame.raw() if isinstance(frame, PickleBuffer) else memoryview(frame)
    if view.ndim == 1 and view.format == "B":
        return view
    if not view.nbytes:
        # An empty multi-dimensional buffer (an empty DataFrame's block) can't be cast.
        return memoryview(b"")
    if view.c_contiguous:
        return view.cast("B")
    return PickleBuffer(view).raw() if view.contiguous else memoryview(view.tobytes())


async def _handshake(comm: Comm) -> Comm:
    local = handshake_protocol.local_info()
    await comm.write(local)
    remote = await comm.read()
    comm.options = handshake_protocol.negotiate(local, remote)
    comm.local_info = {**local, "address": comm.local_address}
    comm.remote_info = {**remote, "address": comm.peer_address}
    return comm


async def _tls_handshake(comm: Comm, *, server: bool) -> None:
    """The TLS handshake on ``comm``'s socket; a refusal raises ``CommClosedError``
    naming the peer and OpenSSL's reason (an unknown CA, an expired certificate)."""
    try:
        await comm._io(lambda sock: sock.do_handshake(), writing=False)  # type: ignore[attr-defined]
    except CommClosedError as e:
        refusal = _tls_refusal(comm, e)
        if refusal is not None:
            raise refusal from None
        hint = "" if server else " (is it a TLS port? a plain tcp:// peer is refused)"
        raise CommClosedError(f"TLS handshake with {comm.peer_address} failed: {e}{hint}") from None


def _tls_refusal(comm: Comm, error: CommClosedError) -> CommClosedError | None:
    """One line for a certificate that one end refused, saying whose and against what.

    Over TLS 1.3 the server checks the client's certificate after the client's side
    of the handshake is done, so its refusal arrives as an alert on the first read."""
    cause = error.__cause__
    if not isinstance(cause, ssl.SSLError) or isinstance(cause, ssl.SSLEOFError):
        return None
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = cause.verify_message or cause.reason or str(cause)
        whose = "its certificate, checked against our CA file"
    else:
        reason = (cause.reason or str(cause)).lower().replace("_", " ")
        whose = "our certificate, refused by its CA"
    return CommClosedError(f"TLS handshake with {comm.peer_address} failed: {reason} ({whose})")


def _resolve_tls(scheme: str, tls: TLSConfig | None, address: str) -> TLSConfig | None:
    """The TLS settings a connection to or from ``address`` uses; None for plain TCP."""
    config = TLSConfig.from_dask_config() if tls is None else tls
    if scheme == "tls":
        return config
    if config.require_encryption:
        raise ValueError(
            f"refusing {address}: distributed.comm.require-encryption is set; use tls://"
        )
    return None


async def connect(
    address: str, *, timeout: float = DEFAULT_CONNECT_TIMEOUT, tls: TLSConfig | None = None
) -> Comm:
    """Connect to a dask server at ``address`` and complete the handshake.

    Refused connections are retried with backoff until ``timeout``; then ``OSError``
    names the address. A malformed address raises ``ValueError``. ``tls://`` uses
    ``tls`` (dask's configuration when None) and authenticates both ends.
    """
    host, port = parse_address(address)
    scheme = address_scheme(address)
    tls_config = _resolve_tls(scheme, tls, address)
    context = None if tls_config is None else tls_config.context(server=False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.01
    last_error: Exception | None = None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise OSError(
                f"could not connect to {format_address(host, port)} within {timeout:g} s: "
                f"{last_error}"
            )
        try:
            sock = await wait_for(_open_socket(host, port), remaining)
            break
        except (OSError, asyncio.TimeoutError) as e:
            last_error = e
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 1.0)
    local_host, local_port = sock.getsockname()[:2]
    if context is not None:
        sock = context.wrap_socket(sock, do_handshake_on_connect=False)
    comm = Comm(
        sock,
        local_address=format_address(local_host, local_port, scheme),
        peer_address=format_address(host, port, scheme),
    )
    handshake_timeout = max(HANDSHAKE_TIMEOUT, remaining)
    try:
        if context is not None:
            await wait_for(_tls_handshake(comm, server=False), handshake_timeout)
        return await wait_for(_handshake(comm), handshake_timeout)
    except asyncio.TimeoutError:
        # On Python 3.10 asyncio.TimeoutError is no OSError; callers expect one.
        comm.abort()
        raise OSError(
            f"no handshake from {comm.peer_address} within {handshake_timeout:g} s"
        ) from None
    except CommClosedError as e:
        comm.abort()
        if context is None:
            raise CommClosedError(f"{e} during the handshake (is it a tls:// port?)") from None
        raise _tls_refusal(comm, e) or e from None
    except BaseException:
        comm.abort()
        raise


async def _open_socket(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"no address found for {host!r}")


class Listener:
    """Accepts connections on a TCP port and hands each handshaken ``Comm`` on."""

    def __init__(
        self,
        sock: socket.socket,
        handle_comm: Callable[[Comm], Awaitable[None]],
        contact_host: str,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self._sock = sock
        self._handle_comm = handle_comm
        self._context = context
        scheme = "tcp" if context is None else "tls"
        host, self.port = sock.getsockname()[:2]
        self.address = format_address(contact_host, self.port, scheme)
        self.bound_address = format_address(host, self.port, scheme)
        self._tasks = BackgroundTasks(f"listener {self.address}")
        self._tasks.spawn(self._accept_forever(), name=f"accept on {self.address}")

    @property
    def connections(self) -> int:
        """How many accepted connections are being served (or handshaken) now."""
        return max(0, len(self._tasks) - 1)  # all but the accepting task

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:
                # Out of file descriptors and the like: back off rather than spin.
                logger.warning("accept on %s failed: %s", self.address, str(e))
                await asyncio.sleep(0.1)
                continue
            self._tasks.spawn(self._serve(conn), name=f"serve a connection on {self.address}")

    async def _serve(self, conn: socket.socket) -> None:
        local, peer = conn.getsockname(), conn.getpeername()
        scheme = "tcp"
        if self._context is not None:
            scheme = "tls"
            conn = self._context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        comm = Comm(
            conn,
            local_address=format_address(local[0], local[1], scheme),
            peer_address=format_address(peer[0], peer[1], scheme),
        )
        try:
            if self._context is not None:
                await wait_for(_tls_handshake(comm, server=True), HANDSHAKE_TIMEOUT)
            await wait_for(_handshake(comm), HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            logger.warning(
                "closing connection from %s: no handshake within %g s",
                comm.peer_address,
                HANDSHAKE_TIMEOUT,
            )
            comm.abort()
            return
        except (ProtocolError, OSError) as e:
            # The text, not the exception: a retained log record must not keep the
            # exception's frames, and through them the comm's buffers, alive.
            logger.warning(
                "closing connection from %s: bad handshake: %s", comm.peer_address, str(e)
            )
            comm.abort()
            return
        try:
            await self._handle_comm(comm)
        finally:
            comm.abort()

    async def stop(self) -> None:
        """Stop accepting and close the connections still being served (their
        handlers cancelled and awaited, within ``BackgroundTasks``' bound)."""
        await self._tasks.close()
        self._sock.close()


async def listen(
    address: str,
    handle_comm: Callable[[Comm], Awaitable[None]],
    *,
    contact_host: str | None = None,
    tls: TLSConfig | None = None,
) -> Listener:
    """Listen at ``address`` (port 0 picks a free one) and serve each connection.

    ``handle_comm`` owns the comm until it returns; the comm is closed after.
    ``contact_host`` is the host that others should use to reach us when ``address``
    is a wildcard such as ``0.0.0.0``. ``tls://`` serves TLS with ``tls`` (dask's
    configuration when None), requiring each peer's certificate.
    """
    host, port = parse_address(address, default_port=0)
    tls_config = _resolve_tls(address_scheme(address), tls, address)
    context = None if tls_config is None else tls_config.context(server=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    advertised = contact_host or ("127.0.0.1" if is_wildcard(host) else host)
    return Listener(sock, handle_comm, advertised, context)
