"""What came back from a provider: an answer as read, a provider's error turned into what the caller
hears, and what may be shown of a provider's URL."""

from __future__ import annotations

import email.utils
import json
import logging
import math
import re
from datetime import UTC, datetime
from typing import Any, NamedTuple

import httpx

from generators import GenerationError
from image_check import ImageRejected

log = logging.getLogger(__name__)

BUSY_STATUSES = frozenset({409, 429, 503})
# A 429 that says the money is spent is not a busy provider: retrying later will not help.
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
SHORT_CODE = re.compile(r"[\w .:/-]{1,80}")


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
