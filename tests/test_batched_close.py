"""``BatchedSend.close`` ends its writer task within its timeout, even when the peer
has stopped reading, and leaves no task of its own behind."""

from __future__ import annotations

import asyncio

import pytest

from clusterlaunch.comm.batched import BatchedSend
from clusterlaunch.comm.tcp import Comm, connect, listen

pytestmark = pytest.mark.timeout(30)


def test_close_of_a_stream_whose_peer_stopped_reading() -> None:
    async def main() -> None:
        peer_comms: list[Comm] = []
        release = asyncio.Event()

        async def never_read(comm: Comm) -> None:
            peer_comms.append(comm)
            await release.wait()

        listener = await listen("tcp://127.0.0.1:0", never_read)
        comm = await connect(listener.address)
        before = asyncio.all_tasks()
        stream = BatchedSend(interval=0.001)
        stream.start(comm)
        # Far more than the socket buffers hold: the writer waits on the peer.
        stream.send(b"x" * (64 * 2**20))
        for _ in range(100):
            if stream.buffer == []:
                break
            await asyncio.sleep(0.01)
        assert stream.buffer == [], "the writer never took the batch"

        await asyncio.wait_for(stream.close(timeout=0.2), 10)
        assert stream.closed()
        assert asyncio.all_tasks() - before == set()
        release.set()
        await listener.stop()

    asyncio.run(main())
