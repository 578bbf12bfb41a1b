"""Remote image generators: OpenAI-compatible image APIs, and Cog models (in a container of our own, or
hosted on Replicate). Each is a short class with the interface of generators.Generator; what they share
is here too: one exchange with retries within the generation's deadline, reads with a byte bound, and
turning a provider's error into the caller's.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import logging
import math
import os
import random
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import anyio
import httpx
from anyio import CapacityLimiter, to_thread

from generators import GeneratedImage, Generation, GenerationError, Size
from image_check import ImageRejected, image_media_type

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5
# As the official OpenAI client: connection failures, 408, 409 (a busy Cog container), 429 and 5xx are
# retried twice, after 0.5 s then 1 s (less up to a quarter, at random), or after the server's Retry-After.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
BUSY_STATUSES = frozenset({409, 429, 503})
# A 429 that says the money is spent is not a busy provider: retrying later will not help.
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
MAX_RETRIES = 2
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0
ERROR_BODY_BYTES = 64 * 1024
# A JSON answer carries the image in base64 (4 bytes for every 3), plus a little of its own.
JSON_OVERHEAD_BYTES = 64 * 1024
REPLICATE_WAIT_SECONDS = 60  # the longest `Prefer: wait` Replicate honours
POLL_SECONDS = 1.0
HEALTH_CHECK_SECONDS = 2.0
# Openai's refusal codes, and Azure's.
OPENAI_REFUSALS = frozenset({"moderation_blocked", "content_policy_violation", "contentFilter", "content_filter"})
# How a model's own failure says that it refused the prompt (SDXL: "NSFW content detected...").
MODEL_REFUSAL = re.compile(r"nsfw|not safe for work|safety|content polic|moderation|flagged|inappropriate", re.I)
SAFETY_VIOLATIONS = re.compile(r"safety_violations=\[([^\]]*)\]")
SHORT_CODE = re.compile(r"[\w .:/-]{1,80}")


def make_http_client() -> httpx.AsyncClient:
    """The one HTTP client of the process for providers: pooled connections, a bounded connect, and no
    read timeout of its own, since every generation has one deadline (GENERATE_TIMEOUT_SECONDS). The
    number of connections is bounded by GENERATE_CONCURRENCY: each generation uses one at a time."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_SECONDS),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )


# ---------------------------------------------------------------- one exchange, retried


class Reply(NamedTuple):
    status: int
    headers: httpx.Headers
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


async def exchange(
    client: httpx.AsyncClient, request: httpx.Request, limit: int, generation: Generation | None
) -> Reply:
    """The answer to `request`, at most `limit` bytes of it. Connection failures and RETRYABLE_STATUSES are
    tried again, at most MAX_RETRIES times and only while the wait fits before the deadline; each try
    counts in `generation.attempts`."""
    for retries in range(MAX_RETRIES + 1):
        if generation is not None:
            generation.attempts += 1
        try:
            reply: Reply | None = await send(client, request, limit)
        except httpx.TransportError as error:
            reply, failure = None, error
        if reply is not None and reply.status not in RETRYABLE_STATUSES:
            return reply
        delay = retry_delay(reply, retries)
        if retries == MAX_RETRIES or delay is None:
            break
        await anyio.sleep(delay)
    if reply is None:
        log.warning("image generator %s is unreachable: %s", origin(request.url), type(failure).__name__)
        raise GenerationError(503, "image generator is unreachable", "unavailable") from failure
    return reply


async def send(client: httpx.AsyncClient, request: httpx.Request, limit: int) -> Reply:
    """One try. An error's body is cut at ERROR_BODY_BYTES; a success's over `limit` is refused (502)."""
    response = await client.send(request, stream=True, follow_redirects=request.method == "GET")
    try:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > (limit if response.is_success else ERROR_BODY_BYTES):
                if response.is_success:
                    raise rejected(ImageRejected(f"an answer over {limit} bytes"))
                break
        return Reply(response.status_code, response.headers, bytes(body))
    finally:
        await response.aclose()


def retry_delay(reply: Reply | None, retries: int) -> float | None:
    """Seconds to wait before the next try, or None if the deadline comes first."""
    remaining = anyio.current_effective_deadline() - anyio.current_time()
    asked = retry_after_seconds(reply.headers) if reply is not None else None
    if asked is not None:
        return asked if asked < remaining else None
    backoff = min(FIRST_BACKOFF_SECONDS * 2**retries, MAX_BACKOFF_SECONDS) * (1 - 0.25 * random.random())
    return backoff if backoff < remaining else None


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """`retry-after-ms` (OpenAI's), else `Retry-After` in seconds or as an HTTP date; None if neither."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            seconds = float(headers[name]) * scale
        except (KeyError, ValueError):
            continue
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None
    return max(0.0, (when.replace(tzinfo=when.tzinfo or UTC) - datetime.now(UTC)).total_seconds())


# ---------------------------------------------------------------- what came back


class Problem(NamedTuple):
    """A provider's error answer, as read from its body."""

    code: str  # short, for the caller's detail: the provider's error code or title
    message: str  # for the log only
    refusal: str | None = None  # not None: the prompt was refused, for this reason ("" if none given)


