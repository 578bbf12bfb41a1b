"""HTTP with image providers: the process's one client, and one exchange, retried within the generation's
deadline and read with a byte bound."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import anyio
import httpx

from generators import Generation, GenerationError
from image_check import ImageRejected
from providers.answers import QUOTA_CODES, Problem, Reply, origin, rejected, retry_after_seconds, unreadable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5
# As the official OpenAI client: connection failures, 408, 409 (a busy Cog container), 429 and 5xx are
# retried twice, after 0.5 s then 1 s (less up to a quarter, at random), or after the server's Retry-After.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRIES = 2
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0
ERROR_BODY_BYTES = 64 * 1024


def make_http_client() -> httpx.AsyncClient:
    """The one HTTP client of the process for providers: pooled connections, a bounded connect, and no
    read timeout of its own, since every generation has one deadline (GENERATE_TIMEOUT_SECONDS). The
    number of connections is bounded by GENERATE_CONCURRENCY: each generation uses one at a time."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_SECONDS),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )


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
