"""HTTP with image providers: the process's one client, and one provider's exchanges through it, retried
within the generation's deadline, redirects followed by hand (every hop checked by links.py), and read
with a byte bound."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy

import anyio
import httpx

from generators import Generation, GenerationError
from image_check import ImageRejected
from providers.answers import (
    QUOTA_CODES,
    Problem,
    Reply,
    Secrets,
    bad_answer,
    origin,
    rejected,
    retry_after_seconds,
    unreadable,
)
from providers.links import Links
from providers.reading import ACCEPTED_ENCODINGS, Undecodable, read_body

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5
# As the official OpenAI client: connection failures, 408, 409 (a busy Cog container), 429 and 5xx are
# retried twice, after 0.5 s then 1 s (less up to a quarter, at random), or after the server's Retry-After.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRIES = 2
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0
ERROR_BODY_BYTES = 64 * 1024
MAX_REDIRECTS = 5


def make_http_client() -> httpx.AsyncClient:
    """The one HTTP client of the process for providers: pooled connections, a bounded connect, and no
    read timeout of its own, since every generation has one deadline (GENERATE_TIMEOUT_SECONDS). The
    number of connections is bounded by GENERATE_CONCURRENCY: each generation uses one at a time."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_SECONDS),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        headers={"Accept-Encoding": ACCEPTED_ENCODINGS},
        # No cookies kept: what one provider's answer sets must not ride along to another's links.
        cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
    )


class ProviderHTTP:
    """One provider's HTTP: the process's client, the rule for the links the provider gives, and the
    secrets to keep out of anything it says that is shown or logged."""

    def __init__(self, client: httpx.AsyncClient, links: Links, secrets: Secrets = ()) -> None:
        self.client = client
        self.links = links
        self.secrets = tuple(secrets)

    def request(self, method: str, url: httpx.URL | str, **options: object) -> httpx.Request:
        return self.client.build_request(method, url, **options)  # type: ignore[arg-type]

    async def exchange(
        self,
        request: httpx.Request,
        limit: int,
        generation: Generation | None,
        *,
        problem_of: Callable[[Reply], Problem] | None = None,
        before_each_try: Callable[[httpx.Request], None] | None = None,
    ) -> Reply:
        """The answer to `request`, at most `limit` bytes of it. Connection failures and retryable answers
        are tried again, at most MAX_RETRIES times and only while the wait fits before the deadline; each
        try counts in `generation.attempts`. `problem_of` reads the provider's error code out of an error
        answer; `before_each_try` may set headers that depend on the time left."""
        for retries in range(MAX_RETRIES + 1):
            if generation is not None:
                generation.attempts += 1
            if before_each_try is not None:
                before_each_try(request)
            try:
                reply: Reply | None = await self.send(request, limit)
            except httpx.TransportError as error:
                reply, failure = None, error
            except httpx.RequestError as error:  # the answer itself is bad: asking again would get the same
                raise unreadable(request.url, type(error).__name__) from None
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

    async def send(self, request: httpx.Request, limit: int) -> Reply:
        """One try. A GET's redirects are followed, at most MAX_REDIRECTS, each hop checked and its body left
        unread. An error's body is cut at ERROR_BODY_BYTES; a success's over `limit` is refused (502)."""
        for _ in range(MAX_REDIRECTS + 1):
            response = await self.client.send(await self.links.checked(request), stream=True)
            try:
                if request.method == "GET" and response.is_redirect:
                    request = redirected(request, response)
                    continue
                body, whole = await read_body(response, limit if response.is_success else ERROR_BODY_BYTES)
            except Undecodable as error:
                raise unreadable(request.url, str(error)) from None
            finally:
                await response.aclose()
            if response.is_success and not whole:
                raise rejected(ImageRejected(f"an answer over {limit} bytes"))
            return Reply(response.status_code, response.headers, body)
        raise bad_answer("too many redirects")


def redirected(request: httpx.Request, response: httpx.Response) -> httpx.Request:
    """The GET a redirect asks for: its Authorization dropped if it goes to another origin (scheme, host, port)."""
    try:
        url = request.url.join(response.headers["location"])
    except httpx.InvalidURL:
        raise bad_answer("a redirect to an invalid URL") from None
    headers = httpx.Headers(request.headers)
    headers.pop("host", None)  # the new URL's is set
    if (url.scheme, url.host, url.port) != (request.url.scheme, request.url.host, request.url.port):
        headers.pop("authorization", None)
    return httpx.Request("GET", url, headers=headers, extensions=request.extensions)


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
