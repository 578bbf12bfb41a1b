"""upload_stream.py in process, with a store that only counts: what uploads may hold, with or without a slot."""

from __future__ import annotations

import asyncio

import pytest

import upload_stream
from storage import Stored
from upload_stream import FREE_BYTES, UploadSlots, UploadStream

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
PART_BYTES = MiB


class CountingUpload:
    """A store's upload that keeps nothing: it counts the steps and what they were given."""

    def __init__(self) -> None:
        self.written = 0
        self.aborted = False

    def write(self, chunks: list[bytes]) -> None:
        self.written += sum(map(len, chunks))
        chunks.clear()

    def commit(self, chunks: list[bytes]) -> Stored:
        self.write(chunks)
        return Stored(self.written, "")

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture(autouse=True)
def quick_to_go_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upload_stream, "IDLE_SECONDS", 0.02)


async def send_then_stall(stream: UploadStream, size: int) -> None:
    """Adds `size` bytes in 64 KiB chunks, as a client sending that much and then nothing."""
    for start in range(0, size, 64 * 1024):
        await stream.add(b"x" * min(64 * 1024, size - start))


async def test_quiet_uploads_hold_no_more_than_the_slots_room() -> None:
    slots = UploadSlots(2, PART_BYTES)
    streams = [UploadStream(CountingUpload(), slots) for _ in range(6)]
    # Each stalls just under a part: what it has gathered stays in memory with or without its slot.
    senders = [asyncio.create_task(send_then_stall(stream, PART_BYTES - 1000)) for stream in streams]
    await asyncio.sleep(50 * upload_stream.IDLE_SECONDS)  # time for every quiet upload to give its slot back

    without_slot = sum(stream.gathered for stream in streams if not stream.holds_slot)
    with_slot = [stream for stream in streams if stream.holds_slot]
    assert without_slot <= slots.room_for_quiet + len(streams) * FREE_BYTES
    assert slots.held_by_quiet <= slots.room_for_quiet
    assert len(with_slot) <= 2
    for sender in senders:  # each request's task is the one that aborts it, once it has stopped adding
        sender.cancel()
    await asyncio.gather(*senders, return_exceptions=True)
    for stream in streams:
        await stream.abort()
    assert slots.held_by_quiet == 0 and slots.limiter.borrowed_tokens == 0


async def test_a_quiet_upload_that_fits_the_room_gives_its_slot_to_the_next() -> None:
    slots = UploadSlots(1, PART_BYTES)
    first, second = UploadStream(CountingUpload(), slots), UploadStream(CountingUpload(), slots)
    await send_then_stall(first, PART_BYTES // 2)  # holds the slot: more than FREE_BYTES, within the room

    await asyncio.wait_for(send_then_stall(second, PART_BYTES // 2), timeout=5)

    assert (first.holds_slot, second.holds_slot) == (False, True)
    assert slots.held_by_quiet == first.gathered
    await first.abort()
    await second.abort()
    assert slots.held_by_quiet == 0 and slots.limiter.borrowed_tokens == 0


async def test_a_client_that_sent_little_holds_no_slot() -> None:
    slots = UploadSlots(1, PART_BYTES)
    stream = UploadStream(CountingUpload(), slots)
    await send_then_stall(stream, FREE_BYTES)
    assert not stream.holds_slot and slots.limiter.borrowed_tokens == 0
    await stream.abort()


async def test_an_upload_committing_keeps_its_slot() -> None:
    slots = UploadSlots(1, PART_BYTES)
    upload = CountingUpload()
    stream = UploadStream(upload, slots)
    await send_then_stall(stream, 3 * PART_BYTES // 2)
    stored = await stream.commit()
    assert stored.size == 3 * PART_BYTES // 2 == upload.written
    assert slots.limiter.borrowed_tokens == 0 and slots.held_by_quiet == 0


async def test_an_abort_runs_to_its_end_even_when_its_request_is_cancelled() -> None:
    slots = UploadSlots(1, PART_BYTES)
    upload = CountingUpload()
    stream = UploadStream(upload, slots)
    await send_then_stall(stream, 3 * PART_BYTES // 2)  # a part has gone to the store: there is something to abort
    aborting = asyncio.create_task(stream.abort())
    await asyncio.sleep(0)
    aborting.cancel()
    await asyncio.gather(aborting, return_exceptions=True)
    assert stream.aborting is not None
    await stream.aborting
    assert upload.aborted
    assert slots.limiter.borrowed_tokens == 0
