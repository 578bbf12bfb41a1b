"""Generative asset service: renders prompts to images and stores uploads, answering with links.

Reads top to bottom: settings, request checks, handlers, the app, the entry point.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from uuid import uuid4

import uvicorn
from anyio import CapacityLimiter, to_thread
from dotenv import load_dotenv
from environs import Env, EnvError
from marshmallow.validate import URL, Length, OneOf, Range
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, MalformedRangeHeader, RangeNotSatisfiable, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from logs import RequestContext, logging_config
from pipe import Pipe, PipeBroken
from render import render_png
from storage import (
    MAX_OBJECT_BYTES,
    LocalStorage,
    S3Storage,
    Storage,
    StorageError,
    Stored,
    clean_filename,
    content_disposition,
    make_s3_client,
)

log = logging.getLogger("gen_service")

MiB = 1024 * 1024
GENERATE_BODY_LIMIT = 64 * 1024
# Room for the multipart boundaries and part headers around a file of MAX_UPLOAD_BYTES.
MULTIPART_OVERHEAD = 64 * 1024
READY_CACHE_SECONDS = 5
PIPE_BYTES = 1024 * 1024  # how far receiving may run ahead of storing
# Each streams with 11 to 16 MiB in memory; beyond these, an upload waits for a slot, its client held back by TCP.
MAX_CONCURRENT_UPLOADS = 32
HEALTHY = JSONResponse({"status": "ok"})  # built once: probes come every few seconds from every ALB node
OPENAPI_DOCUMENT = (Path(__file__).parent / "openapi.json").read_bytes()
CONTENT_TYPE = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+(\s*;[ -~]*)?", re.ASCII)


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    s3_bucket: str | None = None
    s3_region: str = "us-east-1"
    s3_endpoint_url: str | None = None
    s3_connect_timeout_seconds: float = 2.0
    s3_read_timeout_seconds: float = 5.0
    presign_ttl_seconds: int = 3600
    local_storage_dir: Path = Path("data")
    public_base_url: str | None = None
    max_upload_bytes: int = 100 * MiB
    max_prompt_chars: int = 2000
    api_token: str | None = None
    s3_checksums: str = "when_supported"
    log_format: str = "text"
    log_level: str = "INFO"
    shutdown_grace_seconds: float = 25.0
    workers: int = 1


def read_settings() -> Settings:
    """Settings from the environment; a .env file in the working directory fills in what is unset.

    Raises EnvError naming every invalid variable.
    """
    # Exported, not only parsed, so that boto3's credential chain sees AWS_* values from .env too.
    load_dotenv(Path.cwd() / ".env")
    env = Env(eager=False)
    not_empty = Length(min=1, error="must not be empty")
    settings = Settings(
        host=env.str("HOST", Settings.host, validate=not_empty),
        port=env.int("PORT", Settings.port, validate=Range(1, 65535)),
        s3_bucket=env.str(either("S3_BUCKET", "s3_bucket"), None, validate=not_empty),
        s3_region=env.str(either("S3_REGION", "s3_region"), Settings.s3_region, validate=not_empty),
        s3_endpoint_url=env.str("S3_ENDPOINT_URL", None, validate=URL(require_tld=False)),
        s3_connect_timeout_seconds=env.float(
            "S3_CONNECT_TIMEOUT_SECONDS", Settings.s3_connect_timeout_seconds, validate=Range(0.1, 60)
        ),
        s3_read_timeout_seconds=env.float(
            "S3_READ_TIMEOUT_SECONDS", Settings.s3_read_timeout_seconds, validate=Range(0.1, 300)
        ),
        # SigV4 links cannot live longer than 7 days; S3 would only say so when the link is used.
        presign_ttl_seconds=env.int(
            either("S3_PRESIGN_TTL_SECONDS", "s3_presign_ttl_seconds"),
            Settings.presign_ttl_seconds,
            validate=Range(1, 604800),
        ),
        local_storage_dir=env.path("LOCAL_STORAGE_DIR", Settings.local_storage_dir),
        public_base_url=env.str("PUBLIC_BASE_URL", None, validate=URL(require_tld=False)),
        max_upload_bytes=env.int("MAX_UPLOAD_BYTES", Settings.max_upload_bytes, validate=Range(1, MAX_OBJECT_BYTES)),
        max_prompt_chars=env.int("MAX_PROMPT_CHARS", Settings.max_prompt_chars, validate=Range(1, None)),
        api_token=env.str("API_TOKEN", None, validate=not_empty),
        s3_checksums=env.str(
            "S3_CHECKSUMS", Settings.s3_checksums, validate=OneOf(["when_supported", "when_required"])
        ),
        log_format=env.str("LOG_FORMAT", Settings.log_format, validate=OneOf(["text", "json"])),
        log_level=env.str("LOG_LEVEL", Settings.log_level, validate=OneOf(["DEBUG", "INFO", "WARNING", "ERROR"])),
        # Under ECS's default 30 s stop timeout, after which the task is killed.
        shutdown_grace_seconds=env.float(
            "SHUTDOWN_GRACE_SECONDS", Settings.shutdown_grace_seconds, validate=Range(0, 3600)
        ),
        workers=env.int("WORKERS", Settings.workers, validate=Range(1, 64)),
    )
    env.seal()
    return settings


def either(name: str, old_name: str) -> str:
    """The variable to read: the new name, or the old service's lower-case one if only that is set."""
    return old_name if old_name in os.environ and name not in os.environ else name


