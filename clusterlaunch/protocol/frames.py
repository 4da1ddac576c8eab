"""Framing of messages on a byte stream, as dask's TCP comm writes and reads them.

On the wire one message is::

    u64 head_nbytes | u64 n_frames | u64 frame_nbytes * n_frames | frame bytes ...

all little-endian. ``head_nbytes`` counts the prelude (``n_frames`` and the lengths)
plus the leading frames that the sender suggests reading as one block; it must end on
a frame boundary because dask's reader slices that block into frames. dask's sender
puts the shards of its first large buffer in that block, so that the receiver finds
them end to end in one buffer and joins them without a copy; this reader reads the
block as one buffer for that reason.

``FrameReceiver`` is a sans-io reader: the transport asks it where to put the next
bytes (``get_buffer``), reports how many arrived (``buffer_updated``) and collects whole
messages (``pop_message``). Large frames, and a large head block, are read straight
into their own buffers, allocated once their length is known and checked against the
limits, so big payloads are never copied after the kernel hands them over.

The receive buffer for small frames is an anonymous mapping made when bytes are
expected and dropped by ``release`` between messages: only the pages that bytes
landed in count, and an idle connection holds none.
"""

from __future__ import annotations

import mmap
import struct
from collections import deque
from collections.abc import Callable, Sequence
from itertools import accumulate

from clusterlaunch.protocol.errors import ProtocolError

WORD = struct.Struct("<Q")

#: Frames up to this size are grouped into the head block by senders and copied out of
#: the receive buffer by readers; larger ones get a buffer of their own.
SMALL_FRAME_BYTES = 64 * 1024
#: From this size a frame's own buffer is an anonymous mapping: no zero-filling, and
#: the pages are returned to the system as soon as the frame is dropped.
MAPPED_FRAME_BYTES = 1024 * 1024

DEFAULT_MAX_FRAMES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 1 << 40


def frames_header(frame_nbytes: Sequence[int]) -> bytes:
    """The bytes that precede ``frames`` of the given lengths on the wire."""
    n = len(frame_nbytes)
    prelude = struct.pack(f"<Q{n}Q", n, *frame_nbytes)
    grouped = 0
    for nbytes in frame_nbytes:
        if grouped + nbytes > SMALL_FRAME_BYTES:
            break
        grouped += nbytes
    return WORD.pack(len(prelude) + grouped) + prelude


def allocate(nbytes: int) -> memoryview:
    """A writeable buffer of ``nbytes`` that need not be zeroed."""
    if nbytes >= MAPPED_FRAME_BYTES:
        # Private, not mmap's default shared mapping: shared anonymous memory is
        # tmpfs-backed and faults in far slower. Huge pages cut the faults 512-fold.
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE)
        return memoryview(mapping)
    return memoryview(bytearray(nbytes))


def _allocate_for_peer(nbytes: int) -> memoryview:
    """``allocate`` for a length the peer declared: a frame that fits the limits but
    not in memory ends the stream like any other unreadable input."""
    try:
        return allocate(nbytes)
    except (MemoryError, OSError, OverflowError) as e:
        raise ProtocolError(f"cannot allocate {nbytes} bytes for a frame: {e}") from e


