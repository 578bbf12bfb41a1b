"""Generative asset service: renders prompts to images and stores uploads, answering with links.

Reads top to bottom: settings, request checks, handlers, the app, the entry point.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import uvicorn
from anyio import CapacityLimiter, to_thread
from environs import EnvError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from body_limits import BodyLimit, BodyTimeout, file_too_large
from errors import EXCEPTION_HANDLERS, FileWithJSONErrors, InternalErrors
from logs import RequestContext, logging_config
from render import render_png
from settings import Settings, read_settings
from storage import LocalStorage, Storage, StorageError, Stored, make_s3_storage
from upload_parser import StoringMultiPartParser

log = logging.getLogger("gen_service")

MiB = 1024 * 1024
GENERATE_BODY_LIMIT = 64 * 1024
# Room for the multipart boundaries and part headers around a file of MAX_UPLOAD_BYTES.
MULTIPART_OVERHEAD = 64 * 1024
READY_CACHE_SECONDS = 5
HEALTHY = JSONResponse({"status": "ok"})  # built once: probes come every few seconds from every ALB node
OPENAPI_DOCUMENT = (Path(__file__).parent / "openapi.json").read_bytes()


# ---------------------------------------------------------------- stores


def make_storage(settings: Settings) -> Storage:
    if settings.s3_bucket is None:
        base_url = settings.public_base_url or f"http://{settings.host}:{settings.port}"
        if settings.public_base_url is None and settings.host in ("0.0.0.0", "::"):
            log.warning("links will point at %s, which clients cannot open: set PUBLIC_BASE_URL", base_url)
        return LocalStorage(settings.local_storage_dir, base_url, settings.presign_ttl_seconds)
    return make_s3_storage(
        settings.s3_bucket,
        settings.presign_ttl_seconds,
        region=settings.s3_region,
        endpoint_url=settings.s3_endpoint_url,
        connect_timeout=settings.s3_connect_timeout_seconds,
        read_timeout=settings.s3_read_timeout_seconds,
        checksums=settings.s3_checksums,
    )


# ---------------------------------------------------------------- request checks


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


def answer(storage: Storage, key: str, stored: Stored, content_type: str) -> dict[str, Any]:
    """The fields that describe a stored file. Blocking (a presign may refresh credentials).

    If no link can be made, the file is removed before the failure is answered: a caller told of a
    failure must not leave a file behind that nobody knows of."""
    try:
        link = storage.link(key)
    except Exception:
        remove_quietly(storage, key)
        raise
    return {
        "url": link.url,
        "key": key,
        "size": stored.size,
        "sha256": stored.sha256,
        "content_type": content_type,
        "expires_at": link.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def remove_quietly(storage: Storage, key: str) -> None:
    try:
        storage.delete(key)
    except Exception:  # the failure being answered matters more; this one is only logged
        log.exception("could not remove %s, stored for a request that failed", key)


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


async def download(request: Request) -> FileWithJSONErrors:
    """Serves the local store's signed links (this route exists only with the local store)."""
    query = request.query_params
    path, metadata = await run_in_threadpool(
        request.app.state.storage.open, request.path_params["key"], query.get("expires", ""), query.get("signature", "")
    )
    headers = {
        # A header, not `media_type`, which would add "; charset=utf-8" to a text type: a claim about bytes unseen.
        "Content-Type": metadata["content_type"],
        "Content-Disposition": metadata["content_disposition"],
        "X-Content-Type-Options": "nosniff",
    }
    return FileWithJSONErrors(path, headers=headers)


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
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[
            Middleware(RequestContext),
            Middleware(InternalErrors),
            Middleware(BodyTimeout, seconds=settings.client_body_timeout_seconds),
        ],
    )
    app.state.settings = settings
    app.state.storage = storage
    app.state.readiness = Readiness(storage)
    # Rendering holds the GIL: more renders at once than cores only adds switching, not throughput.
    app.state.render_slots = CapacityLimiter(os.cpu_count() or 1)
    # What bounds the memory of uploads (see upload_stream.py), and threads of their own, so that
    # uploads never take the threads that storing generated images and storage checks need.
    app.state.upload_slots = CapacityLimiter(settings.max_concurrent_uploads)
    app.state.upload_threads = CapacityLimiter(settings.max_concurrent_uploads)
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
