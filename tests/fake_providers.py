"""Image providers as their documents describe them, served over real HTTP on 127.0.0.1 by the tests:

- OpenAI's images API: `POST /v1/images/generations` with `Authorization: Bearer`, answering
  `{"created", "data": [{"b64_json"} or {"url"}]}`, errors `{"error": {"message", "type", "param", "code"}}`
  with an `x-request-id` header.
- A Cog container: `POST /predictions` answering `{"id", "status", "output", "error", "metrics"}` (200 even
  when the model failed), 409 when busy; `GET /health-check` always 200 with `{"status": ...}`.
- Replicate: `POST /v1/models/{owner}/{name}/predictions` (201, a prediction with `urls.get` and
  `urls.cancel`; with `Prefer: wait`, `processing` with its output files, as Replicate answers once a
  model's files are all there), `GET /v1/predictions/{id}`, `POST /v1/predictions/{id}/cancel`; errors
  are problem+json.

Each test scripts what the next generation requests get (`plan`); without a plan, each route answers
its documented success with `image`. Every request is recorded, and so is every caller that left.

To try the backends by hand, serve the fakes on a port of your choosing (any key is then accepted):

    python tests/fake_providers.py 8089
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import random
import socket
import sys
import threading
import time
import zlib
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

API_KEY = "sk-test-4f1c2b8e9d7a6e5f4c3b2a1d0e9f8a7b"  # what the fakes expect, and what must never leak
HOLD_SECONDS = 60  # a held answer waits at most this long for release() or the caller to leave


def encoded(image: Image.Image, format: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **options)
    return out.getvalue()


PICTURE = Image.radial_gradient("L").convert("RGB").resize((64, 48))
PNG = encoded(PICTURE, "PNG")
JPEG = encoded(PICTURE, "JPEG")
WEBP = encoded(PICTURE, "WEBP")
GIF = encoded(PICTURE, "GIF")


def noise_png(side: int) -> bytes:
    """A PNG of random pixels, which does not compress: a little over 3 * side * side bytes."""
    return encoded(Image.frombytes("RGB", (side, side), random.Random(11).randbytes(3 * side * side)), "PNG")


def bomb_png(side: int = 20000) -> bytes:
    """A one-bit PNG of side x side white pixels: 400 M pixels (1.2 GB as RGB) in about 50 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1 bit, greyscale, no interlace
    compressor, row = zlib.compressobj(9), b"\x00" + b"\xff" * ((side + 7) // 8)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def openai_image(data: bytes) -> dict[str, Any]:
    return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(data).decode()}]}


def openai_link(url: str) -> dict[str, Any]:
    return {"created": int(time.time()), "data": [{"url": url}]}


def openai_error(code: str | None, message: str, kind: str = "invalid_request_error", **more: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code, **more}}


def problem(status: int, title: str, detail: str) -> dict[str, Any]:
    return {"title": title, "detail": detail, "status": status}


@dataclass
class Answer:
    """One scripted answer: `json` (or raw `body`), after holding the request open if `hold` (until release()),
    or if `wait` for as long as its `Prefer: wait=N` asks, as Replicate holds it for a model not done sooner."""

    status: int = 200
    json: Any = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    hold: bool = False
    wait: bool = False
    chunks: Callable[[], Iterator[bytes]] | None = None  # a body streamed as made, for one too large to hold


