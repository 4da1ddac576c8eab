"""Bytes on the wire for the protocol tests: our framing, distributed's framing, and
readers that take a byte stream apart the way each side does."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from distributed.comm.tcp import _add_frames_header
from distributed.protocol.utils import unpack_frames

from clusterlaunch.protocol import FrameReceiver, frames_header


def nbytes(frame: object) -> int:
    return memoryview(frame).nbytes  # type: ignore[arg-type]


def our_wire(frames: Sequence) -> bytes:
    """What our transport writes for ``frames``: ``frames_header`` then the frames."""
    return frames_header([nbytes(f) for f in frames]) + b"".join(map(bytes, frames))


def distributed_wire(frames: Sequence) -> bytes:
    """What distributed's TCP comm writes for ``frames`` (its own header code)."""
    out, _, _ = _add_frames_header(list(frames))
    return b"".join(map(bytes, out))


def distributed_read(data: bytes | memoryview) -> tuple[list[memoryview], memoryview]:
    """One message read from ``data`` as distributed's ``TCP.read`` does: the head
    block into one writeable buffer sliced by ``unpack_frames(partial=True)``, each
    remaining frame into a buffer of its own. Returns the frames and what follows."""
    data = memoryview(data)
    (head_nbytes,) = struct.unpack_from("Q", data)
    pos = 8 + head_nbytes
    head = bytearray(data[8:pos])
    assert len(head) == head_nbytes, "stream ends inside the head block"
    frames, missing = unpack_frames(head, partial=True)
    for n in missing:
        frames.append(memoryview(bytearray(data[pos : pos + n])))
        pos += n
    assert pos <= len(data), "stream ends inside a frame"
    return frames, data[pos:]


def feed(
    receiver: FrameReceiver, data: bytes | memoryview, chunk_sizes: Iterable[int] = ()
) -> list[list[memoryview]]:
    """Feed ``data`` to ``receiver`` the way a transport would, in reads of the given
    sizes (cycled; each capped by the buffer offered), and collect whole messages."""
    data = memoryview(data)
    sizes = list(chunk_sizes) or [1 << 30]
    messages = []
    pos = 0
    i = 0
    while pos < len(data):
        buffer = receiver.get_buffer()
        assert len(buffer) > 0, "receiver offered an empty buffer"
        assert not buffer.readonly
        n = min(len(buffer), sizes[i % len(sizes)], len(data) - pos)
        i += 1
        buffer[:n] = data[pos : pos + n]
        receiver.buffer_updated(n)
        pos += n
        while (message := receiver.pop_message()) is not None:
            messages.append(message)
    return messages