def make_storage(settings: Settings) -> Storage:
    if settings.s3_bucket is None:
        base_url = settings.public_base_url or f"http://{settings.host}:{settings.port}"
        if settings.public_base_url is None and settings.host in ("0.0.0.0", "::"):
            log.warning("links will point at %s, which clients cannot open: set PUBLIC_BASE_URL", base_url)
        return LocalStorage(settings.local_storage_dir, base_url, settings.presign_ttl_seconds)
    client = make_s3_client(
        region=settings.s3_region,
        endpoint_url=settings.s3_endpoint_url,
        connect_timeout=settings.s3_connect_timeout_seconds,
        read_timeout=settings.s3_read_timeout_seconds,
        checksums=settings.s3_checksums,
    )
    return S3Storage(client, settings.s3_bucket, settings.presign_ttl_seconds)


# ---------------------------------------------------------------- request checks


def declared_length(headers: Headers) -> int | None:
    """The body's Content-Length, or None when it has none (chunked)."""
    length = headers.get("content-length", "")
    return int(length) if length.isascii() and length.isdigit() else None


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


def file_too_large(max_bytes: int) -> str:
    return f"file is larger than {max_bytes} bytes"


def require_token(request: Request) -> None:
    token = request.app.state.settings.api_token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def read_prompt(request: Request) -> str:
    # A missing Content-Type is read as JSON, as the service we replace did.
    given = media_type(request)
    if given not in ("", "application/json") and not given.endswith("+json"):
        raise HTTPException(415, "expected Content-Type: application/json")
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # RecursionError: nested thousands of levels deep
        raise HTTPException(422, "body must be valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(422, "body must be a JSON object")
    if "prompt" not in body:
        raise HTTPException(422, "prompt is required")
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise HTTPException(422, "prompt must be a string")
    if not prompt.strip():
        raise HTTPException(422, "prompt must not be empty")
    max_chars = request.app.state.settings.max_prompt_chars
    if len(prompt) > max_chars:
        raise HTTPException(422, f"prompt must be at most {max_chars} characters")
    try:
        prompt.encode()
    except UnicodeEncodeError:  # JSON can carry lone surrogates ("\\ud800"), which are not text
        raise HTTPException(422, "prompt must be valid Unicode text") from None
    return prompt


class PipedFile(UploadFile):
    """The upload's file part as Starlette's parser sees it: its bytes go into a Pipe, not a spool."""

    def __init__(self, pipe: Pipe, max_bytes: int, *, filename: str | None, headers: Headers) -> None:
        super().__init__(pipe, size=0, filename=filename, headers=headers)  # type: ignore[arg-type]
        self.pipe = pipe
        self.max_bytes = max_bytes

    async def write(self, data: bytes) -> None:
        self.size = (self.size or 0) + len(data)
        if self.size > self.max_bytes:
            raise HTTPException(413, file_too_large(self.max_bytes))
        await self.pipe.write(data)

    async def seek(self, offset: int) -> None:
        """Starlette rewinds a spool when its part ends; a pipe has nothing to rewind."""

    async def close(self) -> None:
        """Ended by StoringMultiPartParser, which knows whether the form was whole."""


class StoringMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, storing the file part while it arrives: from the part's headers on,
    `storage.put` runs in a worker thread and reads the part through a Pipe. Storing overlaps receiving,
    nothing is spooled to disk, and the file is hashed in the thread as it goes to the store."""

    def __init__(self, request: Request, key: str) -> None:
        super().__init__(request.headers, request.stream(), max_files=1, max_fields=16, max_part_size=64 * 1024)
        self.state = request.app.state
        self.key = key
        self.pipe: Pipe | None = None
        self.storing: asyncio.Task[Stored] | None = None
        self.content_type = "application/octet-stream"
        self.filename: str | None = None  # cleaned
        self.body_bytes = declared_length(request.headers)

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        if part.file is None:  # a text field; max_files=1 stops a second file part
            return
        if part.field_name != "file":
            raise HTTPException(422, "file is required")
        self.content_type = part.file.content_type or self.content_type
        if not CONTENT_TYPE.fullmatch(self.content_type):
            raise HTTPException(422, "file has an invalid Content-Type")
        self.filename = clean_filename(part.file.filename)
        self.pipe = Pipe(PIPE_BYTES, at_most=self.body_bytes)
        part.file = PipedFile(
            self.pipe, self.state.settings.max_upload_bytes, filename=part.file.filename, headers=part.file.headers
        )
        put = partial(self.put, self.pipe, self.content_type, content_disposition(self.filename))
        self.storing = asyncio.get_running_loop().create_task(to_thread.run_sync(put, limiter=self.state.upload_slots))

    def put(self, pipe: Pipe, content_type: str, disposition: str) -> Stored:
        try:
            return self.state.storage.put(self.key, pipe, content_type=content_type, content_disposition=disposition)
        except BaseException:
            pipe.abort()  # so that the parser stops feeding a store that has given up
            raise

    async def stored(self) -> Stored:
        """Ends the file once the whole form is in; the store then finishes and commits it."""
        assert self.pipe is not None and self.storing is not None
        self.pipe.close()
        # Waited for, not awaited: cancelling this request must not cancel the storing task, whose
        # thread would go on unwatched (and could still commit the file).
        await asyncio.wait([self.storing])
        return self.storing.result()

    @asynccontextmanager
    async def undone_on_error(self) -> AsyncIterator[None]:
        """On any failure, the store abandons the file (S3 aborts the multipart upload) before we answer."""
        try:
            yield
        except BaseException as error:
            if self.pipe is None or self.storing is None:
                raise
            self.pipe.abort()
            await asyncio.wait([self.storing])
            # Taken even when unused, or asyncio would log it as an exception nobody retrieved.
            failure = None if self.storing.cancelled() else self.storing.exception()
            if isinstance(error, PipeBroken) and failure is not None:  # the store gave up first: it says why
                raise failure from None
            raise


def answer(storage: Storage, key: str, stored: Stored, content_type: str) -> dict[str, Any]:
    """The fields that describe a stored file. Blocking (a presign may refresh credentials)."""
    link = storage.link(key)
    return {
        "url": link.url,
        "key": key,
        "size": stored.size,
        "sha256": stored.sha256,
        "content_type": content_type,
        "expires_at": link.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def store_png(storage: Storage, png: bytes) -> dict[str, Any]:
    key = f"generated/{uuid4().hex}.png"
    stored = storage.put(key, io.BytesIO(png), content_type="image/png", content_disposition="inline")
    return answer(storage, key, stored, "image/png")


class Readiness:
    """The storage check behind /ready, cached so that load balancer probes never hammer S3."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.checked_at = -math.inf
        self.problem: str | None = None

    async def current_problem(self) -> str | None:
        if time.monotonic() - self.checked_at >= READY_CACHE_SECONDS:
            try:
                await run_in_threadpool(self.storage.check)
                self.problem = None
            except StorageError as error:
                self.problem = error.detail
            self.checked_at = time.monotonic()
        return self.problem


# ---------------------------------------------------------------- handlers


async def health(request: Request) -> JSONResponse:
    return HEALTHY


async def ready(request: Request) -> JSONResponse:
    problem = await request.app.state.readiness.current_problem()
    if problem:
        return JSONResponse({"status": "unavailable", "detail": problem}, 503)
    return JSONResponse({"status": "ready"})


async def generate(request: Request) -> JSONResponse:
    require_token(request)
    prompt = await read_prompt(request)
    png = await to_thread.run_sync(render_png, prompt, limiter=request.app.state.render_slots)
    return JSONResponse(await run_in_threadpool(store_png, request.app.state.storage, png))


async def upload(request: Request) -> JSONResponse:
    require_token(request)
    if media_type(request) != "multipart/form-data":
        raise HTTPException(415, "expected Content-Type: multipart/form-data")
    key = f"uploads/{uuid4().hex}"
    parser = StoringMultiPartParser(request, key)
    async with parser.undone_on_error():
        try:
            form = await parser.parse()
        except MultiPartException as error:
            raise HTTPException(400, error.message) from None
        file = form.get("file")
        if file is None:
            raise HTTPException(422, "file is required")
        if not isinstance(file, UploadFile):
            raise HTTPException(422, "file must be a file part, not a text field")
        stored = await parser.stored()
    stored_fields = await run_in_threadpool(answer, request.app.state.storage, key, stored, parser.content_type)
    return JSONResponse({"filename": parser.filename, **stored_fields})


async def openapi(request: Request) -> Response:
    return Response(OPENAPI_DOCUMENT, media_type="application/json")


async def download(request: Request) -> FileResponse:
    """Serves the local store's signed links (this route exists only with the local store)."""
    query = request.query_params
    path, metadata = await run_in_threadpool(
        request.app.state.storage.open, request.path_params["key"], query.get("expires", ""), query.get("signature", "")
    )
    if (requested := request.headers.get("range")) is not None:
        # FileResponse would answer a bad range in plain text; checked here with its own parser.
        try:
            FileResponse._parse_range_header(requested, path.stat().st_size)
        except MalformedRangeHeader as error:
            raise HTTPException(400, error.content) from None
        except RangeNotSatisfiable as error:
            content_range = {"Content-Range": f"bytes */{error.max_size}"}
            raise HTTPException(416, "requested range is not satisfiable", headers=content_range) from None
    headers = {"Content-Disposition": metadata["content_disposition"], "X-Content-Type-Options": "nosniff"}
    return FileResponse(path, media_type=metadata["content_type"], headers=headers)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def storage_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StorageError)
    return JSONResponse({"detail": exc.detail}, exc.status_code)


