"""What came back from a provider, read as hostile input: an answer as read, a provider's error turned
into what the caller hears, and what of a provider's strings may be shown at all.

Every string a provider sends (a message, code, title, id, a body that is not JSON) is redacted of
the configured secrets before anything else is done with it, then cut: a provider may echo the key
it was sent, and a cut made first could leave half a key behind. Codes and titles reach the caller
only when they are short identifiers; the rest goes to the log only, bounded.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import httpx

from generators import GenerationError
from image_check import ImageRejected

log = logging.getLogger(__name__)

Secrets = Sequence[str]
BUSY_STATUSES = frozenset({409, 429, 503})
# A 429 that says the money is spent is not a busy provider: retrying later will not help.
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
# What a provider's code, title or id must look like to be shown or logged as one.
IDENTIFIER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SHOWN_CHARS = 200
ERROR_TEXT_BYTES = 64 * 1024  # of a long string, what is read as text
REDACTED = "[redacted]"
# Their bodies may carry what was sent to authenticate: only the status and request id are logged.
AUTHENTICATION_STATUSES = frozenset({401, 403})


class Reply(NamedTuple):
    status: int
    headers: httpx.Headers
    body: bytearray  # as read: a copy of up to MAX_IMAGE_BYTES would hold the event loop

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body's JSON, or None if it is none (a RecursionError: nested thousands deep)."""
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):
            return None


class Problem(NamedTuple):
    """A provider's error answer, as read from its body."""

    code: str  # for the caller's detail, if it is an identifier: the provider's error code or title
    message: str  # for the log only
    refusal: str | None = None  # not None: the prompt was refused, for this reason ("" if none given)


def body_problem(reply: Reply) -> Problem:
    """An error answer whose body is not of the provider's documented shape: its status, and the body's text
    (whole, at most ERROR_BODY_BYTES: `shown` redacts it before it cuts it)."""
    return Problem(f"HTTP {reply.status}", reply.body.decode(errors="replace"))


def redacted(text: str, secrets: Secrets) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def text(value: object) -> str:
    """A JSON string as text ("" for anything else); of a long one (big_json's memoryview), its beginning."""
    if isinstance(value, memoryview):
        return bytes(value[:ERROR_TEXT_BYTES]).decode(errors="replace")
    return value if isinstance(value, str) else ""


def shown(value: object, secrets: Secrets = ()) -> str:
    """A provider's string as it may be logged: redacted, then cut to SHOWN_CHARS with a mark that it was."""
    if isinstance(value, memoryview):  # a long JSON string (big_json), never copied whole
        value = bytes(value[: SHOWN_CHARS * 4]).decode(errors="replace") + " ..."
    text = redacted(value if isinstance(value, str) else str(value), secrets)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}[... {len(text) - SHOWN_CHARS} more]"


def identifier(value: object, secrets: Secrets = ()) -> str | None:
    """`value` if it is a short identifier (letters, digits, `_.-`) and no secret, else None."""
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value) or redacted(value, secrets) != value:
        return None
    return value


def provider_id(value: object, what: str, secrets: Secrets = ()) -> str | None:
    """A provider's request or job id, for the log line: None if absent, 502 if it is not an identifier."""
    if value is None:
        return None
    if (checked := identifier(value, secrets)) is None:
        raise bad_answer(f"a {what} that is not a short identifier")
    return checked


def request_id(reply: Reply, secrets: Secrets = ()) -> str | None:
    return provider_id(reply.headers.get("x-request-id"), "request id", secrets)


def error_for(reply: Reply, problem: Problem, secrets: Secrets = ()) -> GenerationError:
    """What the caller gets for a provider's error answer (after any retries)."""
    if problem.refusal is not None:
        return refused(problem.refusal, secrets)
    if reply.status in BUSY_STATUSES and problem.code not in QUOTA_CODES:
        asked = retry_after_seconds(reply.headers)
        retry_after = math.ceil(asked) if asked is not None else None
        return GenerationError(503, "image generator is busy", "busy", retry_after=retry_after)
    if reply.status >= 500 or reply.status == 408:
        return GenerationError(503, f"image generator is unavailable (HTTP {reply.status})", "unavailable")
    code = identifier(problem.code, secrets) or f"HTTP {reply.status}"
    said = "" if reply.status in AUTHENTICATION_STATUSES else f": {shown(problem.message, secrets)}"
    log.warning(
        "image generator refused the request: HTTP %s %s%s (x-request-id %s)",
        reply.status,
        code,
        said,
        request_id(reply, secrets) or "-",
    )
    return GenerationError(502, f"image generator refused the request ({code})", "misconfigured")


def refused(reason: object, secrets: Secrets = ()) -> GenerationError:
    reason = " ".join(redacted(reason if isinstance(reason, str) else "", secrets).split())[:SHOWN_CHARS]
    detail = "the image generator refused the prompt" + (f": {reason}" if reason else "")
    return GenerationError(422, detail, "refused")


def bad_answer(what: str) -> GenerationError:
    """502: the provider sent `what` ("an image over ... bytes"), which the service will not use."""
    log.warning("image generator sent %s", what)
    return GenerationError(502, f"image generator sent {what}", "bad_image")


def rejected(error: ImageRejected) -> GenerationError:
    return bad_answer(str(error))


def unusable(what: str) -> GenerationError:
    return bad_answer(f"no {what}")


def unreadable(url: httpx.URL, cause: str) -> GenerationError:
    """An answer that could not be read: a body its Content-Encoding does not decode, redirects without end."""
    log.warning("image generator %s sent an answer that could not be read: %s", origin(url), cause)
    return GenerationError(502, "image generator sent an answer that could not be read", "bad_image")


def origin(url: httpx.URL | str) -> str:
    """scheme://host[:port] of a valid URL: what may be logged of it (no credentials, path or query), bounded."""
    url = httpx.URL(url)
    return shown(f"{url.scheme}://{url.netloc.decode('ascii').rpartition('@')[2]}")


def http_url(url: object, what: str) -> httpx.URL:
    """`url` if it is an http(s) URL with a host, else 502: the provider sent no usable `what`."""
    try:
        parsed = httpx.URL(url) if isinstance(url, str) else None
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise unusable(what)
    return parsed


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
