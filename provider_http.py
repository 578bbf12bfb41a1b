"""HTTP with image providers: the process's one client; one exchange, retried within the generation's
deadline; reads with a byte bound; the image read out of an answer and checked; and a provider's error
turned into what the caller hears. What providers.py's generators share."""

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
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import anyio
import httpx
from anyio import CapacityLimiter, to_thread

from generators import GeneratedImage, Generation, GenerationError
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
    body: bytearray  # as read: a copy of up to MAX_IMAGE_BYTES would hold the event loop

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


async def exchange(
    client: httpx.AsyncClient,
    request: httpx.Request,
    limit: int,
    generation: Generation | None,
    *,
    problem_of: Callable[[Reply], Problem] | None = None,
    before_each_try: Callable[[httpx.Request], None] | None = None,
) -> Reply:
    """The answer to `request`, at most `limit` bytes of it. Connection failures and retryable answers are
    tried again, at most MAX_RETRIES times and only while the wait fits before the deadline; each try
    counts in `generation.attempts`. `problem_of` reads the provider's error code out of an error answer;
    `before_each_try` may set headers that depend on the time left."""
    for retries in range(MAX_RETRIES + 1):
        if generation is not None:
            generation.attempts += 1
        if before_each_try is not None:
            before_each_try(request)
        try:
            reply: Reply | None = await send(client, request, limit)
        except httpx.TransportError as error:
            reply, failure = None, error
        except httpx.RequestError as error:  # the answer itself is bad: asking again would get the same
            raise unreadable(request, error) from None
        if reply is not None and not retryable(reply, problem_of):
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
        return Reply(response.status_code, response.headers, body)
    finally:
        await response.aclose()


def retryable(reply: Reply, problem_of: Callable[[Reply], Problem] | None) -> bool:
    """RETRYABLE_STATUSES, except a 429 that says the money is spent: waiting will not bring it back."""
    if reply.status not in RETRYABLE_STATUSES:
        return False
    return reply.status != 429 or problem_of is None or problem_of(reply).code not in QUOTA_CODES


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
    return GenerationError(502, f"image generator sent {error}", "bad_image")


def unreadable(request: httpx.Request, error: httpx.RequestError) -> GenerationError:
    """An answer httpx could not read (a body its Content-Encoding does not decode), or redirects without end."""
    what = "too many redirects" if isinstance(error, httpx.TooManyRedirects) else "an answer that could not be read"
    log.warning("image generator %s sent %s: %s", origin(request.url), what, type(error).__name__)
    return GenerationError(502, f"image generator sent {what}", "bad_image")


def unusable(what: str) -> GenerationError:
    log.warning("image generator sent an answer without %s", what)
    return GenerationError(502, f"image generator sent no {what}", "bad_image")


def origin(url: httpx.URL | str) -> str:
    """scheme://host[:port] of a valid URL: what may be logged of it (no credentials, path or query)."""
    url = httpx.URL(url)
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


def http_url(url: object, what: str) -> httpx.URL:
    """`url` if it is an http(s) URL with a host, else 502: the provider sent no usable `what`."""
    try:
        parsed = httpx.URL(url) if isinstance(url, str) else None
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise unusable(what)
    return parsed


def same_origin(url: str, other: str) -> bool:
    """Whether two URLs have one scheme, host and port (a scheme's default port written or not)."""
    try:
        first, second = httpx.URL(url), httpx.URL(other)
    except httpx.InvalidURL:
        return False
    return (first.scheme, first.host, first.port) == (second.scheme, second.host, second.port)


class ImageReader:
    """Reads the image out of a provider's answer (base64, a `data:` URL or a link to fetch), bounded and
    checked; blocking work in worker threads."""

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

    async def decoded(self, decode: Callable[[str], bytes | None], encoded: str) -> bytes | None:
        """`decode(encoded)` in a worker thread: the text may be ~67 MB, too much even to copy on the loop."""
        try:
            return await to_thread.run_sync(decode, encoded, limiter=self.decoding)
        except (binascii.Error, ValueError):
            raise rejected(ImageRejected("an image in invalid base64")) from None

    async def checked(self, data: bytes | bytearray) -> GeneratedImage:
        try:
            media_type = await to_thread.run_sync(image_media_type, data, self.max_bytes, limiter=self.decoding)
        except ImageRejected as error:
            raise rejected(error) from None
        return GeneratedImage(data, media_type)

    async def from_base64(self, encoded: str) -> GeneratedImage:
        data = await self.decoded(base64.b64decode, encoded)
        assert data is not None
        return await self.checked(data)

    async def from_url(self, url: str, headers: Mapping[str, str] | None = None) -> GeneratedImage:
        """The image behind `url`: a `data:` URL, or an http(s) one fetched with the same byte bound."""
        if url.startswith("data:"):
            data = await self.decoded(data_url_bytes, url)
            if data is None:
                raise unusable("base64 data URL")
            return await self.checked(data)
        request = self.client.build_request("GET", http_url(url, "image URL"), headers=headers)
        reply = await exchange(self.client, request, self.max_bytes, None)
        if not reply.ok:
            log.warning("image generator's image at %s answered HTTP %s", origin(url), reply.status)
            raise GenerationError(502, f"image generator's image URL answered HTTP {reply.status}", "bad_image")
        return await self.checked(reply.body)


def data_url_bytes(url: str) -> bytes | None:
    """The bytes of a `data:<type>;base64,<data>` URL, or None if it is not base64. Blocking."""
    header, _, payload = url.partition(",")
    return base64.b64decode(payload) if header.endswith(";base64") else None
