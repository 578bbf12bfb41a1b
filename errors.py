"""What the caller hears when a request fails: always JSON `{"detail"}`, never an internal's text."""

from __future__ import annotations

import logging
from contextlib import suppress

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage import StorageError

log = logging.getLogger("gen_service")


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def storage_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StorageError)
    return JSONResponse({"detail": exc.detail}, exc.status_code)


async def client_disconnected(request: Request, exc: Exception) -> None:
    # Nobody is left to answer, and an upload's store has already dropped what it had.
    log.info("client disconnected before sending the whole body of %s %s", request.method, request.url.path)


EXCEPTION_HANDLERS = {HTTPException: http_error, StorageError: storage_error, ClientDisconnect: client_disconnected}


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
