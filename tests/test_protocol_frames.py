"""Framing on the byte stream against the real thing: distributed's TCP comm."""

from __future__ import annotations

import asyncio
import random
import struct
from contextlib import suppress

import distributed.comm
import distributed.protocol as dp
import numpy as np
import pandas as pd
import pytest
from distributed.comm.tcp import _add_frames_header
from distributed.protocol.utils import unpack_frames
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import assert_same
from wire import distributed_read, distributed_wire, feed, our_wire

import clusterlaunch.protocol.frames as frames_module
from clusterlaunch.protocol import (
    FrameReceiver,
    ProtocolError,
    Serialize,
    dumps,
    frames_header,
    loads,
)
from clusterlaunch.protocol.frames import SMALL_FRAME_BYTES, allocate
from clusterlaunch.protocol.handshake import local_info, negotiate

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORD = struct.Struct("<Q")

#: Sizes of the transport's reads, cycled; each pattern ends in a large read (capped by
#: the buffer offered) so that megabytes don't take a million tiny reads.
CHUNK_SIZES = st.lists(
    st.one_of(st.integers(1, 16), st.integers(1, 5000), st.integers(1, 300_000)),
    max_size=7,
).map(lambda sizes: [*sizes, 1 << 20])
FRAME_LENGTHS = st.lists(
    st.one_of(st.just(0), st.integers(1, 100), st.integers(1, 3 * SMALL_FRAME_BYTES)),
    min_size=1,
    max_size=12,
)


def make_frames(lengths: list[int], seed: int = 0) -> list:
    """Frames of the given lengths with recognisable contents: alternately ``bytes``
    and views of bytearrays, since distributed groups the two kinds differently."""
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        data = rng.randbytes(n)
        out.append(data if i % 2 == 0 else memoryview(bytearray(data)))
    return out


def assert_frames(received: list[memoryview], sent: list) -> None:
    assert [bytes(f) for f in received] == [bytes(f) for f in sent]
    for frame in received:
        assert not frame.readonly, "received frames must be writeable"


def head_nbytes(wire: bytes) -> int:
    return WORD.unpack_from(wire)[0]


def ends_on_a_frame(head: int, lengths: list[int]) -> bool:
    prelude = WORD.size * (1 + len(lengths))
    boundaries = {prelude}
    for n in lengths:
        boundaries.add(max(boundaries) + n)
    return head in boundaries


# --------------------------------------------------------------------- same bytes as distributed


@SETTINGS
@given(FRAME_LENGTHS, CHUNK_SIZES, st.integers(0, 2**32))
def test_header_matches_distributed(lengths, chunk_sizes, seed):
    frames = make_frames(lengths, seed)
    ours = our_wire(frames)
    theirs = distributed_wire(frames)
    # Everything after the head word is the same bytes: prelude, then frames.
    assert ours[8:] == theirs[8:]
    assert ours[8:16] == WORD.pack(len(frames))
    # Each side may group a different number of leading frames in the head block,
    # but always ends it on a frame boundary, which is what the readers rely on.
    assert ends_on_a_frame(head_nbytes(ours), lengths)
    assert ends_on_a_frame(head_nbytes(theirs), lengths)
    for wire in (ours, theirs):
        [received] = feed(receiver := FrameReceiver(), wire, chunk_sizes)
        assert_frames(received, frames)
        assert receiver.idle
        received, rest = distributed_read(wire)
        assert_frames(received, frames)
        assert len(rest) == 0


@pytest.mark.parametrize(
    "lengths",
    [[0], [0, 0, 0], [0, 5, 0], [5, 0], [0, 3 * SMALL_FRAME_BYTES, 0], [SMALL_FRAME_BYTES, 0, 1]],
)
def test_zero_length_frames(lengths):
    frames = make_frames(lengths)
    assert distributed_wire(frames)[8:] == our_wire(frames)[8:]
    for wire in (our_wire(frames), distributed_wire(frames)):
        for chunks in ([1, 1 << 20], [7], [1 << 20]):
            [received] = feed(FrameReceiver(), wire, chunks)
            assert_frames(received, frames)
        received, _ = distributed_read(wire)
        assert_frames(received, frames)