def error_for(reply: Reply, problem: Problem, *, secret: str | None = None) -> GenerationError:
    """What the caller gets for a provider's error answer (after any retries)."""
    if problem.refusal is not None:
        return refused(problem.refusal)
    if reply.status in BUSY_STATUSES and problem.code not in QUOTA_CODES:
        asked = retry_after_seconds(reply.headers)
        retry_after = math.ceil(asked) if asked is not None else None
        return GenerationError(503, "image generator is busy", "busy", retry_after=retry_after)
    if reply.status >= 500 or reply.status == 408:
        return GenerationError(503, f"image generator is unavailable (HTTP {reply.status})", "unavailable")
    code = problem.code if SHORT_CODE.fullmatch(problem.code) else f"HTTP {reply.status}"
    message = problem.message.replace(secret, "[redacted]") if secret else problem.message
    request_id = reply.headers.get("x-request-id", "-")
    log.warning(
        "image generator refused the request: HTTP %s %s: %s (x-request-id %s)", reply.status, code, message, request_id
    )
    return GenerationError(502, f"image generator refused the request ({code})", "misconfigured")


def refused(reason: str) -> GenerationError:
    reason = " ".join(reason.split())[:200]
    detail = "the image generator refused the prompt" + (f": {reason}" if reason else "")
    return GenerationError(422, detail, "refused")


def rejected(error: ImageRejected) -> GenerationError:
    log.warning("image generator sent %s", error)
    return GenerationError(502, f"image generator sent {error}", "bad image")


def unusable(what: str) -> GenerationError:
    log.warning("image generator sent an answer without %s", what)
    return GenerationError(502, f"image generator sent no {what}", "bad image")


def origin(url: httpx.URL | str) -> str:
    """scheme://host[:port] of a URL: what may be logged of it (no credentials, path or query)."""
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


class Images:
    """The image checks and downloads both kinds of generator share."""

    def __init__(self, client: httpx.AsyncClient, max_bytes: int) -> None:
        self.client = client
        self.max_bytes = max_bytes
        self.json_limit = max_bytes * 4 // 3 + JSON_OVERHEAD_BYTES
        # Decoding is CPU work and takes memory for every pixel: one at a time per core.
        self.decoding = CapacityLimiter(os.cpu_count() or 1)

    async def parsed(self, reply: Reply) -> Any:
        """The JSON of a (possibly large) successful answer, parsed off the event loop."""
        try:
            return await to_thread.run_sync(json.loads, reply.body, limiter=self.decoding)
        except ValueError:
            raise unusable("JSON") from None

    async def checked(self, data: bytes) -> GeneratedImage:
        try:
            media_type = await to_thread.run_sync(image_media_type, data, self.max_bytes, limiter=self.decoding)
        except ImageRejected as error:
            raise rejected(error) from None
        return GeneratedImage(data, media_type)

    async def from_base64(self, encoded: str) -> GeneratedImage:
        try:
            data = await to_thread.run_sync(base64.b64decode, encoded, limiter=self.decoding)
        except (binascii.Error, ValueError):
            raise rejected(ImageRejected("an image in invalid base64")) from None
        return await self.checked(data)

    async def from_url(self, url: str, headers: Mapping[str, str] | None = None) -> GeneratedImage:
        """The image behind `url`: a `data:` URL, or an http(s) one fetched with the same byte bound."""
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64"):
                raise unusable("base64 data URL")
            return await self.from_base64(payload)
        if urlsplit(url).scheme not in ("http", "https"):
            raise unusable("image URL")
        reply = await exchange(
            self.client, self.client.build_request("GET", url, headers=headers), self.max_bytes, None
        )
        if not reply.ok:
            log.warning("image generator's image at %s answered HTTP %s", origin(url), reply.status)
            raise GenerationError(502, f"image generator's image URL answered HTTP {reply.status}", "bad image")
        return await self.checked(reply.body)


# ---------------------------------------------------------------- OpenAI's images API