async def client_disconnected(request: Request, exc: Exception) -> None:
    # Nobody is left to answer, and an upload's store has already dropped what it had.
    log.info("client disconnected before sending the whole body of %s %s", request.method, request.url.path)


# ---------------------------------------------------------------- app


def create_app(settings: Settings | None = None, storage: Storage | None = None) -> Starlette:
    settings = settings or read_settings()
    storage = storage or make_storage(settings)
    generate_limit = Middleware(
        BodyLimit, limit=GENERATE_BODY_LIMIT, detail=f"request body is larger than {GENERATE_BODY_LIMIT} bytes"
    )
    upload_limit = Middleware(
        BodyLimit,
        limit=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        detail=file_too_large(settings.max_upload_bytes),
    )
    routes = [
        Route("/", health),
        Route("/health", health),
        Route("/ready", ready),
        Route("/openapi.json", openapi),
        Route("/generate", generate, methods=["POST"], middleware=[generate_limit]),
        Route("/upload", upload, methods=["POST"], middleware=[upload_limit]),
    ]
    if isinstance(storage, LocalStorage):
        routes.append(Route("/files/{key:path}", download))
    app = Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: http_error,
            StorageError: storage_error,
            ClientDisconnect: client_disconnected,
        },
        middleware=[Middleware(RequestContext)],
    )
    app.state.settings = settings
    app.state.storage = storage
    app.state.readiness = Readiness(storage)
    # Rendering holds the GIL: more renders at once than cores only adds switching, not throughput.
    app.state.render_slots = CapacityLimiter(os.cpu_count() or 1)
    # Each upload holds a worker thread while its part streams in; a limit of their own keeps slow
    # clients from taking the threads that storing generated images and storage checks need.
    app.state.upload_slots = CapacityLimiter(MAX_CONCURRENT_UPLOADS)
    log.info("storage: %s", storage.describe())
    return app


def main() -> None:
    try:
        settings = read_settings()
    except EnvError as error:
        problems = getattr(error, "error_messages", {}) or {"environment": [str(error)]}
        sys.exit("gen_service: invalid setting: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in problems.items()))
    uvicorn.run(
        # By import string, so that each of several workers builds its own app (and S3 client).
        "gen_service:create_app",
        factory=True,
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_format, settings.log_level),
        access_log=False,  # RequestContext logs each request, with its id and without query strings
        # Longer than the ALB's 60 s idle timeout, so the ALB never reuses a connection we closed.
        timeout_keep_alive=65,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        server_header=False,
    )


if __name__ == "__main__":
    main()
