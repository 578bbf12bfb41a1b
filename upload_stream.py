"""How an upload reaches the store while it arrives, holding a storing thread only while it has bytes
to store and an upload slot only while it holds more than a little memory.

Chunks gather on the event loop until they make a part (the store's `part_bytes`); the part then goes
to the store in a worker thread while the next one gathers, one step in flight at a time. A client
that sends slowly, or stops, holds no thread: only what it has sent of the part being gathered.

Upload slots bound the memory that uploads hold: an upload takes one before it gathers more than
FREE_BYTES, and gives it back at its end, or when its client has sent nothing for IDLE_SECONDS while
nothing of it is being stored. An upload that waits for a slot reads nothing meanwhile, so its client
is held back by TCP; a client that stalls keeps only the bytes it has sent, until the request's body
timeout ends it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from anyio import CapacityLimiter, to_thread

from storage import Stored, Upload

# So little that hundreds of stalled clients holding this much cost less than one active upload.
FREE_BYTES = 256 * 1024
IDLE_SECONDS = 1.0

Result = TypeVar("Result")


class UploadStream:
    """The event loop's side of one upload: `add` each chunk as it arrives, then `commit` or `abort`."""

    def __init__(self, upload: Upload, part_bytes: int, slots: CapacityLimiter, threads: CapacityLimiter) -> None:
        self.upload = upload
        self.part_bytes = part_bytes
        self.slots = slots
        self.threads = threads
        self.chunks: list[bytes] = []
        self.gathered = 0
        self.step: asyncio.Task[None] | None = None
        self.started = False  # a step has run: the store may hold something to abort
        self.holds_slot = False
        self.adding = False  # in `add`: waiting, if at all, on the store or a slot, not on the client
        self.loop = asyncio.get_running_loop()
        self.last_chunk_at = self.loop.time()
        self.idle_check: asyncio.TimerHandle | None = None

    async def add(self, data: bytes) -> None:
        self.adding = True
        try:
            if self.step is not None and self.step.done():
                await self.end_step()  # a store that has failed stops the upload now, not a part later
            if not self.holds_slot and self.gathered + len(data) > FREE_BYTES:
                await self.take_slot()
            self.chunks.append(data)
            self.gathered += len(data)
            if self.gathered >= self.part_bytes:
                await self.end_step()
                part, self.chunks, self.gathered = self.chunks, [], 0
                self.step = self.loop.create_task(self.in_thread(self.upload.write, part))
        finally:
            self.adding = False
            self.last_chunk_at = self.loop.time()

    async def commit(self) -> Stored:
        """Stores what is left and ends the file. On failure, the caller aborts."""
        await self.end_step()
        stored = await self.in_thread(self.upload.commit, self.chunks)
        self.give_slot_back()
        return stored

    async def abort(self) -> None:
        """Leaves nothing in the store. Waits for a step in flight rather than cancel it: its thread
        would go on unwatched, and could still commit the file."""
        try:
            if self.step is not None:
                await asyncio.wait([self.step])
                # Taken even when unused, or asyncio would log it as an exception nobody retrieved.
                _ = self.step.cancelled() or self.step.exception()
            if self.started:
                await to_thread.run_sync(self.upload.abort)
        finally:
            self.chunks.clear()
            self.give_slot_back()

    async def end_step(self) -> None:
        """Waits for the step in flight, raising its failure."""
        if self.step is not None:
            # Waited for, not awaited: cancelling the request must not cancel the step (see abort).
            await asyncio.wait([self.step])
            step, self.step = self.step, None
            step.result()

    async def in_thread(self, store: Callable[[list[bytes]], Result], chunks: list[bytes]) -> Result:
        self.started = True
        return await to_thread.run_sync(store, chunks, limiter=self.threads)

    async def take_slot(self) -> None:
        await self.slots.acquire_on_behalf_of(self)
        self.holds_slot = True
        self.idle_check = self.loop.call_later(IDLE_SECONDS, self.check_idle)

    def give_slot_back(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.slots.release_on_behalf_of(self)
        if self.idle_check is not None:
            self.idle_check.cancel()
            self.idle_check = None

    def check_idle(self) -> None:
        """Runs while a slot is held, about once a second: one timer per upload, not one per chunk."""
        quiet_long_enough_at = self.last_chunk_at + IDLE_SECONDS
        storing = self.step is not None and not self.step.done()
        if self.adding or storing or quiet_long_enough_at > self.loop.time():
            next_check = max(quiet_long_enough_at, self.loop.time() + IDLE_SECONDS / 4)
            self.idle_check = self.loop.call_at(next_check, self.check_idle)
        else:
            self.idle_check = None
            self.give_slot_back()
