"""Image generators behind one small interface, and how the service runs them.

A generator turns a prompt and an optional size into image bytes and their media type. The built-in
`Placeholder` draws the prompt (render.py); the providers package holds the remote ones (image APIs, model
containers). `Generations` runs whichever is configured: at most `concurrency` at once and `queue`
more waiting, each within one deadline, with one log line per generation.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import anyio
from anyio import to_thread

from render import render_png

log = logging.getLogger("gen_service.generate")

# Remote generators mostly wait on the network; the placeholder works the CPU, one render per core.
REMOTE_CONCURRENCY = 8
WAITING_PER_SLOT = 4


class Size(NamedTuple):
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


class GeneratedImage(NamedTuple):
    data: bytes | bytearray
    media_type: str


class GenerationError(Exception):
    """A generation that failed: the status, short detail and Retry-After (seconds) the caller gets, and
    the outcome the log line names."""

    def __init__(self, status_code: int, detail: str, outcome: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.outcome = outcome
        self.retry_after = retry_after


@dataclass
class Generation:
    """What one generation's log line tells beyond its outcome; the generator fills it in as it goes."""

    attempts: int = 0
    provider_id: str | None = None


class Generator(Protocol):
    backend: str
    model: str | None

    async def generate(self, prompt: str, size: Size | None, generation: Generation) -> GeneratedImage:
        """The image for `prompt` (at `size`, else the generator's own default), or GenerationError."""

    async def check(self) -> None:
        """Raises GenerationError unless the generator can take work now. Never a paid call."""

    def describe(self) -> str: ...


class Placeholder:
    """The built-in generator: the prompt drawn over a gradient, in a worker thread. Needs nothing."""

    backend = "placeholder"
    model = None

    async def generate(self, prompt: str, size: Size | None, generation: Generation) -> GeneratedImage:
        generation.attempts = 1
        png = await to_thread.run_sync(render_png, prompt, *(size or ()))
        return GeneratedImage(png, "image/png")

    async def check(self) -> None:
        return None

    def describe(self) -> str:
        return "the built-in placeholder"


def default_concurrency(backend: str) -> int:
    # Rendering holds the GIL: more renders at once than cores only adds switching, not throughput.
    return (os.cpu_count() or 1) if backend == "placeholder" else REMOTE_CONCURRENCY


class Generations:
    """Runs the generator: `concurrency` generations at once, `queue` more waiting for a slot, and beyond
    that an immediate 503. Each ends within `timeout_seconds` of its arrival, waiting included (504)."""

    def __init__(self, generator: Generator, *, concurrency: int, queue: int, timeout_seconds: float) -> None:
        self.generator = generator
        self.slots = anyio.Semaphore(concurrency)
        self.most_admitted = concurrency + queue
        self.admitted = 0  # generating, or waiting for a slot
        self.timeout_seconds = timeout_seconds
        # What the busy answer's Retry-After says: about how long a generation has been taking lately.
        self.typical_seconds = 1.0

    async def run(self, prompt: str, size: Size | None) -> GeneratedImage:
        generation = Generation()
        started = time.perf_counter()
        outcome = "cancelled"  # unless it ends otherwise: the caller left
        try:
            image = await self.admitted_within_deadline(prompt, size, generation)
            outcome = "ok"
            self.typical_seconds += (time.perf_counter() - started - self.typical_seconds) / 4
            return image
        except GenerationError as error:
            outcome = error.outcome
            raise
        finally:
            self.log(generation, outcome, time.perf_counter() - started)

    async def admitted_within_deadline(self, prompt: str, size: Size | None, generation: Generation) -> GeneratedImage:
        if self.admitted >= self.most_admitted:
            raise GenerationError(503, "image generator is busy", "busy", retry_after=math.ceil(self.typical_seconds))
        self.admitted += 1
        try:
            with anyio.fail_after(self.timeout_seconds):
                async with self.slots:
                    return await self.generator.generate(prompt, size, generation)
        except TimeoutError:
            raise GenerationError(504, "image generator did not answer in time", "timeout") from None
        finally:
            self.admitted -= 1

    def log(self, generation: Generation, outcome: str, seconds: float) -> None:
        fields = {
            "backend": self.generator.backend,
            "model": self.generator.model or "-",
            "outcome": outcome,
            "duration_ms": round(seconds * 1000, 1),
            "attempts": generation.attempts,
            "provider_id": generation.provider_id or "-",
        }
        log.info(" ".join(f"{name}={value}" for name, value in fields.items()), extra={"fields": fields})
