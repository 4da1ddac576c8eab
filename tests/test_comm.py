"""The transport against the real thing.

Every test talks over real sockets on 127.0.0.1 to (or from) the real
``distributed.core.Server``, ``distributed.core.rpc``, ``distributed.batched.BatchedSend``
and ``distributed.comm.connect``, or feeds our Server bytes no dask peer would send.
Each test runs its own event loop with ``asyncio.run`` (see ``run``) and waits for
conditions with timeouts, never for luck.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import socket
import struct
import subprocess
import sys
import textwrap
import time
import traceback
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import psutil
import pytest
from distributed.batched import BatchedSend as DaskBatchedSend
from distributed.comm import connect as dask_connect
from distributed.comm.core import CommClosedError as DaskCommClosedError
from distributed.core import Server as DaskServer
from distributed.core import rpc as dask_rpc
from distributed.protocol import to_serialize
from procs import free_port, run_async, wait_for_async

from clusterlaunch.comm import tcp
from clusterlaunch.comm.addressing import format_address, normalize_address, parse_address
from clusterlaunch.comm.batched import BatchedSend
from clusterlaunch.comm.rpc import ConnectionPool, rpc, send_recv
from clusterlaunch.comm.server import NO_REPLY, Server
from clusterlaunch.comm.tcp import CommClosedError, connect
from clusterlaunch.protocol import Serialize, dumps, frames_header
from clusterlaunch.protocol.handshake import local_info

NESTED = (1, (2, (3, "four")), {"k": b"bytes", "n": {"deep": (None, True, 1.5)}}, b"\x00\xff")


# --------------------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def our_server(
    handlers: dict[str, Callable] | None = None,
    stream_handlers: dict[str, Callable] | None = None,
) -> AsyncIterator[Server]:
    server = Server(dict(handlers or {}), stream_handlers, name="test-server")
    await server.listen("tcp://127.0.0.1:0")
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def dask_server(
    tmp_path: Any,
    handlers: dict[str, Callable] | None = None,
    stream_handlers: dict[str, Callable] | None = None,
) -> AsyncIterator[DaskServer]:
    server = DaskServer(
        dict(handlers or {}), stream_handlers=stream_handlers, local_directory=str(tmp_path)
    )
    await server
    await server.listen("tcp://127.0.0.1:0")
    try:
        yield server
    finally:
        await server.close()


def failing_handler(x: Any) -> None:
    raise KeyError(f"no such thing: {x}")


def echo(data: Any = None) -> Any:
    return data


def big_payload(nbytes: int = 500_000_000) -> np.ndarray:
    """``nbytes`` of uint8 in which no 4-byte word repeats (a hash of its position)."""
    words = np.arange(nbytes // 4, dtype=np.uint32)
    words *= np.uint32(2654435761)
    return words.view(np.uint8)


def comm_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith("clusterlaunch.comm") and r.levelno >= logging.WARNING
    ]


@pytest.fixture(autouse=True)
def no_leftover_sockets_or_processes():
    """Each test closes every TCP socket it opened and reaps every process it started."""
    me = psutil.Process()
    yield
    gc.collect()
    assert me.net_connections(kind="inet") == []
    assert me.children() == []


# ---------------------------------------------- our rpc -> distributed.core.Server


def test_our_rpc_calls_dask_server(tmp_path):
    async def main():
        async with (
            dask_server(tmp_path, {"fail": failing_handler}) as server,
            rpc(server.address) as remote,
        ):
            identity = await remote.identity()
            assert identity["type"] == "Server"
            assert identity["id"] == server.id

            assert await remote.echo(data=NESTED) == NESTED

            with pytest.raises(KeyError, match="no such thing: 42") as info:
                await remote.fail(x=42)
            assert type(info.value) is KeyError
            remote_tb = "".join(traceback.format_tb(info.value.__traceback__))
            assert "failing_handler" in remote_tb
            assert "distributed/core.py" in remote_tb

            # The connection is still good after an error reply.
            assert await remote.echo(data="after") == "after"

    run_async(main())


@pytest.mark.slow
def test_our_rpc_sends_500mb_to_dask_server(tmp_path):
    def checksum_and_echo(data):
        return {"crc": zlib.crc32(data), "nbytes": data.nbytes, "data": to_serialize(data)}

    payload = big_payload()
    expected = zlib.crc32(payload)

    async def main():
        async with (
            dask_server(tmp_path, {"big": checksum_and_echo}) as server,
            rpc(server.address) as remote,
        ):
            return await remote.big(data=Serialize(payload))

    reply = run_async(main(), timeout=50)
    assert reply["nbytes"] == payload.nbytes
    assert reply["crc"] == expected
    assert isinstance(reply["data"], np.ndarray) and reply["data"].dtype == np.uint8
    assert zlib.crc32(reply["data"]) == expected


def test_empty_multidimensional_buffers_travel():
    """An empty DataFrame's blocks are 2-D buffers with a zero in their shape: they go
    out as empty frames, in a reply (pickled) and in a Serialize (dask family)."""
    import pandas as pd

    empty_frame = pd.DataFrame({"k": [1], "x": [1.0]}).iloc[:0]
    empty_2d = np.empty((3, 0))

    async def main():
        async with our_server({"echo": echo}) as server, dask_rpc(server.address) as remote:
            frame, array = await remote.echo(data=[empty_frame, empty_2d])
            assert frame.equals(empty_frame) and array.shape == (3, 0)
            comm = await connect(server.address)
            try:
                got = await send_recv(comm, op="echo", data=Serialize(empty_frame))
            finally:
                await comm.close()
            assert got.equals(empty_frame)

    run_async(main())


# ---------------------------------------------- distributed.core.rpc -> our Server


def test_dask_rpc_calls_our_server():
    async def main():
        async with (
            our_server({"echo": echo, "fail": failing_handler}) as server,
            dask_rpc(server.address) as remote,
        ):
            identity = await remote.identity()
            assert identity == {
                "type": "Server",
                "id": "test-server",
                "address": server.address,
            }

            assert await remote.echo(data=NESTED) == NESTED

            with pytest.raises(KeyError, match="no such thing: 42") as info:
                await remote.fail(x=42)
            assert type(info.value) is KeyError
            remote_tb = "".join(traceback.format_tb(info.value.__traceback__))
            assert "failing_handler" in remote_tb
            assert "clusterlaunch/comm/server.py" in remote_tb

            assert await remote.echo(data="after") == "after"

    run_async(main())


@pytest.mark.slow
def test_dask_rpc_sends_500mb_to_our_server():
    def checksum_and_echo(data):
        return {"crc": zlib.crc32(data), "nbytes": data.nbytes, "data": Serialize(data)}

    payload = big_payload()
    expected = zlib.crc32(payload)

    async def main():
        async with (
            our_server({"big": checksum_and_echo}) as server,
            dask_rpc(server.address) as remote,
        ):
            return await remote.big(data=to_serialize(payload))

    reply = run_async(main(), timeout=50)
    assert reply["nbytes"] == payload.nbytes
    assert reply["crc"] == expected
    assert isinstance(reply["data"], np.ndarray) and reply["data"].dtype == np.uint8
    assert zlib.crc32(reply["data"]) == expected


# ------------------------------------------------------------------ BatchedSend


def test_our_batched_send_feeds_dask_stream_handler(tmp_path):
    received: list[int] = []

    async def main():
        handlers = {"record": lambda i: received.append(i)}
        async with dask_server(tmp_path, stream_handlers=handlers) as server:
            comm = await connect(server.address)
            await comm.write({"op": "connection_stream", "reply": False})
            stream = BatchedSend(interval=0.01)
            stream.start(comm)
            for i in range(200):
                stream.send({"op": "record", "i": i})
                if i % 10 == 9:
                    await asyncio.sleep(0.001)  # let the sender run between bursts
            await wait_for_async(lambda: len(received) == 200, 5, "200 messages")
            assert received == list(range(200))
            assert stream.message_count == 200
            assert 1 <= stream.batch_count < 200

            # close() sends what is still queued.
            stream.send(*({"op": "record", "i": i} for i in range(200, 250)))
            await stream.close()
            await wait_for_async(lambda: len(received) == 250, 5, "the flushed batch")
            assert received == list(range(250))
            with pytest.raises(CommClosedError):
                stream.send({"op": "record", "i": -1})
            await wait_for_async(lambda: not server._comms, 5, "the server to drop the stream")

            # abort() drops what is queued.
            comm = await connect(server.address)
            await comm.write({"op": "connection_stream", "reply": False})
            stream = BatchedSend(interval=0.01)
            stream.start(comm)
            stream.send(*({"op": "record", "i": -i} for i in range(1, 11)))
            stream.abort()
            with pytest.raises(CommClosedError):
                stream.send({"op": "record", "i": -99})
            await wait_for_async(lambda: not server._comms, 5, "the server to drop the stream")
            assert received == list(range(250))

    run_async(main())


def test_dask_batched_send_feeds_our_stream_handler():
    received: list[int] = []
    batches: list[int] = []

    async def main():
        async with our_server(stream_handlers={"record": lambda i: received.append(i)}) as server:

            async def counting_stream(comm):
                # Count the batches arriving by wrapping this comm's read.
                read = comm.read

                async def read_and_count():
                    msg = await read()
                    batches.append(len(msg))
                    return msg

                comm.read = read_and_count
                await server.handle_stream(comm)

            server.handlers["connection_stream"] = counting_stream
            comm = await dask_connect(server.address)
            await comm.write({"op": "connection_stream", "reply": False})
            stream = DaskBatchedSend(interval="10ms")
            stream.start(comm)
            for i in range(200):
                stream.send({"op": "record", "i": i})
                if i % 10 == 9:
                    await asyncio.sleep(0.001)
            await wait_for_async(lambda: len(received) == 200, 5, "200 messages")
            assert received == list(range(200))
            assert sum(batches) == 200
            assert 1 <= len(batches) < 200

            stream.send(*({"op": "record", "i": i} for i in range(200, 250)))
            await stream.close()
            await wait_for_async(lambda: len(received) == 250, 5, "the flushed batch")
            assert received == list(range(250))
            with pytest.raises(DaskCommClosedError):
                stream.send({"op": "record", "i": -1})
            await wait_for_async(lambda: not server._comms, 5, "the server to drop the stream")

            comm = await dask_connect(server.address)
            await comm.write({"op": "connection_stream", "reply": False})
            stream = DaskBatchedSend(interval="10ms")
            stream.start(comm)
            stream.send(*({"op": "record", "i": -i} for i in range(1, 11)))
            stream.abort()
            with pytest.raises(DaskCommClosedError):
                stream.send({"op": "record", "i": -99})
            await wait_for_async(lambda: not server._comms, 5, "the server to drop the stream")
            assert received == list(range(250))

    run_async(main())


def test_close_stream_ends_our_stream_and_closes_the_connection():
    received: list[int] = []

    async def main():
        async with our_server(stream_handlers={"record": lambda i: received.append(i)}) as server:
            server.handlers["connection_stream"] = server.handle_stream
            comm = await dask_connect(server.address)
            await comm.write({"op": "connection_stream", "reply": False})
            await comm.write([{"op": "record", "i": 1}, {"op": "close-stream"}])
            with pytest.raises(DaskCommClosedError):
                await asyncio.wait_for(comm.read(), 5)
            assert received == [1]
            comm.abort()

    run_async(main())


# ---------------------------------------------------------------- ConnectionPool


def test_pool_reuses_connections():
    async def main():
        async with our_server({"peer": lambda comm: comm.peer_address}) as server:
            pool = ConnectionPool(limit=4)
            try:
                first = await pool(server.address).peer()
                second = await pool(server.address).peer()
                # Same client-side port: the second call went over the same connection.
                assert first == second
                assert pool.open == 1 and pool.active == 0
                assert len(server._comms) == 1
                # Another spelling of the same address shares the pool's connections.
                port = parse_address(server.address)[1]
                assert await pool(f"127.0.0.1:{port}").peer() == first
            finally:
                await pool.close()

    run_async(main())


def test_pool_limit_holds_under_concurrency():
    state = {"active": 0, "max_active": 0, "max_open": 0}

    async def main():
        pool = ConnectionPool(limit=2)
        release = asyncio.Event()

        async def hold(i):
            state["active"] += 1
            state["max_active"] = max(state["max_active"], state["active"])
            state["max_open"] = max(state["max_open"], pool.open)
            await release.wait()
            state["active"] -= 1
            return i

        async with our_server({"hold": hold}) as server:
            try:
                calls = [asyncio.ensure_future(pool(server.address).hold(i=i)) for i in range(5)]
                await wait_for_async(lambda: state["active"] == 2, 5, "two calls in flight")
                for _ in range(50):  # give a third connection every chance to appear
                    await asyncio.sleep(0)
                assert state["active"] == 2 and pool.open == 2
                release.set()
                results = await asyncio.wait_for(asyncio.gather(*calls), 10)
                assert results == [0, 1, 2, 3, 4]
                assert pool.open <= 2 and pool.active == 0
            finally:
                await pool.close()

    run_async(main())
    assert state["max_active"] == 2
    assert state["max_open"] <= 2


def test_pool_remove_drops_connections_to_dead_peer():
    async def main():
        pool = ConnectionPool(limit=4, timeout=0.5)
        try:
            async with our_server({"echo": echo}) as server:
                address = server.address
                assert await pool(address).echo(data=1) == 1
                assert pool.open == 1
            pool.remove(address)
            assert pool.open == 0
            start = time.monotonic()
            with pytest.raises(OSError, match=address):
                await pool(address).echo(data=2)
            assert time.monotonic() - start < 3
            assert pool.open == 0 and pool.active == 0
        finally:
            await pool.close()

    run_async(main())


def test_pool_errors_from_vanished_peer():
    async def main():
        pool = ConnectionPool(limit=4, timeout=0.5)

        def die(comm):
            comm.abort()  # the peer goes away in the middle of the call
            return NO_REPLY

        try:
            async with our_server({"echo": echo, "die": die}) as server:
                address = server.address
                with pytest.raises(CommClosedError):
                    await pool(address).die()
                assert pool.open == 0 and pool.active == 0
                assert await pool(address).echo(data=1) == 1
            # The server is gone; its idle connection in the pool is stale.
            with pytest.raises(CommClosedError):
                await pool(address).echo(data=2)
            assert pool.open == 0 and pool.active == 0
            with pytest.raises(OSError, match=address):
                await pool(address).echo(data=3)
        finally:
            await pool.close()

    run_async(main())


def test_rpc_close_releases_its_connections():
    async def main():
        async with our_server({"echo": echo}) as server:
            async with rpc(server.address) as remote:
                results = await asyncio.gather(*(remote.echo(data=i) for i in range(3)))
                assert results == [0, 1, 2]
                assert server._comms
            await wait_for_async(lambda: not server._comms, 5, "rpc connections to close")

    run_async(main())


# -------------------------------------------------------------- Server semantics


def test_server_reply_false_sends_nothing():
    recorded: list[int] = []

    async def main():
        async with our_server({"record": lambda x: recorded.append(x), "echo": echo}) as server:
            comm = await connect(server.address)
            try:
                assert await send_recv(comm, op="record", x=1, reply=False) is None
                assert await send_recv(comm, op="record", x=2, reply=False) is None
                # The next reply on this connection is echo's, not a stray one.
                assert await send_recv(comm, op="echo", data="next") == "next"
                assert recorded == [1, 2]
            finally:
                comm.abort()

    run_async(main())


def test_server_close_true_closes_after_reply():
    async def main():
        async with our_server({"echo": echo}) as server:
            comm = await connect(server.address)
            assert await send_recv(comm, op="echo", data=1, close=True) == 1
            assert comm.closed()
            await wait_for_async(lambda: not server._comms, 5, "the server to close its side")

            # Through a pool: the closed connection is not handed out again.
            pool = ConnectionPool(limit=2)
            try:
                assert await pool(server.address).echo(data=2, close=True) == 2
                assert pool.open == 0
                assert await pool(server.address).echo(data=3) == 3
            finally:
                await pool.close()

    run_async(main())


def test_server_op_close_ends_connection():
    async def main():
        async with our_server({"echo": echo}) as server:
            comm = await connect(server.address)
            try:
                assert await send_recv(comm, op="close") == "OK"
                with pytest.raises(CommClosedError):
                    await asyncio.wait_for(comm.read(), 5)
            finally:
                comm.abort()
            # Without a reply asked for, the server just goes.
            comm = await connect(server.address)
            try:
                await send_recv(comm, op="close", reply=False)
                with pytest.raises(CommClosedError):
                    await asyncio.wait_for(comm.read(), 5)
            finally:
                comm.abort()

    run_async(main())


def test_server_unknown_op_raises_remotely():
    async def main():
        async with our_server({"echo": echo}) as server:
            async with rpc(server.address) as remote:
                with pytest.raises(ValueError, match="no_such_op"):
                    await remote.no_such_op(x=1)
                assert await remote.echo(data=1) == 1
            async with dask_rpc(server.address) as remote:
                with pytest.raises(ValueError, match="no_such_op"):
                    await remote.no_such_op(x=1)
                assert await remote.echo(data=2) == 2

    run_async(main())


def test_server_handler_signatures():
    async def add(x, y):
        await asyncio.sleep(0)
        return x + y

    async def async_peer(comm, tag):
        await asyncio.sleep(0)
        return [comm.peer_address, tag]

    handlers = {
        "add": add,
        "peer": lambda comm, tag: [comm.peer_address, tag],
        "async_peer": async_peer,
        "nothing": lambda: None,
    }

    async def main():
        async with our_server(handlers) as server:
            comm = await connect(server.address)
            try:
                assert await send_recv(comm, op="add", x=1, y=2) == 3
                assert await send_recv(comm, op="peer", tag="t") == (comm.local_address, "t")
                assert await send_recv(comm, op="async_peer", tag="u") == (comm.local_address, "u")
                assert await send_recv(comm, op="nothing") is None
            finally:
                comm.abort()

    run_async(main())


def test_server_no_reply_lets_handler_answer_itself():
    async def countdown(comm, n):
        for i in range(n, 0, -1):
            await comm.write(i)
        return NO_REPLY

    async def main():
        async with our_server({"countdown": countdown, "echo": echo}) as server:
            comm = await connect(server.address)
            try:
                await comm.write({"op": "countdown", "n": 3})
                assert [await comm.read() for _ in range(3)] == [3, 2, 1]
                assert await send_recv(comm, op="echo", data="then") == "then"
            finally:
                comm.abort()

    run_async(main())


# ------------------------------------------------------------ malformed input


def encoded(msg: Any) -> bytes:
    """``msg`` as the bytes of one framed message."""
    frames = [bytes(memoryview(f).cast("B")) for f in dumps(msg)]
    return frames_header([len(f) for f in frames]) + b"".join(frames)


def prelude(*lengths: int, head_nbytes: int | None = None) -> bytes:
    """A message's length words, with no frames grouped into the head block."""
    words = struct.pack(f"<Q{len(lengths)}Q", len(lengths), *lengths)
    return struct.pack("<Q", len(words) if head_nbytes is None else head_nbytes) + words


