"""Generative asset service: renders prompts to images and stores uploads, answering with links.

Reads top to bottom: stores and generators, request checks, handlers, the app, the entry point.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from uuid import uuid4

import anyio
import httpx
import uvicorn
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
from generators import (
    WAITING_PER_SLOT,
    GeneratedImage,
    GenerationError,
    Generations,
    Generator,
    Placeholder,
    Size,
    default_concurrency,
)
from logs import RequestContext, logging_config
from providers.cog import CogPredictions, ReplicateModel
from providers.exchange import ProviderHTTP, make_http_client
from providers.links import Links
from providers.openai import OpenAIImages
from settings import Settings, read_settings
from storage import LocalStorage, Storage, StorageError, Stored, make_s3_storage
from upload_parser import StoringMultiPartParser
from upload_stream import UploadSlots

log = logging.getLogger("gen_service")
T = TypeVar("T")

GENERATE_BODY_LIMIT = 64 * 1024
# Room for the multipart boundaries and part headers around a file of MAX_UPLOAD_BYTES.
MULTIPART_OVERHEAD = 64 * 1024
READY_CACHE_SECONDS = 5
# WIDTHxHEIGHT, each side 64..4096 pixels.
SIZE = re.compile(r"([0-9]{2,4})x([0-9]{2,4})")
SIDE_PIXELS = range(64, 4097)
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
HEALTHY = JSONResponse({"status": "ok"})  # built once: probes come every few seconds from every ALB node
OPENAPI_DOCUMENT = (Path(__file__).parent / "openapi.json").read_bytes()


# ---------------------------------------------------------------- stores and generators


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


def make_generator(settings: Settings, client: httpx.AsyncClient | None) -> Generator:
    """The generator IMAGE_BACKEND names; the remote ones share `client`, the process's one HTTP client, each
    with the rule for the links it gives (its own origin, and IMAGE_FETCH_ALLOWED_HOSTS) and its secrets."""
    if settings.image_backend == "placeholder":
        return Placeholder()
    assert client is not None

    def http(base_url: str, secret: str | None = None) -> ProviderHTTP:
        links = Links(base_url, settings.image_fetch_allowed_hosts)
        return ProviderHTTP(client, links, [secret] if secret else [])

    if settings.image_backend == "openai":
        assert settings.openai_api_key is not None
        return OpenAIImages(
            http(settings.openai_base_url, settings.openai_api_key),
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key,
            model=settings.image_model,
            max_image_bytes=settings.max_image_bytes,
        )
    if settings.image_backend == "cog":
        assert settings.cog_url is not None
        return CogPredictions(
            http(settings.cog_url),
            base_url=settings.cog_url,
            inputs=settings.cog_input,
            max_image_bytes=settings.max_image_bytes,
        )
    assert settings.replicate_api_token is not None and settings.replicate_model is not None
    return CogPredictions(
        http(settings.replicate_base_url, settings.replicate_api_token),
        base_url=settings.replicate_base_url,
        inputs=settings.cog_input,
        max_image_bytes=settings.max_image_bytes,
        replicate=ReplicateModel(settings.replicate_model, settings.replicate_api_token),
    )


def make_generations(settings: Settings, generator: Generator) -> Generations:
    concurrency = settings.generate_concurrency or default_concurrency(settings.image_backend)
    queue = WAITING_PER_SLOT * concurrency if settings.generate_queue is None else settings.generate_queue
    return Generations(
        generator, concurrency=concurrency, queue=queue, timeout_seconds=settings.generate_timeout_seconds
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


async def read_generate_request(request: Request) -> tuple[str, Size | None]:
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
    return prompt, requested_size(body.get("size"))


def requested_size(size: object) -> Size | None:
    if size is None:
        return None
    match = SIZE.fullmatch(size) if isinstance(size, str) else None
    if match is None or not all(int(side) in SIDE_PIXELS for side in match.groups()):
        raise HTTPException(422, "size must be WIDTHxHEIGHT, each from 64 to 4096 pixels")
    return Size(int(match[1]), int(match[2]))


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


def store_image(storage: Storage, image: GeneratedImage) -> dict[str, Any]:
    key = f"generated/{uuid4().hex}.{EXTENSIONS[image.media_type]}"
    stored = storage.put(key, io.BytesIO(image.data), content_type=image.media_type, content_disposition="inline")
    return answer(storage, key, stored, image.media_type)


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """What `work()` returns, or None if the caller hangs up first: `work` is then cancelled (a provider's
    request with it, which closes that connection)."""

    async def cancel_on_disconnect() -> None:
        # The body has been read: what the server sends next is the disconnect, if it comes.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        group.cancel_scope.cancel()

    result, error = None, None
    async with anyio.create_task_group() as group:
        group.start_soon(cancel_on_disconnect)
        try:
            result = await work()
        except Exception as raised:  # re-raised below as it is, not wrapped in the task group's ExceptionGroup
            error = raised
        group.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


class Readiness:
    """The storage and generator checks behind /ready, cached so that load balancer probes never hammer
    S3 or the model: one check at a time, and probes that arrive during it take its answer."""

    def __init__(self, storage: Storage, generator: Generator) -> None:
        self.storage = storage
        self.generator = generator
        self.checked_at = -math.inf
        self.problem: str | None = None
        self.checking = anyio.Lock()

    async def current_problem(self) -> str | None:
        async with self.checking:
            if time.monotonic() - self.checked_at < READY_CACHE_SECONDS:
                return self.problem
            try:
                await run_in_threadpool(self.storage.check)
                await self.generator.check()
                self.problem = None
            except (StorageError, GenerationError) as error:
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


async def generate(request: Request) -> Response:
    require_token(request)
    prompt, size = await read_generate_request(request)
    image = await unless_disconnected(request, partial(request.app.state.generations.run, prompt, size))
    if image is None:  # nothing is stored; 499 (client closed request) is for the access line, nobody reads it
        return Response(status_code=499)
    return JSONResponse(await run_in_threadpool(store_image, request.app.state.storage, image))


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


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # The remote generators' HTTP client opens its connection pool here and closes it at shutdown.
    async with app.state.http_client or nullcontext():
        yield


def create_app(settings: Settings | None = None, storage: Storage | None = None) -> Starlette:
    settings = settings or read_settings()
    storage = storage or make_storage(settings)
    http_client = None if settings.image_backend == "placeholder" else make_http_client()
    generator = make_generator(settings, http_client)
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
            Middleware(
                BodyTimeout,
                seconds=settings.client_body_timeout_seconds,
                min_rate=settings.client_body_min_rate_bytes,
            ),
        ],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.storage = storage
    app.state.http_client = http_client
    app.state.generations = make_generations(settings, generator)
    app.state.readiness = Readiness(storage, generator)
    # What bounds the memory of uploads (see upload_stream.py), and threads of their own, so that
    # uploads never take the threads that storing generated images and storage checks need.
    app.state.upload_slots = UploadSlots(settings.max_concurrent_uploads, storage.part_bytes)
    log.info("storage: %s", storage.describe())
    log.info("image generator: %s", generator.describe())
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
        timeout_keep_alive=settings.keep_alive_seconds,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        server_header=False,
    )


if __name__ == "__main__":
    main()
