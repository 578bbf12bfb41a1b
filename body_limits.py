"""Bounds on what a request body may cost us: its size, checked before and while it is read, and the time
it may keep us waiting for its next byte."""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
    """Ends a request whose body stops arriving: when no byte of it comes for `seconds`, the caller gets
    408 (if it still reads) and the connection is closed. Only the wait for the client counts, not time
    the app spends elsewhere between reads (storing a part, waiting for an upload slot). uvicorn has no
    such timeout: a body that stops arriving would otherwise hold its request forever."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_complete = False

        async def receive_in_time() -> Message:
            nonlocal body_complete
            if body_complete:  # from here on, a receive waits for a disconnect, which may take any time
                return await receive()
            try:
                async with asyncio.timeout(self.seconds):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, "request body timed out", headers={"Connection": "close"}) from None
            body_complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_in_time, send)
