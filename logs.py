"""Logging for the service: request ids, one access line per request, text or JSON lines on stdout."""

from __future__ import annotations

import json
import logging
import re
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("gen_service.access")
request_id: ContextVar[str] = ContextVar("request_id", default="-")

# A caller's id is echoed only if it is short and printable, so it cannot forge log lines or headers.
CALLER_REQUEST_ID = re.compile(r"[!-~]{1,128}")
# Load balancer probes, logged only when they fail: an ALB probes every task every few seconds.
PROBE_PATHS = frozenset({"/", "/health", "/ready"})
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """A dictConfig for our loggers and uvicorn's alike (uvicorn applies it in every worker)."""
    formatter = {"()": f"{__name__}.JSONFormatter"} if log_format == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"line": {"()": f"{__name__}.LineFilter"}},
        "formatters": {"default": formatter},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "default",
                "filters": ["line"],
            }
        },
        "root": {"handlers": ["stdout"], "level": level},
        # httpx logs every request's URL at INFO: an image provider's links can carry credentials.
        "loggers": {**{name: {"level": level} for name in ("uvicorn", "uvicorn.error")}, "httpx": {"level": "WARNING"}},
    }


class LineFilter(logging.Filter):
    """What every log line gets: the request id, and its message with what is not printable escaped, so
    that a caller's value in it (a path is logged percent-decoded) cannot start a line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = printable(message), None
        return True


def printable(text: str) -> str:
    """`text` with each character that is not printable (line breaks, other controls) written as its escape."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode() for char in text)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, process id (which of several
    workers wrote it), and any `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "pid": record.process,
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RequestContext:
    """Gives every request an id (echoed in `X-Request-ID`) and logs one access line per request. Paths
    are logged without their query: local-store links carry their signature there, and a link is as
    good as the file."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        # Each request runs in its own task, so this value stays with it, uvicorn's error lines included.
        request_id.set(given if CALLER_REQUEST_ID.fullmatch(given) else uuid4().hex)
        started = time.perf_counter()
        response: dict[str, int] = {"status": 0, "bytes": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.get().encode())]
            await send(message)
            # Noted once sent: a start the server refused (a header it will not write) answered nobody.
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            elif message["type"] == "http.response.body":
                response["bytes"] += len(message.get("body", b""))

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if not (response["status"] == 200 and scope["path"] in PROBE_PATHS):
                log_access(scope, headers, response, time.perf_counter() - started)


def log_access(scope: Scope, headers: Headers, response: dict[str, int], seconds: float) -> None:
    fields = {
        "method": printable(scope["method"]),
        "path": printable(scope["path"]),
        "status": response["status"],
        "duration_ms": round(seconds * 1000, 2),
        "bytes": response["bytes"],
    }
    if trace_id := headers.get("x-amzn-trace-id"):
        fields["trace_id"] = printable(trace_id)
    access_log.info(
        "%s %s %s %sms %sB",
        *(fields[name] for name in ("method", "path", "status", "duration_ms", "bytes")),
        extra={"fields": fields},
    )
