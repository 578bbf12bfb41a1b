"""The image read out of a provider's answer: base64, a `data:` URL or a link to fetch (links.py decides
which), bounded and checked, with the blocking work in worker threads.

Those threads hold the GIL while they work, and the event loop waits for it meanwhile: an answer of
tens of megabytes is parsed by big_json.py and its base64 decoded a slice at a time, so that the
loop gets its turn every few milliseconds instead of waiting ~90 ms for one call to end.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from anyio import CapacityLimiter, to_thread

from generators import GeneratedImage, GenerationError
from image_check import ImageRejected, image_media_type
from providers import big_json
from providers.answers import Reply, http_url, origin, rejected, unusable
from providers.big_json import Text
from providers.exchange import ProviderHTTP

log = logging.getLogger(__name__)

# A JSON answer carries the image in base64 (4 bytes for every 3), plus a little of its own.
JSON_OVERHEAD_BYTES = 64 * 1024
BASE64_SLICE_CHARS = 1024 * 1024  # a multiple of 4: ~1 ms of decoding
DATA_URL_HEADER_CHARS = 256


class ImageReader:
    """Reads the image out of a provider's answer, bounded and checked."""

    def __init__(self, http: ProviderHTTP, max_bytes: int) -> None:
        self.http = http
        self.max_bytes = max_bytes
        self.json_limit = max_bytes * 4 // 3 + JSON_OVERHEAD_BYTES
        # Decoding is CPU work and takes memory for every pixel: one at a time per core.
        self.decoding = CapacityLimiter(os.cpu_count() or 1)

    async def parsed(self, reply: Reply, what: str = "JSON object") -> dict[str, Any]:
        """The JSON object of a (possibly large) successful answer, parsed off the event loop; 502 for what
        is not one (not JSON, nested thousands deep, another type at the top)."""
        try:
            answer = await to_thread.run_sync(big_json.loads, reply.body, limiter=self.decoding)
        except (ValueError, RecursionError):
            raise unusable("JSON") from None
        if not isinstance(answer, dict):
            raise unusable(what)
        return answer

    async def decoded(self, decode: Callable[[Text], bytes | bytearray | None], encoded: Text) -> bytes | bytearray:
        try:
            data = await to_thread.run_sync(decode, encoded, limiter=self.decoding)
        except (binascii.Error, ValueError):
            raise rejected(ImageRejected("an image in invalid base64")) from None
        if data is None:
            raise unusable("base64 data URL")
        return data

    async def checked(self, data: bytes | bytearray) -> GeneratedImage:
        try:
            media_type = await to_thread.run_sync(image_media_type, data, self.max_bytes, limiter=self.decoding)
        except ImageRejected as error:
            raise rejected(error) from None
        return GeneratedImage(data, media_type)

    async def from_base64(self, encoded: Text) -> GeneratedImage:
        return await self.checked(await self.decoded(base64_decoded, encoded))

    async def from_url(self, url: Text, headers: Mapping[str, str] | None = None) -> GeneratedImage:
        """The image behind `url`: a `data:` URL, or an http(s) one fetched with the same byte bound."""
        if is_data_url(url):
            return await self.checked(await self.decoded(data_url_bytes, url))
        request = self.http.request("GET", http_url(url, "image URL"), headers=headers)
        reply = await self.http.exchange(request, self.max_bytes, None)
        if not reply.ok:
            log.warning("image generator's image at %s answered HTTP %s", origin(request.url), reply.status)
            raise GenerationError(502, f"image generator's image URL answered HTTP {reply.status}", "bad_image")
        return await self.checked(reply.body)


def is_text(value: object) -> bool:
    """Whether a JSON value is a string: a str, or a long one big_json left as a memoryview."""
    return isinstance(value, str | memoryview)


def is_data_url(url: Text) -> bool:
    return (url[:5] if isinstance(url, str) else bytes(url[:5]).decode("latin-1")) == "data:"


def base64_decoded(encoded: Text, start: int = 0) -> bytearray:
    """The bytes of `encoded[start:]`: strict base64 a slice at a time (the GIL is let go between slices),
    and if that fails, what base64.b64decode makes of it (which skips what is not base64). Blocking."""
    data = bytearray()
    try:
        for at in range(start, len(encoded), BASE64_SLICE_CHARS):
            data += binascii.a2b_base64(encoded[at : at + BASE64_SLICE_CHARS], strict_mode=True)
    except (binascii.Error, ValueError):
        return bytearray(base64.b64decode(encoded[start:]))
    return data


def data_url_bytes(url: Text) -> bytearray | None:
    """The bytes of a `data:<type>;base64,<data>` URL, or None if it is not base64. Blocking."""
    head = url[:DATA_URL_HEADER_CHARS]
    header = head if isinstance(head, str) else bytes(head).decode("latin-1")
    comma = header.find(",")
    if comma < 0 or not header[:comma].endswith(";base64"):
        return None
    return base64_decoded(url, comma + 1)