class Seen(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    json: Any
    at: float  # time.monotonic()


class FakeProviders:
    def __init__(self, api_key: str | None = API_KEY) -> None:
        self.api_key = api_key  # None: any bearer token will do
        self.plans: dict[str, deque[Answer]] = defaultdict(deque)
        self.seen: list[Seen] = []
        self.files: dict[str, bytes] = {}
        self.release_event = threading.Event()
        self.ids = itertools.count(1)
        self.base_url = self.https_url = ""  # set by whoever serves the app
        self.reset()
        self.app = Starlette(
            routes=[
                Route("/v1/images/generations", self.openai_generate, methods=["POST"]),
                # Azure OpenAI's v1 API: the same API under /openai/v1.
                Route("/openai/v1/images/generations", self.openai_generate, methods=["POST"]),
                Route("/predictions", self.cog_predict, methods=["POST"]),
                Route("/health-check", self.cog_health),
                Route("/v1/models/{owner}/{name}/predictions", self.replicate_create, methods=["POST"]),
                Route("/v1/predictions/{id}", self.replicate_get),
                Route("/v1/predictions/{id}/cancel", self.replicate_cancel, methods=["POST"]),
                Route("/files/{name}", self.file),
            ]
        )

    def reset(self) -> None:
        """No plan, nothing seen, the default image, a ready container."""
        self.image, self.health = PNG, "READY"
        self.plans.clear()
        self.seen.clear()
        self.files.clear()
        self.holding = self.callers_left = 0
        self.release_event.clear()

    # ------------------------------------------------ what tests use

    def plan(self, route: str, *answers: Answer) -> None:
        """What the next requests of `route` get: "generate" (any backend's), "poll", "file"."""
        self.plans[route].extend(answers)

    def release(self) -> None:
        self.release_event.set()

    def requests(self, path_part: str = "", method: str | None = None) -> list[Seen]:
        return [seen for seen in self.seen if path_part in seen.path and method in (None, seen.method)]

    def wait_until(self, condition: Any, seconds: float = 20) -> bool:
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(condition())

    def prediction(self, status: str = "succeeded", output: Any = None, error: str | None = None) -> dict[str, Any]:
        prediction_id = f"p{next(self.ids)}"
        return {
            "id": prediction_id,
            "model": "acme/painter",
            "status": status,
            "input": {},
            "output": output,
            "error": error,
            "logs": "",
            "urls": {
                "get": f"{self.base_url}/v1/predictions/{prediction_id}",
                "cancel": f"{self.base_url}/v1/predictions/{prediction_id}/cancel",
            },
        }

    def file_url(self, data: bytes, name: str = "out.png", base_url: str | None = None) -> str:
        self.files[name] = data
        return f"{base_url or self.base_url}/files/{name}"

    # ------------------------------------------------ routes

    async def answer(self, request: Request, route: str, default: Answer) -> Response:
        """The next planned answer of `route`, else `default`; a planned answer without a body has `default`'s."""
        body = await request.body()
        self.seen.append(Seen(request.method, request.url.path, dict(request.headers), parsed(body), time.monotonic()))
        planned = self.plans[route].popleft() if self.plans[route] else default
        seconds = HOLD_SECONDS if planned.hold else prefer_wait_seconds(request) if planned.wait else 0
        if seconds and not await self.held(request, seconds):
            return Response(status_code=499)  # nobody reads it
        headers = {"x-request-id": f"req_{next(self.ids)}", **planned.headers}
        if planned.chunks is not None:
            return StreamingResponse(planned.chunks(), planned.status, headers=headers, media_type="application/json")
        if planned.body is not None:
            return Response(planned.body, planned.status, headers=headers, media_type="application/octet-stream")
        content = default.json if planned.json is None else planned.json
        return JSONResponse(content, planned.status, headers=headers)

    async def held(self, request: Request, seconds: float) -> bool:
        """Holds the request until release() or for `seconds`: False if the caller left first (its connection
        closed)."""
        self.holding += 1
        try:
            deadline = time.monotonic() + seconds
            while not self.release_event.is_set() and time.monotonic() < deadline:
                if await request.is_disconnected():
                    self.callers_left += 1
                    return False
                await asyncio.sleep(0.02)
            return True
        finally:
            self.holding -= 1

    def authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme == "Bearer" and bool(token) and token == (self.api_key or token)

    async def openai_generate(self, request: Request) -> Response:
        if not self.authorized(request):
            # Some servers echo the key they were sent: it must go no further than our own process.
            given = request.headers.get("authorization", "")
            error = openai_error("invalid_api_key", f"Incorrect API key provided: {given}.")
            return await self.answer(request, "unauthorized", Answer(401, error))
        return await self.answer(request, "generate", Answer(json=openai_image(self.image)))

    async def cog_predict(self, request: Request) -> Response:
        success = {"id": f"pred_{next(self.ids)}", "status": "succeeded", "output": data_url(self.image), "error": None}
        return await self.answer(request, "generate", Answer(json={**success, "metrics": {"predict_time": 0.1}}))

    async def cog_health(self, request: Request) -> Response:
        self.seen.append(Seen("GET", request.url.path, dict(request.headers), None, time.monotonic()))
        return JSONResponse({"status": self.health, "version": {"coglet": "0.17.0"}})

    async def replicate_create(self, request: Request) -> Response:
        if not self.authorized(request):
            detail = f"Invalid token {request.headers.get('authorization', '')}"
            return await self.answer(request, "unauthorized", Answer(401, problem(401, "Unauthenticated", detail)))
        # As Replicate answers for a model whose outputs are files: with `Prefer: wait`, as soon as they are all
        # there, the prediction possibly still `processing`; without it, at once, the prediction `starting`.
        if request.headers.get("prefer", "").startswith("wait"):
            created = self.prediction("processing", [self.file_url(self.image)])
        else:
            created = self.prediction("starting")
        return await self.answer(request, "generate", Answer(201, created))

    async def replicate_get(self, request: Request) -> Response:
        output = [self.file_url(self.image)]
        success = self.prediction("succeeded", output) | {"id": request.path_params["id"]}
        return await self.answer(request, "poll", Answer(json=success))

    async def replicate_cancel(self, request: Request) -> Response:
        canceled = self.prediction("canceled") | {"id": request.path_params["id"]}
        return await self.answer(request, "cancel", Answer(json=canceled))

    async def file(self, request: Request) -> Response:
        data = self.files.get(request.path_params["name"])
        found = Answer(body=data) if data is not None else Answer(404, {"detail": "not found"})
        return await self.answer(request, "file", found)


class InternalService:
    """A service of the private network a provider's link may try to reach: it records every request, and
    answers each with a PNG (`/image.png`), an error whose body is a secret (`/forbidden`), or 404."""

    SECRET = "internal-only: db password hunter2"

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.base_url = ""
        self.app = Starlette(routes=[Route("/{path:path}", self.serve, methods=["GET", "POST"])])

    async def serve(self, request: Request) -> Response:
        self.seen.append(Seen(request.method, request.url.path, dict(request.headers), None, time.monotonic()))
        if request.url.path == "/image.png":
            return Response(PNG, media_type="image/png")
        if request.url.path == "/forbidden":
            return Response(self.SECRET, 403)
        return Response(status_code=404)


def prefer_wait_seconds(request: Request) -> float:
    """How long `Prefer: wait=N` asks a request to be held (`Prefer: wait` alone: Replicate's 60 s)."""
    prefer = request.headers.get("prefer", "")
    if prefer == "wait":
        return 60
    return float(prefer.removeprefix("wait=")) if prefer.startswith("wait=") else 0


def parsed(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


class Served:
    """An ASGI app served by uvicorn in a thread of this process, on a port of its own on 127.0.0.1."""

    def __init__(self, app: Any, certificate: Path | None = None, port: int = 0) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port of one's choosing may be in TIME_WAIT
        sock.bind(("127.0.0.1", port))
        scheme = "https" if certificate else "http"
        self.url = f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
        tls = {"ssl_certfile": str(certificate), "ssl_keyfile": str(certificate)} if certificate else {}
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=1, **tls
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started, "the fake provider did not start"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


if __name__ == "__main__":
    providers = FakeProviders(api_key=None)
    served = Served(providers.app, port=int(sys.argv[1]) if len(sys.argv) > 1 else 8089)
    providers.base_url = served.url
    print(
        f"fake image providers at {served.url}: OpenAI {served.url}/v1, Azure {served.url}/openai/v1, Cog {served.url}"
    )
    try:
        served.thread.join()
    except KeyboardInterrupt:
        served.close()