class OpenAIImages:
    """`POST {base_url}/images/generations`: OpenAI, Azure OpenAI's v1 API, and servers that speak the
    same API (LocalAI). GPT image models answer `b64_json` (and refuse `response_format`, so it is not
    sent); others may answer a `url`, which is fetched."""

    backend = "openai"

    def __init__(
        self, client: httpx.AsyncClient, *, base_url: str, api_key: str, model: str, max_image_bytes: int
    ) -> None:
        self.client = client
        self.url = base_url.rstrip("/") + "/images/generations"
        self.api_key = api_key
        self.model = model
        self.images = Images(client, max_image_bytes)

    async def generate(self, prompt: str, size: Size | None, generation: Generation) -> GeneratedImage:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "n": 1}
        if size is not None:
            body["size"] = str(size)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        request = self.client.build_request("POST", self.url, json=body, headers=headers)
        reply = await exchange(self.client, request, self.images.json_limit, generation)
        generation.provider_id = reply.headers.get("x-request-id")
        if not reply.ok:
            raise error_for(reply, openai_problem(reply), secret=self.api_key)
        answer = await self.images.parsed(reply)
        data = answer.get("data") if isinstance(answer, dict) else None
        image = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        if isinstance(image.get("b64_json"), str):
            return await self.images.from_base64(image["b64_json"])
        if isinstance(image.get("url"), str):
            # The link is the provider's own; the API key is not sent to it.
            return await self.images.from_url(image["url"])
        raise unusable("image")

    async def check(self) -> None:
        return None  # configured is ready: the only check that proves the key would be a paid call

    def describe(self) -> str:
        return f"OpenAI-compatible images API at {origin(self.url)}, model {self.model}"


def openai_problem(reply: Reply) -> Problem:
    """`{"error": {"message", "type", "param", "code"}}`, with a refusal's categories where given: OpenAI
    puts them in `moderation_details` or in the message (`safety_violations=[...]`), Azure in
    `innererror.content_filter_results`."""
    answer = reply.json()
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        return Problem(f"HTTP {reply.status}", reply.body[:500].decode(errors="replace"))
    code = str(error.get("code") or error.get("type") or f"HTTP {reply.status}")
    message = str(error.get("message") or "")
    inner = error.get("innererror") if isinstance(error.get("innererror"), dict) else {}
    if code not in OPENAI_REFUSALS and inner.get("code") != "ResponsibleAIPolicyViolation":
        return Problem(code, message)
    categories = (error.get("moderation_details") or {}).get("categories") or []
    if not categories and (listed := SAFETY_VIOLATIONS.search(message)):
        categories = listed[1].split(",")
    filtered = inner.get("content_filter_results") or {}
    categories = categories or [name for name, result in filtered.items() if (result or {}).get("filtered")]
    return Problem(code, message, refusal=", ".join(str(category).strip() for category in categories))


# ---------------------------------------------------------------- Cog models: a container, or Replicate