def test_our_head_block_is_read_by_unpack_frames():
    lengths = [3, 0, 100, SMALL_FRAME_BYTES, 7, 0]
    frames = make_frames(lengths)
    wire = our_wire(frames)
    head = head_nbytes(wire)
    block = bytearray(wire[8 : 8 + head])
    got, missing = unpack_frames(block, partial=True)
    assert [bytes(f) for f in got] == [bytes(f) for f in frames[: len(got)]]
    assert missing == lengths[len(got) :]
    assert len(got) == 3, "small leading frames are grouped in the head block"


@SETTINGS
@given(
    st.lists(st.tuples(FRAME_LENGTHS, st.booleans()), min_size=1, max_size=5),
    CHUNK_SIZES,
    st.sampled_from([16, 1000, 4 * SMALL_FRAME_BYTES, 1 << 20]),
)
def test_stream_of_messages_in_random_chunks(messages, chunk_sizes, buffer_bytes):
    sent = []
    stream = bytearray()
    for i, (lengths, ours) in enumerate(messages):
        frames = make_frames(lengths, seed=i)
        sent.append(frames)
        stream += our_wire(frames) if ours else distributed_wire(frames)
    receiver = FrameReceiver(buffer_bytes=buffer_bytes)
    received = feed(receiver, stream, chunk_sizes)
    assert len(received) == len(sent)
    for got, frames in zip(received, sent):
        assert_frames(got, frames)
    assert receiver.idle
    assert receiver.pop_message() is None


def test_partial_message_is_not_idle():
    wire = our_wire([b"abc", b"defg"])
    receiver = FrameReceiver()
    assert receiver.idle
    for i in range(len(wire) - 1):
        assert feed(receiver, wire[i : i + 1]) == []
        assert not receiver.idle
    [message] = feed(receiver, wire[-1:])
    assert_frames(message, [b"abc", b"defg"])
    assert receiver.idle


def test_thousands_of_frames():
    rng = random.Random(42)
    lengths = [
        rng.choice([0, 0, 1, 8, rng.randrange(200), rng.randrange(5000)]) for _ in range(6000)
    ]
    frames = make_frames(lengths, seed=1)
    ours, theirs = our_wire(frames), distributed_wire(frames)
    assert ours[8:] == theirs[8:]
    for wire in (ours, theirs):
        [received] = feed(FrameReceiver(), wire, [rng.randrange(1, 100_000) for _ in range(50)])
        assert_frames(received, frames)
        received, _ = distributed_read(wire)
        assert_frames(received, frames)


def test_thousands_of_payloads():
    arrays = [np.full(i % 9, i, dtype="i8") for i in range(1500)]
    for frames in (
        dumps({"xs": [Serialize(a) for a in arrays]}),
        dp.dumps({"xs": [dp.to_serialize(a) for a in arrays]}, context={"compression": None}),
    ):
        assert len(frames) > 3000
        for wire in (our_wire(frames), distributed_wire(frames)):
            [received] = feed(FrameReceiver(), wire, [65536, 13])
            assert_same(loads(received), {"xs": tuple(arrays)})
            oracle, _ = distributed_read(wire)
            assert_same(dp.loads(oracle), {"xs": tuple(arrays)})


