"""JSON answers of many megabytes (an image in base64 inside) parsed without holding the GIL for long.

json.loads holds the GIL for the whole of a parse, 86 ms for a 64 MB answer, and the event loop,
every other caller and /health with it, waits that long though the parse runs in a worker thread.
Nearly all of such an answer is one string, which needs no parsing: strings longer than
LONG_STRING_BYTES and without escapes are cut out first, the small rest is parsed, and each long
string comes back as a memoryview of the answer's bytes instead of a str.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

LARGE_ANSWER_BYTES = 1024 * 1024  # smaller answers are parsed whole
LONG_STRING_BYTES = 64 * 1024
# An answer with more strings than this is not an image's: it is parsed whole rather than scanned for long.
MAX_QUOTES = 100_000
MAX_BACKSLASHES = 64  # before a quote, to tell whether it is escaped; more, and the answer is parsed whole

Text = str | memoryview


def loads(body: bytes | bytearray) -> Any:
    """json.loads(body), but with its long plain strings as memoryviews of `body`. ValueError or
    RecursionError for what is not JSON, as json.loads."""
    spans = long_strings(body) if len(body) >= LARGE_ANSWER_BYTES else []
    if not spans:
        return json.loads(body)
    token = secrets.token_hex(8)  # so that no string of the answer can pass for a placeholder
    pieces, last = [], 0
    for index, (start, end) in enumerate(spans):
        pieces += [body[last:start], f"\\u0000{token}:{index}".encode()]
        last = end
    pieces.append(body[last:])
    view = memoryview(body)
    long = {f"\x00{token}:{index}": view[start:end] for index, (start, end) in enumerate(spans)}
    return restored(json.loads(b"".join(pieces)), long)


def long_strings(body: bytes | bytearray) -> list[tuple[int, int]]:
    """Where the long strings without escapes are (from after the opening quote to the closing one)."""
    spans: list[tuple[int, int]] = []
    opening, position = -1, 0
    for _ in range(MAX_QUOTES):
        quote = body.find(b'"', position)
        if quote < 0:
            return spans
        position = quote + 1
        if opening < 0:
            opening = quote
            continue
        if body[quote - 1] == 0x5C:  # a backslash: the quote is escaped if an odd number of them precede it
            window = body[max(opening + 1, quote - MAX_BACKSLASHES) : quote]
            run = len(window) - len(window.rstrip(b"\\"))
            if run == MAX_BACKSLASHES:
                return []
            if run % 2:
                continue
        elif quote - opening > LONG_STRING_BYTES and body.find(b"\\", opening, quote) < 0:
            spans.append((opening + 1, quote))
        opening = -1
    return []


def restored(value: Any, long: dict[str, memoryview]) -> Any:
    """`value` with each placeholder string replaced by its long string; iterative, for any depth."""
    if isinstance(value, str):
        return long.get(value, value)
    stack = [value]
    while stack:
        item = stack.pop()
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in list(children):
            if isinstance(child, str) and child in long:
                item[key] = long[child]
            elif isinstance(child, dict | list):
                stack.append(child)
    return value
