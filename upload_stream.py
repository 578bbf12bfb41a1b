"""How an upload reaches the store while it arrives, holding a storing thread only while it has bytes
to store and an upload slot only while it holds more than a little memory.

Chunks gather on the event loop until they make a part (the store's `part_bytes`); the part then goes
to the store in a worker thread while the next one gathers, one step in flight at a time. A client
that sends slowly, or stops, holds no thread: only what it has sent of the part being gathered.

Upload slots bound the memory that uploads hold: an upload takes one before it gathers more than
FREE_BYTES, and gives it back at its end, or when its client has sent nothing for IDLE_SECONDS while
nothing of it is being stored, if what it has gathered fits the room the slots keep for quiet
uploads (else it keeps its slot until its client sends again or the body timeout ends it). An upload
that waits for a slot reads nothing meanwhile, so its client is held back by TCP. So uploads hold at
most: two parts a slot, the room for quiet ones, and FREE_BYTES for every other connection.
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


class UploadSlots:
    """`count` slots, each the memory of an active upload and a storing thread; and room for what the
    quiet uploads that gave theirs back have gathered: half a part a slot."""

    def __init__(self, count: int, part_bytes: int) -> None:
        self.limiter = CapacityLimiter(count)
        self.threads = CapacityLimiter(count)
        self.part_bytes = part_bytes
        self.room_for_quiet = count * part_bytes // 2
        self.held_by_quiet = 0


class UploadStream:
    """The event loop's side of one upload: `add` each chunk as it arrives, then `commit` or `abort`."""

    def __init__(self, upload: Upload, slots: UploadSlots) -> None:
        self.upload = upload
        self.slots = slots
        self.chunks: list[bytes] = []
        self.gathered = 0
        self.step: asyncio.Task[None] | None = None
        self.started = False  # a step has run: the store may hold something to abort
        self.holds_slot = False
        self.quiet_bytes = 0  # gathered while quiet without a slot, counted in the slots' room for them
        self.busy = False  # in `add` or `commit`: waiting, if at all, on the store or a slot, not on the client
        self.loop = asyncio.get_running_loop()
        self.last_chunk_at = self.loop.time()
        self.idle_check: asyncio.TimerHandle | None = None
        self.aborting: asyncio.Task[None] | None = None

    async def add(self, data: bytes) -> None:
        self.busy = True
        try:
            if self.step is not None and self.step.done():
                await self.end_step()  # a store that has failed stops the upload now, not a part later
            if not self.holds_slot and self.gathered + len(data) > FREE_BYTES:
                await self.take_slot()
            self.chunks.append(data)
            self.gathered += len(data)
            if self.gathered >= self.slots.part_bytes:
                await self.end_step()
                part, self.chunks, self.gathered = self.chunks, [], 0
                self.step = self.loop.create_task(self.in_thread(self.upload.write, part))
        finally:
            self.busy = False
            self.last_chunk_at = self.loop.time()

    async def commit(self) -> Stored:
        """Stores what is left and ends the file. On failure, the caller aborts."""
        self.busy = True
        await self.end_step()
        stored = await self.in_thread(self.upload.commit, self.chunks)
        self.give_slot_back()
        self.forget_quiet_bytes()
        return stored

    async def abort(self) -> None:
        """Leaves nothing in the store. Waits for a step in flight rather than cancel it: its thread
        would go on unwatched, and could still commit the file. Shielded: a request cancelled while it
        aborts (a server shutting down) would otherwise leave parts or a partial file behind."""
        self.aborting = self.loop.create_task(self.abort_now())  # kept: the loop holds tasks only weakly
        await asyncio.shield(self.aborting)

    async def abort_now(self) -> None:
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
            self.forget_quiet_bytes()

    async def end_step(self) -> None:
        """Waits for the step in flight, raising its failure."""
        if self.step is not None:
            # Waited for, not awaited: cancelling the request must not cancel the step (see abort).
            await asyncio.wait([self.step])
            step, self.step = self.step, None
            step.result()

    async def in_thread(self, store: Callable[[list[bytes]], Result], chunks: list[bytes]) -> Result:
        self.started = True
        return await to_thread.run_sync(store, chunks, limiter=self.slots.threads)

    async def take_slot(self) -> None:
        await self.slots.limiter.acquire_on_behalf_of(self)
        self.holds_slot = True
        self.forget_quiet_bytes()
        self.idle_check = self.loop.call_later(IDLE_SECONDS, self.check_idle)

    def give_slot_back(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.slots.limiter.release_on_behalf_of(self)
        if self.idle_check is not None:
            self.idle_check.cancel()
            self.idle_check = None

    def check_idle(self) -> None:
        """Runs while a slot is held, about once a second: one timer per upload, not one per chunk."""
        quiet_long_enough_at = self.last_chunk_at + IDLE_SECONDS
        storing = self.step is not None and not self.step.done()
        if self.busy or storing or quiet_long_enough_at > self.loop.time() or not self.room_for_what_it_holds():
            next_check = max(quiet_long_enough_at, self.loop.time() + IDLE_SECONDS / 4)
            self.idle_check = self.loop.call_at(next_check, self.check_idle)
        else:
            self.idle_check = None
            if self.gathered > FREE_BYTES:
                self.quiet_bytes = self.gathered
                self.slots.held_by_quiet += self.quiet_bytes
            self.give_slot_back()

    def room_for_what_it_holds(self) -> bool:
        return self.gathered <= FREE_BYTES or self.slots.held_by_quiet + self.gathered <= self.slots.room_for_quiet

    def forget_quiet_bytes(self) -> None:
        self.slots.held_by_quiet -= self.quiet_bytes
        self.quiet_bytes = 0