class FrameReceiver:
    """Turns a byte stream into messages, each a list of writeable frames."""

    def __init__(
        self,
        *,
        max_frames: int = DEFAULT_MAX_FRAMES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        buffer_bytes: int = 4 * SMALL_FRAME_BYTES,
    ) -> None:
        self.max_frames = max_frames
        self.max_message_bytes = max_message_bytes
        self._buffer_bytes = buffer_bytes
        self._mapping: mmap.mmap | None = None
        self._buffer = memoryview(b"")
        self._start = 0  # unparsed bytes in _buffer are [_start, _end)
        self._end = 0
        self._target: memoryview | None = None  # a large read in progress
        self._target_filled = 0
        self._need = WORD.size
        self._on_read: Callable[[memoryview, bool], None] = self._on_head_nbytes
        self._messages: deque[list[memoryview]] = deque()
        self._head_nbytes = 0
        self._frame_count = 0
        self._lengths: tuple[int, ...] = ()
        self._frames: list[memoryview] = []

    @property
    def idle(self) -> bool:
        """True between messages: nothing of a next message has arrived yet."""
        # With a buffer smaller than SMALL_FRAME_BYTES even the head word is read
        # into a target of its own, set up before any of it arrives.
        return (
            self._on_read == self._on_head_nbytes
            and self._start == self._end
            and (self._target is None or self._target_filled == 0)
        )

    def release(self) -> None:
        """Give the receive buffer's memory back, if nothing unparsed is in it."""
        if self._mapping is None or self._start != self._end:
            return
        self._buffer.release()
        try:
            self._mapping.close()
        except BufferError:
            # A view the transport still holds: keep the mapping until the next time.
            self._buffer = memoryview(self._mapping)
            return
        self._mapping, self._buffer = None, memoryview(b"")
        self._start = self._end = 0

    def get_buffer(self) -> memoryview:
        """The writeable buffer into which the transport should read next."""
        if self._target is not None:
            return self._target[self._target_filled :]
        if self._mapping is None:
            self._mapping = mmap.mmap(
                -1, self._buffer_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            )
            self._buffer = memoryview(self._mapping)
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buffer) - self._end < SMALL_FRAME_BYTES:
            pending = self._end - self._start
            self._buffer[:pending] = self._buffer[self._start : self._end]
            self._start, self._end = 0, pending
        return self._buffer[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Record that ``nbytes`` were written at the start of the last buffer.

        Raises ``ProtocolError`` when the stream is not dask's framing or breaks a
        limit; the stream can't be resynchronised after that and must be closed.
        """
        if self._target is not None:
            self._target_filled += nbytes
            if self._target_filled == len(self._target):
                target, self._target = self._target, None
                self._on_read(target, True)
        else:
            self._end += nbytes
        self._parse()

    def pop_message(self) -> list[memoryview] | None:
        """The frames of the next whole message received, or None."""
        return self._messages.popleft() if self._messages else None

    def _parse(self) -> None:
        while self._target is None:
            available = self._end - self._start
            if self._need > self._buffer_bytes - SMALL_FRAME_BYTES:
                target = _allocate_for_peer(self._need)
                take = min(available, self._need)
                if take:
                    target[:take] = self._buffer[self._start : self._start + take]
                self._start += take
                if take == self._need:
                    self._on_read(target, True)
                    continue
                self._target, self._target_filled = target, take
                return
            if available < self._need:
                return
            chunk = self._buffer[self._start : self._start + self._need]
            self._start += self._need
            self._on_read(chunk, False)

    def _expect(self, nbytes: int, on_read: Callable[[memoryview, bool], None]) -> None:
        self._need = nbytes
        self._on_read = on_read

    def _on_head_nbytes(self, chunk: memoryview, owned: bool) -> None:
        (self._head_nbytes,) = WORD.unpack(chunk)
        self._expect(WORD.size, self._on_frame_count)

    def _on_frame_count(self, chunk: memoryview, owned: bool) -> None:
        (count,) = WORD.unpack(chunk)
        if count == 0:
            raise ProtocolError("message declares no frames")
        if count > self.max_frames:
            raise ProtocolError(f"message declares {count} frames, limit {self.max_frames}")
        prelude_nbytes = WORD.size * (1 + count)
        if self._head_nbytes < prelude_nbytes:
            raise ProtocolError(
                f"head block of {self._head_nbytes} bytes is shorter than its "
                f"{prelude_nbytes}-byte prelude"
            )
        self._frame_count = count
        self._expect(WORD.size * count, self._on_lengths)

    def _on_lengths(self, chunk: memoryview, owned: bool) -> None:
        lengths = struct.unpack(f"<{self._frame_count}Q", chunk)
        total = sum(lengths)
        if total > self.max_message_bytes:
            raise ProtocolError(
                f"message declares {total} bytes of frames, limit {self.max_message_bytes}"
            )
        grouped = self._head_nbytes - WORD.size * (1 + self._frame_count)
        if grouped != 0 and grouped not in set(accumulate(lengths)):
            raise ProtocolError(
                f"head block of {self._head_nbytes} bytes does not end on a frame boundary"
            )
        self._lengths = lengths
        self._frames = []
        if grouped:
            self._expect(grouped, self._on_head_block)
        else:
            self._next_frame()

    def _on_head_block(self, chunk: memoryview, owned: bool) -> None:
        offset = 0
        for nbytes in self._lengths:
            if offset == len(chunk):
                break
            frame = chunk[offset : offset + nbytes]
            self._frames.append(frame if owned else memoryview(bytearray(frame)))
            offset += nbytes
        self._next_frame()

    def _next_frame(self) -> None:
        while len(self._frames) < len(self._lengths):
            nbytes = self._lengths[len(self._frames)]
            if nbytes:
                self._expect(nbytes, self._on_frame)
                return
            self._frames.append(memoryview(bytearray()))
        self._messages.append(self._frames)
        self._frames = []
        self._expect(WORD.size, self._on_head_nbytes)

    def _on_frame(self, chunk: memoryview, owned: bool) -> None:
        self._frames.append(chunk if owned else memoryview(bytearray(chunk)))
        self._next_frame()
