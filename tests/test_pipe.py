"""The pipe between the event loop and the thread that stores an upload."""

from __future__ import annotations

import asyncio
import os

import pytest
from anyio import to_thread

from pipe import Pipe, PipeBroken

pytestmark = pytest.mark.anyio


async def write_all(pipe: Pipe, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await pipe.write(chunk)
    pipe.close()


def read_in(pipe: Pipe, size: int) -> list[bytes]:
    reads = []
    while chunk := pipe.read(size):
        reads.append(chunk)
    return reads


DATA_BYTES = 3 * 1024 * 1024 + 7


@pytest.mark.parametrize("size", [1000, 64 * 1024, 5 * 1024 * 1024])
# Reads reserve their buffer up to what is said to be coming, if anything is; a Content-Length that
# undercounts (sent along with chunked encoding) must not cut the data short.
@pytest.mark.parametrize(
    "at_most", [None, DATA_BYTES, DATA_BYTES + 500, DATA_BYTES // 2], ids=["unknown", "exact", "more", "less"]
)
async def test_reads_are_whole_until_the_last(size: int, at_most: int | None) -> None:
    data = os.urandom(DATA_BYTES)
    chunks = [data[offset : offset + 65_000] for offset in range(0, len(data), 65_000)]
    pipe = Pipe(limit=256 * 1024, at_most=at_most)
    writing = asyncio.create_task(write_all(pipe, chunks))
    reads = await to_thread.run_sync(read_in, pipe, size)
    await writing
    assert b"".join(reads) == data
    assert all(len(read) == size for read in reads[:-1]) and 0 < len(reads[-1]) <= size


@pytest.mark.parametrize("at_most", [None, 1201])
async def test_read_of_everything_waits_for_the_close(at_most: int | None) -> None:
    pipe = Pipe(limit=1024, at_most=at_most)
    writing = asyncio.create_task(write_all(pipe, [b"a" * 600, b"b" * 600, b"c"]))
    assert await to_thread.run_sync(pipe.read) == b"a" * 600 + b"b" * 600 + b"c"
    await writing


async def test_writer_waits_while_the_pipe_is_full_and_the_loop_stays_free() -> None:
    pipe = Pipe(limit=1000)
    await pipe.write(b"x" * 1000)
    blocked = asyncio.create_task(pipe.write(b"y"))
    ticks = 0
    while ticks < 50:  # the loop goes on running other work meanwhile
        await asyncio.sleep(0.001)
        ticks += 1
    assert not blocked.done()
    assert await to_thread.run_sync(pipe.read, 10) == b"x" * 10
    await asyncio.wait_for(blocked, 5)
    pipe.close()
    assert await to_thread.run_sync(pipe.read) == b"x" * 990 + b"y"


async def test_abort_by_the_writer_fails_a_waiting_read() -> None:
    pipe = Pipe(limit=1000)
    await pipe.write(b"partial")
    reading = asyncio.create_task(to_thread.run_sync(pipe.read, 100))
    await asyncio.sleep(0.05)
    pipe.abort()
    with pytest.raises(PipeBroken):
        await asyncio.wait_for(reading, 5)


async def test_abort_by_the_reader_fails_a_waiting_write() -> None:
    pipe = Pipe(limit=10)
    await pipe.write(b"x" * 10)
    writing = asyncio.create_task(pipe.write(b"more"))
    await asyncio.sleep(0.05)
    await to_thread.run_sync(pipe.abort)
    with pytest.raises(PipeBroken):
        await asyncio.wait_for(writing, 5)
    with pytest.raises(PipeBroken):
        await pipe.write(b"after")


async def test_holds_at_most_one_write_beyond_the_limit() -> None:
    pipe = Pipe(limit=100_000)
    writing = asyncio.create_task(write_all(pipe, [b"z" * 30_000] * 10))
    await asyncio.sleep(0.05)
    assert (pipe.held, writing.done()) == (120_000, False)
    assert len(await to_thread.run_sync(pipe.read)) == 300_000
    await writing
