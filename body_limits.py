"""Bounds on what a request body may cost us: its size, checked before and while it is read."""

from __future__ import annotations

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