class CogPredictions:
    """A Cog model's predictions API. `cog`: a container of our own, `POST {COG_URL}/predictions`, answered
    when the prediction ends (and cancelled by the container when the connection drops). `replicate`:
    the same models hosted, `POST {base}/models/{owner}/{name}/predictions` with `Prefer: wait`, then
    `urls.get` polled while it runs (and `urls.cancel` called if the caller leaves or time runs out)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        backend: str,
        predictions_url: str,
        inputs: Mapping[str, Any],
        max_image_bytes: int,
        model: str | None = None,
        token: str | None = None,
        health_url: str | None = None,
    ) -> None:
        self.client = client
        self.backend = backend
        self.predictions_url = predictions_url
        self.inputs = dict(inputs)
        self.model = model
        self.token = token
        self.health_url = health_url
        self.images = Images(client, max_image_bytes)

    @classmethod
    def cog(
        cls, client: httpx.AsyncClient, url: str, inputs: Mapping[str, Any], max_image_bytes: int
    ) -> CogPredictions:
        base = url.rstrip("/")
        return cls(
            client,
            backend="cog",
            predictions_url=f"{base}/predictions",
            health_url=f"{base}/health-check",
            inputs=inputs,
            max_image_bytes=max_image_bytes,
        )

    @classmethod
    def replicate(
        cls,
        client: httpx.AsyncClient,
        base_url: str,
        token: str,
        model: str,
        inputs: Mapping[str, Any],
        max_image_bytes: int,
    ) -> CogPredictions:
        return cls(
            client,
            backend="replicate",
            predictions_url=f"{base_url.rstrip('/')}/models/{model}/predictions",
            model=model,
            token=token,
            inputs=inputs,
            max_image_bytes=max_image_bytes,
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def generate(self, prompt: str, size: Size | None, generation: Generation) -> GeneratedImage:
        dimensions = {"width": size.width, "height": size.height} if size else {}
        body = {"input": {**self.inputs, **dimensions, "prompt": prompt}}
        headers = self.headers()
        if self.token:  # Replicate: hold the request until the prediction ends, if it ends soon enough
            remaining = anyio.current_effective_deadline() - anyio.current_time()
            headers["Prefer"] = f"wait={max(1, min(REPLICATE_WAIT_SECONDS, int(remaining)))}"
        request = self.client.build_request("POST", self.predictions_url, json=body, headers=headers)
        reply = await exchange(self.client, request, self.images.json_limit, generation)
        if not reply.ok:
            raise error_for(reply, cog_problem(reply), secret=self.token)
        prediction = await self.images.parsed(reply)
        if not isinstance(prediction, dict):
            raise unusable("prediction")
        generation.provider_id = prediction.get("id")
        prediction = await self.until_finished(prediction)
        if prediction.get("status") != "succeeded":
            raise failed(prediction)
        output = prediction.get("output")
        first = output[0] if isinstance(output, list) and output else output
        if not isinstance(first, str):
            raise unusable("image output")
        return await self.images.from_url(first, self.output_headers(first))

    async def until_finished(self, prediction: dict[str, Any]) -> dict[str, Any]:
        """The prediction once it has ended, polling `urls.get` while it runs (Replicate only)."""
        urls = prediction.get("urls") if isinstance(prediction.get("urls"), dict) else {}
        try:
            while prediction.get("status") in ("starting", "processing") and not prediction.get("output"):
                if not isinstance(urls.get("get"), str):
                    raise unusable("prediction URL")
                await anyio.sleep(POLL_SECONDS)
                poll = self.client.build_request("GET", urls["get"], headers=self.headers())
                reply = await exchange(self.client, poll, self.images.json_limit, None)
                if not reply.ok:
                    raise error_for(reply, cog_problem(reply), secret=self.token)
                prediction = await self.images.parsed(reply)
                if not isinstance(prediction, dict):
                    raise unusable("prediction")
        except BaseException:
            if isinstance(urls.get("cancel"), str):
                await self.cancel(urls["cancel"])
            raise
        return prediction

    async def cancel(self, url: str) -> None:
        """Best effort, shielded from the cancellation that brought us here: a prediction left running costs."""
        with anyio.move_on_after(HEALTH_CHECK_SECONDS, shield=True):
            try:
                await self.client.post(url, headers=self.headers())
            except httpx.HTTPError as error:
                log.warning("could not cancel the prediction: %s", type(error).__name__)

    def output_headers(self, url: str) -> dict[str, str]:
        """Replicate's files may need the token; it goes to its own API's host, or over HTTPS only."""
        if self.token and (url.startswith("https://") or origin(url) == origin(self.predictions_url)):
            return self.headers()
        return {}

    async def check(self) -> None:
        """A container's `GET /health-check`: HTTP 200 (or 503 in newer Cog versions) whatever its state,
        which `status` says. Replicate: configured is ready."""
        if self.health_url is None:
            return
        try:
            with anyio.fail_after(HEALTH_CHECK_SECONDS):
                response = await self.client.get(self.health_url)
        except (httpx.HTTPError, TimeoutError):
            raise GenerationError(503, "image generator is unreachable", "unavailable") from None
        try:
            status = response.json().get("status")
        except (ValueError, AttributeError):
            status = None
        if status not in ("READY", "BUSY"):
            raise GenerationError(
                503, f"image generator is not ready ({status or f'HTTP {response.status_code}'})", "unavailable"
            )

    def describe(self) -> str:
        return f"Cog model at {origin(self.predictions_url)}" + (f", model {self.model}" if self.model else "")


def cog_problem(reply: Reply) -> Problem:
    """Replicate's problem+json (`{"title", "detail", "status"}`), or Cog's own `{"detail": ...}`."""
    answer = reply.json()
    if not isinstance(answer, dict):
        return Problem(f"HTTP {reply.status}", reply.body[:500].decode(errors="replace"))
    detail = answer.get("detail")
    return Problem(
        str(answer.get("title") or f"HTTP {reply.status}"), detail if isinstance(detail, str) else json.dumps(detail)
    )


def failed(prediction: dict[str, Any]) -> GenerationError:
    """A prediction that ended without output: refused when the model says so, else the model failed."""
    error = str(prediction.get("error") or "")
    if MODEL_REFUSAL.search(error):
        return refused(error)
    log.warning("the model's prediction %s ended %s: %s", prediction.get("id", "-"), prediction.get("status"), error)
    return GenerationError(502, "image generator failed", "failed")
