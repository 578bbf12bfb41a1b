"""The image read out of a provider's answer: base64, a `data:` URL or a link to fetch, bounded and
checked, with the blocking work in worker threads."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from anyio import CapacityLimiter, to_thread

from generators import GeneratedImage, GenerationError
from image_check import ImageRejected, image_media_type
from providers.answers import Reply, http_url, origin, rejected, unusable
from providers.exchange import exchange

log = logging.getLogger(__name__)

# A JSON answer carries the image in base64 (4 bytes for every 3), plus a little of its own.
JSON_OVERHEAD_BYTES = 64 * 1024


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
