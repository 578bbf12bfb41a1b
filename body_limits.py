"""Bounds on what a request body may cost us: its size, checked before and while it is read, and the time
it may keep us waiting for its next byte, or at the least rate."""

from __future__ import annotations

import asyncio
from collections import deque

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

RATE_GRACE_SECONDS = 5.0
RATE_WINDOW_SECONDS = 10.0
RATE_CHECK_SECONDS = 1.0


def declared_length(headers: Headers) -> int | None:
    """The body's Content-Length, or None when it has none (chunked)."""
    length = headers.get("content-length", "")
    return int(length) if length.isascii() and length.isdigit() else None


def file_too_large(max_bytes: int) -> str:
    return f"file is larger than {max_bytes} bytes"


class BodyLimit:
    """Refuses a body over `limit` bytes with JSON 413 `detail`: on Content-Length before reading, else
    while streaming. (Starlette's own `max_body_size` answers the Content-Length case in plain text.)"""

    def __init__(self, app: ASGIApp, limit: int, detail: str) -> None:
        self.app = app
        self.limit = limit
        self.detail = detail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = declared_length(Headers(scope=scope))
        if length is not None and length > self.limit:
            # Refused before reading, so a client that sent `Expect: 100-continue` sends nothing.
            raise self.too_large()
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise self.too_large()
            return message

        await self.app(scope, counted_receive, send)

    def too_large(self) -> HTTPException:
        return HTTPException(413, self.detail)


class BodyTimeout:
    """Ends a request whose body stops arriving, or trickles: when no byte of it comes for `seconds`, or it
    arrives slower than `min_rate` bytes a second, the caller gets 408 (if it still reads) and the
    connection is closed. uvicorn has no such bound: a body that stops arriving would hold its request
    forever, and one that sends a byte now and then would hold an upload slot as long as it likes.

    Only the time spent waiting for the client counts, not time the app spends elsewhere between reads
    (storing a part, waiting for an upload slot). The rate is measured over the last RATE_WINDOW_SECONDS
    of that time, after RATE_GRACE_SECONDS (as Kestrel's MinRequestBodyDataRate, whose average over the
    whole body would let a fast start buy an hour of trickling); `min_rate` 0 turns it off."""

    def __init__(self, app: ASGIApp, seconds: float, min_rate: int = 0) -> None:
        self.app = app
        self.seconds = seconds
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_complete = False
        pace = BodyPace(self.min_rate)
        loop = asyncio.get_running_loop()

        async def receive_in_time() -> Message:
            nonlocal body_complete
            if body_complete:  # from here on, a receive waits for a disconnect, which may take any time
                return await receive()
            idle = 0.0
            while True:
                started = loop.time()
                try:
                    # A wait is cut into checks of the rate; a receive that times out has taken nothing.
                    async with asyncio.timeout(min(self.seconds - idle, RATE_CHECK_SECONDS)):
                        message = await receive()
                    break
                except TimeoutError:
                    pass
                finally:
                    waited = loop.time() - started
                    idle += waited
                    pace.waited += waited
                if idle >= self.seconds:
                    raise timed_out("request body timed out")
                if pace.too_slow():
                    raise timed_out(f"request body arrived slower than {self.min_rate} bytes per second")
            pace.arrived(len(message.get("body", b"")))
            if pace.too_slow():
                raise timed_out(f"request body arrived slower than {self.min_rate} bytes per second")
            body_complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_in_time, send)


def timed_out(detail: str) -> HTTPException:
    return HTTPException(408, detail, headers={"Connection": "close"})


class BodyPace:
    """How fast a body arrives, over the time spent waiting for it: bytes counted by whole second waited,
    for the last RATE_WINDOW_SECONDS."""

    def __init__(self, min_rate: int) -> None:
        self.min_rate = min_rate
        self.waited = 0.0
        self.seconds: deque[list[int]] = deque()  # [second waited, bytes that arrived in it]
        self.in_window = 0

    def arrived(self, size: int) -> None:
        second = int(self.waited)
        if self.seconds and self.seconds[-1][0] == second:
            self.seconds[-1][1] += size
        else:
            self.seconds.append([second, size])
        self.in_window += size

    def too_slow(self) -> bool:
        if not self.min_rate or self.waited <= RATE_GRACE_SECONDS:
            return False
        window_start = max(0.0, self.waited - RATE_WINDOW_SECONDS)
        while self.seconds and self.seconds[0][0] + 1 <= window_start:
            self.in_window -= self.seconds.popleft()[1]
        return self.in_window < self.min_rate * (self.waited - window_start)