HANDSHAKE = encoded(local_info())
TB = 1 << 40

# name -> (bytes sent, whether we then close our sending side)
BAD_INPUT = {
    "random-bytes": (random.Random(0).randbytes(4096), True),
    "random-bytes-held-open": (random.Random(1).randbytes(64), False),
    "truncated-handshake": (prelude(1000) + b"x" * 100, True),
    "truncated-after-handshake": (HANDSHAKE + prelude(10, 100_000) + b"y" * 5000, True),
    "frame-length-2**63": (prelude(2**63), False),
    "frame-length-2**63-after-handshake": (HANDSHAKE + prelude(10, 2**63), False),
    "head-length-2**63": (prelude(10, head_nbytes=2**63) + b"z" * 10, False),
    "frame-count-2**40": (struct.pack("<QQ", 16, 2**40), False),
    "frame-count-2**64-1": (struct.pack("<QQ", 16, 2**64 - 1), False),
    "frame-count-2**40-after-handshake": (HANDSHAKE + struct.pack("<QQ", 16, 2**40), False),
    "zero-frames": (struct.pack("<QQ", 8, 0), False),
    "bad-msgpack-after-handshake": (HANDSHAKE + prelude(1) + b"\xc1", False),
    "not-a-request-after-handshake": (HANDSHAKE + encoded(42), False),
    "handshake-not-a-dict": (encoded([1, 2, 3]), False),
    "http-request": (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n", False),
    "silent": (b"", False),
}


async def send_raw(address: str, payload: bytes, *, half_close: bool) -> None:
    """Send ``payload`` on a new raw connection and wait for the server to close it."""
    host, port = parse_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        with contextlib.suppress(ConnectionError):
            if payload:
                writer.write(payload)
                await writer.drain()
            if half_close:
                writer.write_eof()
        with contextlib.suppress(ConnectionResetError):
            while await asyncio.wait_for(reader.read(1 << 16), 5):
                pass  # the server's handshake, then EOF once it gives up on us
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_malformed_input_is_dropped_with_one_warning(case, caplog, monkeypatch):
    monkeypatch.setattr(tcp, "HANDSHAKE_TIMEOUT", 0.3)
    caplog.set_level(logging.WARNING)
    payload, half_close = BAD_INPUT[case]

    async def main():
        async with our_server({"echo": echo}) as server:
            comm = await connect(server.address)  # a good connection, open throughout
            try:
                assert await send_recv(comm, op="echo", data="before") == "before"
                bad = asyncio.ensure_future(
                    send_raw(server.address, payload, half_close=half_close)
                )
                # Served while the bad connection is being dealt with, and after.
                assert await send_recv(comm, op="echo", data="during") == "during"
                await bad
                await wait_for_async(lambda: len(comm_warnings(caplog)) >= 1, 5, "a warning")
                await wait_for_async(lambda: len(server._comms) == 1, 5, "bad comm to go")
                await wait_for_async(
                    lambda: server.listener.connections == 1, 5, "bad connection to go"
                )
                assert await send_recv(comm, op="echo", data="after") == "after"
                async with rpc(server.address) as remote:
                    assert await remote.echo(data="new") == "new"
            finally:
                comm.abort()

    run_async(main())
    warnings = comm_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    (record,) = warnings
    assert "\n" not in record.getMessage() and record.exc_info is None
    assert "127.0.0.1" in record.getMessage()


def test_memory_stays_bounded_under_huge_declared_frames(caplog):
    caplog.set_level(logging.WARNING)
    attacks = [prelude(TB), HANDSHAKE + prelude(TB), HANDSHAKE + prelude(10, TB // 2, TB // 2)]
    process = psutil.Process()

    async def wave(address: str, n: int, offset: int) -> None:
        await asyncio.gather(
            *(
                send_raw(address, attacks[(offset + i) % len(attacks)], half_close=False)
                for i in range(n)
            )
        )

    async def main():
        async with (
            our_server({"echo": echo}) as server,
            rpc(server.address) as remote,
        ):
            await wave(server.address, 20, 0)  # warm up allocator and caches
            await wait_for_async(lambda: len(comm_warnings(caplog)) == 20, 5, "20 warnings")
            gc.collect()
            before = process.memory_info().rss
            for i in range(10):
                await wave(server.address, 20, i)
                assert await remote.echo(data=i) == i
            await wait_for_async(lambda: len(comm_warnings(caplog)) == 220, 5, "220 warnings")
            await wait_for_async(
                lambda: server.listener.connections == 1, 5, "bad connections to go"
            )
            gc.collect()
            grown = process.memory_info().rss - before
            assert grown < 50e6, f"RSS grew by {grown / 1e6:.0f} MB"

    run_async(main(), timeout=50)
    assert len(comm_warnings(caplog)) == 220


# -------------------------------------------------------------- connect, addresses


def test_connect_refused_fails_within_timeout():
    address = f"tcp://127.0.0.1:{free_port()}"

    async def main():
        start = time.monotonic()
        with pytest.raises(OSError, match=address) as info:
            await connect(address, timeout=0.5)
        assert not isinstance(info.value, CommClosedError)
        assert time.monotonic() - start < 2

    run_async(main())


def test_connect_to_mute_listener_fails_naming_address(monkeypatch):
    monkeypatch.setattr(tcp, "HANDSHAKE_TIMEOUT", 0.3)
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)  # accepts in the kernel, never says anything
        address = format_address(*mute.getsockname())

        async def main():
            start = time.monotonic()
            with pytest.raises(OSError, match=address):
                await connect(address, timeout=0.3)
            assert time.monotonic() - start < 2

        run_async(main())


@pytest.mark.parametrize(
    "address, expected",
    [
        ("tcp://127.0.0.1:8786", ("127.0.0.1", 8786)),
        ("127.0.0.1:8786", ("127.0.0.1", 8786)),
        ("  tcp://host.example:0 ", ("host.example", 0)),
        ("tcp://[::1]:8786", ("::1", 8786)),
        ("tcp://[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
        ("[::1]:1", ("::1", 1)),
    ],
)
def test_parse_address(address, expected):
    assert parse_address(address) == expected
    assert parse_address(normalize_address(address)) == expected


@pytest.mark.parametrize(
    "address",
    [
        "",
        "   ",
        None,
        8786,
        "udp://127.0.0.1:8786",
        "inproc://x",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:",
        "tcp://:8786",
        "tcp://127.0.0.1:65536",
        "tcp://127.0.0.1:-1",
        "tcp://127.0.0.1:port",
        "tcp://127.0.0.1:80/path",
        "tcp://::1:8786",
        "tcp://[::1",
        "tcp://[::1]8786",
        "tcp://[]:8786",
    ],
)
def test_parse_address_rejects_malformed(address):
    with pytest.raises(ValueError) as info:
        parse_address(address)
    message = str(info.value)
    assert "\n" not in message
    assert "invalid address" in message


def test_address_defaults_and_formatting():
    assert parse_address("tcp://[::1]", default_port=0) == ("::1", 0)
    assert parse_address("tcp://host", default_port=8786) == ("host", 8786)
    assert format_address("::1", 8786) == "tcp://[::1]:8786"
    assert normalize_address("127.0.0.1:1") == "tcp://127.0.0.1:1"


def test_connect_and_listen_reject_malformed_addresses():
    async def main():
        with pytest.raises(ValueError, match="invalid address"):
            await connect("tcp://::1:8786", timeout=1)
        with pytest.raises(ValueError, match="invalid address"):
            await connect("udp://127.0.0.1:8786", timeout=1)
        with pytest.raises(ValueError, match="invalid address"):
            await Server({}).listen("tcp://127.0.0.1:99999")

    run_async(main())


# --------------------------------------------------------------------- imports


def test_comm_does_not_import_distributed_or_tornado():
    code = textwrap.dedent(
        """
        import asyncio, sys
        import clusterlaunch.comm.addressing, clusterlaunch.comm.batched
        import clusterlaunch.comm.rpc, clusterlaunch.comm.server, clusterlaunch.comm.tcp
        import numpy as np
        from clusterlaunch.comm.rpc import rpc
        from clusterlaunch.comm.server import Server
        from clusterlaunch.protocol import Serialize

        async def main():
            server = Server({"echo": lambda data: Serialize(data)})
            await server.listen()
            async with rpc(server.address) as remote:
                out = await remote.echo(data=Serialize(np.arange(10)))
            await server.stop()
            assert out.tolist() == list(range(10))

        asyncio.run(main())
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("distributed", "tornado"))
        print(leaked)
        sys.exit(1 if leaked else 0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