def test_gigabyte_frame():
    """A 1 GiB frame is read straight into a buffer: of its own under our header, and
    under distributed's (which groups it into its head block) into the head block's,
    which holds the small frames around it too. Only a few pages of it are ever
    touched, so the test is cheap."""
    big_nbytes = 1 << 30
    big = allocate(big_nbytes)
    marks = {0: b"first", 12345: b"middle", big_nbytes - 4: b"last"}
    for offset, mark in marks.items():
        big[offset : offset + len(mark)] = mark
    frames = [b"head", big, b"", b"tail"]
    lengths = [4, big_nbytes, 0, 4]
    ours = frames_header(lengths)
    theirs = bytes(_add_frames_header(frames)[0][0])
    assert ours[8:] == theirs[8:]
    assert head_nbytes(ours) == len(ours) - 8 + 4
    assert head_nbytes(theirs) == len(theirs) - 8 + sum(lengths)
    # distributed's reader logic on our head block
    got, missing = unpack_frames(bytearray(ours[8:] + b"head"), partial=True)
    assert [bytes(f) for f in got] == [b"head"] and missing == [big_nbytes, 0, 4]

    # Where each mark lies in the bytes after the header.
    stream_marks = {0: b"head", 4 + big_nbytes: b"tail"}
    stream_marks.update({4 + offset: mark for offset, mark in marks.items()})
    # (header, where the big read starts in those bytes, its length)
    reads = [(ours, 4, big_nbytes), (theirs, 0, big_nbytes + 8)]
    for header, block_start, block_nbytes in reads:
        receiver = FrameReceiver()
        feed(receiver, header + b"head"[:block_start])
        target = receiver.get_buffer()
        assert target.nbytes == block_nbytes, "the big read gets a buffer of its own"
        placed = {
            offset - block_start: mark
            for offset, mark in stream_marks.items()
            if block_start <= offset < block_start + block_nbytes
        }
        # the transport writes into it in reads of any size; copy only the marks
        cuts = [0, 12345 + 3, block_nbytes // 2, block_nbytes]
        for start, end in zip(cuts, cuts[1:]):
            view = receiver.get_buffer()
            assert view.nbytes == block_nbytes - start
            for offset, mark in placed.items():
                lo, hi = max(offset, start), min(offset + len(mark), end)
                if lo < hi:
                    view[lo - start : hi - start] = mark[lo - offset : hi - offset]
            receiver.buffer_updated(end - start)
        if block_start:
            assert receiver.pop_message() is None
            [message] = feed(receiver, b"tail")
        else:
            message = receiver.pop_message()
        assert [f.nbytes for f in message] == lengths
        assert bytes(message[0]) == b"head" and bytes(message[3]) == b"tail"
        for offset, mark in marks.items():
            assert bytes(message[1][offset : offset + len(mark)]) == mark
        assert not message[1].readonly
        assert receiver.idle
        del message, target, view


# --------------------------------------------------------------------- limits and garbage


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if the receiver allocates a buffer for a frame."""

    def refuse(nbytes):
        raise AssertionError(f"allocated {nbytes} bytes before checking the limits")

    monkeypatch.setattr(frames_module, "allocate", refuse)


def raw_header(head: int, lengths: list[int]) -> bytes:
    return WORD.pack(head) + struct.pack(f"<Q{len(lengths)}Q", len(lengths), *lengths)


def prelude_nbytes(lengths: list[int]) -> int:
    return WORD.size * (1 + len(lengths))


def test_frame_count_limit(no_allocation):
    with pytest.raises(ProtocolError, match="frames"):
        feed(FrameReceiver(max_frames=3), raw_header(40, [1, 1, 1, 1]))
    [message] = feed(FrameReceiver(max_frames=3), our_wire([b"a", b"b", b"c"]))
    assert len(message) == 3


@pytest.mark.parametrize("count", [2**20 + 1, 2**40, 2**63, 2**64 - 1])
def test_absurd_frame_counts(no_allocation, count):
    # just the count: the receiver must refuse before reading (or allocating) lengths
    with pytest.raises(ProtocolError):
        feed(FrameReceiver(), WORD.pack(8 * (count + 1) % 2**64) + WORD.pack(count))


def test_message_size_limit(no_allocation):
    with pytest.raises(ProtocolError, match="bytes"):
        feed(FrameReceiver(max_message_bytes=100), raw_header(24, [50, 51]))
    [message] = feed(FrameReceiver(max_message_bytes=100), our_wire([b"x" * 50, b"y" * 50]))
    assert [f.nbytes for f in message] == [50, 50]


@pytest.mark.parametrize("lengths", [[2**63], [2**64 - 1], [1, 2**62, 2**62], [2**40 + 1]])
def test_absurd_frame_lengths(no_allocation, lengths):
    with pytest.raises(ProtocolError):
        feed(FrameReceiver(), raw_header(prelude_nbytes(lengths), lengths))


@pytest.mark.parametrize(
    "head, lengths",
    [
        (8 * 3 + 5, [10, 10]),  # ends inside the first frame
        (8 * 3 + 25, [10, 10]),  # past the last frame
        (8 * 3 - 1, [10, 10]),  # inside the prelude
        (0, [10]),
        (2**63, [10]),
        (2**64 - 1, [0]),
    ],
)
def test_head_block_off_a_frame_boundary(no_allocation, head, lengths):
    with pytest.raises(ProtocolError, match="head block"):
        feed(FrameReceiver(), raw_header(head, lengths) + b"\x00" * sum(lengths))


def test_zero_frames():
    with pytest.raises(ProtocolError, match="no frames"):
        feed(FrameReceiver(), WORD.pack(8) + WORD.pack(0))


@pytest.mark.parametrize("error", [MemoryError(), OSError(12, "Cannot allocate memory")])
def test_allocation_failure_is_a_protocol_error(monkeypatch, error):
    """A frame we can't hold (say 512 GiB, under the default 1 TiB limit) ends the
    stream with a ProtocolError like any other unreadable stream."""

    def fail(nbytes):
        raise error

    monkeypatch.setattr(frames_module, "allocate", fail)
    with pytest.raises(ProtocolError, match="allocate"):
        feed(FrameReceiver(), raw_header(16, [1 << 39]))


@settings(max_examples=400, deadline=None)
@given(
    st.binary(max_size=600),
    CHUNK_SIZES,
    st.sampled_from([(16, 1 << 12), (1 << 20, 1 << 40)]),
    st.sampled_from([16, 4 * SMALL_FRAME_BYTES]),
)
def test_random_bytes_raise_only_protocol_error(data, chunk_sizes, limits, buffer_bytes):
    max_frames, max_message_bytes = limits
    receiver = FrameReceiver(
        max_frames=max_frames, max_message_bytes=max_message_bytes, buffer_bytes=buffer_bytes
    )
    try:
        messages = feed(receiver, data, chunk_sizes)
    except ProtocolError:
        return
    for message in messages:
        assert 1 <= len(message) <= max_frames
        assert sum(f.nbytes for f in message) <= max_message_bytes


@settings(max_examples=200, deadline=None)
@given(FRAME_LENGTHS.filter(lambda x: len(x) < 6), st.data())
def test_corrupted_header_raises_only_protocol_error(lengths, data):
    """A valid message with one byte of its header changed: parsed to some message or
    refused with ProtocolError, nothing else."""
    wire = bytearray(our_wire(make_frames(lengths)))
    header_nbytes = 8 + prelude_nbytes(lengths)
    position = data.draw(st.integers(0, header_nbytes - 1))
    wire[position] = data.draw(st.integers(0, 255))
    with suppress(ProtocolError):
        feed(FrameReceiver(max_message_bytes=1 << 24), wire, data.draw(CHUNK_SIZES))


# --------------------------------------------------------------------- a real distributed comm


class OurEnd:
    """The test's side of a TCP connection, framed and encoded by clusterlaunch."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.receiver = FrameReceiver()
        self.raw = bytearray()  # every byte the peer sent, to re-parse later
        self.pending: list[list[memoryview]] = []

    async def read_frames(self) -> list[memoryview] | None:
        while not self.pending:
            data = await self.reader.read(SMALL_FRAME_BYTES)
            if not data:
                return None
            self.raw += data
            self.pending += feed(self.receiver, data)
        return self.pending.pop(0)

    async def write(self, msg) -> None:
        self.writer.write(our_wire(dumps(msg)))
        await self.writer.drain()


def messages_from_distributed() -> list[dict]:
    return [
        {"op": "ping", "x": [1, 2, ("x", 1)], ("k", 0): None},
        {
            "op": "data",
            "a": dp.to_serialize(np.arange(100_000)),
            "b": dp.to_serialize(np.ones((300, 300), order="F")),
            "c": dp.ToPickle(pd.DataFrame({"x": np.arange(50_000.0)})),
        },
        {"op": "many", "xs": [dp.to_serialize(np.arange(i % 5)) for i in range(2000)]},
        {"op": "empty", "b": dp.to_serialize(b""), "a": dp.to_serialize(np.empty(0))},
    ]


def reply_from_us() -> dict:
    return {
        "op": "reply",
        "big": Serialize(np.arange(500_000, dtype="f8")),
        "F": Serialize(np.asfortranarray(np.arange(60_000, dtype="i4").reshape(300, 200))),
        "bcast": Serialize(np.broadcast_to(np.arange(4.0), (1000, 4))),
        "many": [Serialize(np.arange(3))] * 500,
        "empty": Serialize(b""),
    }


async def exchange_with_distributed() -> dict:
    """distributed's own TCP comm connects to a socket we serve with our protocol: it
    handshakes with us, writes some messages, reads our reply."""
    seen: dict = {}
    served = asyncio.get_running_loop().create_future()

    async def serve(reader, writer):
        end = OurEnd(reader, writer)
        try:
            seen["handshake"] = loads(await end.read_frames())
            await end.write(local_info())
            seen["messages"] = [loads(await end.read_frames()) for _ in messages_from_distributed()]
            await end.write(reply_from_us())
            assert await end.read_frames() is None  # the peer closes
            seen["raw"] = bytes(end.raw)
            served.set_result(None)
        except BaseException as e:
            served.set_exception(e)
            raise
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        comm = await distributed.comm.connect(f"tcp://127.0.0.1:{port}", timeout=10)
        try:
            for msg in messages_from_distributed():
                await comm.write(msg)
            seen["reply"] = await comm.read()
            seen["options"] = comm.handshake_options
        finally:
            await comm.close()
        await asyncio.wait_for(served, 10)
    finally:
        server.close()
        await server.wait_closed()
    return seen


@pytest.fixture(scope="module")
def exchange() -> dict:
    return asyncio.run(exchange_with_distributed())


def test_distributed_comm_reads_our_handshake_and_reply(exchange):
    assert exchange["options"] == {"pickle-protocol": 5, "compression": None}
    assert negotiate(local_info(), exchange["handshake"]) == exchange["options"]
    reply = exchange["reply"]
    expected = {k: v.data if isinstance(v, Serialize) else v for k, v in reply_from_us().items()}
    expected["many"] = tuple(np.arange(3) for _ in range(500))
    assert_same(reply, expected)


def test_we_read_distributed_comm_messages(exchange):
    ping, data, many, empty = exchange["messages"]
    assert ping == {"op": "ping", "x": (1, 2, ("x", 1)), ("k", 0): None}
    assert_same(data["a"], np.arange(100_000))
    assert_same(data["b"], np.ones((300, 300), order="F"))
    pd.testing.assert_frame_equal(data["c"], pd.DataFrame({"x": np.arange(50_000.0)}))
    assert_same(many["xs"], tuple(np.arange(i % 5) for i in range(2000)))
    assert empty["b"] == b""
    assert_same(empty["a"], np.empty(0))


@settings(max_examples=25, deadline=None)
@given(CHUNK_SIZES)
def test_distributed_comm_bytes_in_random_chunks(exchange, chunk_sizes):
    """The exact bytes distributed's comm wrote, re-read in reads of random sizes,
    give the same frames as the live read, and distributed's reader agrees."""
    raw = exchange["raw"]
    received = feed(FrameReceiver(), raw, chunk_sizes)
    assert len(received) == 1 + len(messages_from_distributed())
    rest = memoryview(raw)
    for frames in received:
        theirs, rest = distributed_read(rest)
        assert [bytes(f) for f in frames] == [bytes(f) for f in theirs]
    assert len(rest) == 0
    assert loads(received[0]) == exchange["handshake"]
