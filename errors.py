"""What the caller hears when a request fails: always JSON `{"detail"}`, never an internal's text."""

from __future__ import annotations

import logging
from contextlib import suppress

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from generators import GenerationError
from storage import StorageError

log = logging.getLogger("gen_service")


async def http_error_answer(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def storage_error_answer(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StorageError)
    return JSONResponse({"detail": exc.detail}, exc.status_code)


async def generation_error_answer(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GenerationError)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)


async def client_disconnected(request: Request, exc: Exception) -> None:
    # Nobody is left to answer, and an upload's store has already dropped what it had.
    log.info("client disconnected before sending the whole body of %s %s", request.method, request.url.path)


EXCEPTION_HANDLERS = {
    HTTPException: http_error_answer,
    StorageError: storage_error_answer,
    GenerationError: generation_error_answer,
    ClientDisconnect: client_disconnected,
}

# What FileResponse answers, in plain text, to a Range it cannot serve.
RANGE_ERRORS = {400: "Range header is malformed", 416: "requested range is not satisfiable"}


class FileWithJSONErrors(FileResponse):
    """Starlette's FileResponse, which decides when a Range is served (with an If-Range that no longer
    matches the file, RFC 9110 has the Range ignored and the whole file sent), with its answers to a Range
    it cannot serve in JSON like every other error. A 416 keeps its Content-Range (`bytes */<size>`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        replaced = False
        # RFC 9110: a Range in a unit the server does not know (`items=0-1`) is ignored, and the whole file sent.
        range_unit = Headers(scope=scope).get("range", "bytes=").partition("=")[0].strip().lower()
        if range_unit != "bytes":
            scope = {**scope, "headers": [(name, value) for name, value in scope["headers"] if name != b"range"]}

        async def send_in_json(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] in RANGE_ERRORS:
                replaced = True
                status, content_range = message["status"], Headers(raw=message["headers"]).get("content-range")
                kept = {"Content-Range": content_range} if content_range else None
                await JSONResponse({"detail": RANGE_ERRORS[status]}, status, headers=kept)(scope, receive, send)
            elif not replaced:  # the plain-text body of a replaced answer is dropped
                await send(message)

        await super().__call__(scope, receive, send_in_json)


class InternalErrors:
    """An unexpected exception is answered with a bare JSON 500 (if nothing was sent yet), then re-raised
    so that uvicorn logs its traceback, once. Starlette's own answer would be plain text."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            await send(message)
            # Only once sent: a start the server refused (a header it will not write) can still be a 500.
            started = started or message["type"] == "http.response.start"

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception:
            if not started:
                # A server that refused a start may take no other (uvicorn does not): then nothing can be
                # answered, and its refusal of this one would only bury the error that matters.
                with suppress(RuntimeError):
                    await JSONResponse({"detail": "internal server error"}, 500)(scope, receive, send)
            raise
