"""A provider's answer read within a byte bound that holds for what its body decodes to.

httpx inflates each piece the network gives it whole, and a gzip body of 1 MB can decode to 1 GiB:
here the raw body is read and its Content-Encoding (gzip or deflate, the only ones asked for) is
decoded a piece of at most PIECE_BYTES at a time, so that reading stops within a piece of the bound.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import httpx
from anyio.lowlevel import checkpoint

# What the providers' client asks for; an answer in any other encoding is not read.
ACCEPTED_ENCODINGS = "gzip, deflate"
PIECE_BYTES = 1024 * 1024


class Undecodable(Exception):
    """A body in an encoding that was not asked for, or that does not decode."""


class Decoder:
    """Content-Encoding `identity`, `gzip` or `deflate` (zlib-wrapped or raw, as servers send both)."""

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
            raise Undecodable(f"Content-Encoding {encoding[:40]!r}")
        self.identity = encoding in ("", "identity")
        self.deflate = encoding == "deflate"
        self.zlib = zlib.decompressobj(zlib.MAX_WBITS | (0 if self.deflate else 16))
        self.started = False

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """What `data` decodes to, at most PIECE_BYTES at a time."""
        if self.identity:
            yield data
            return
        while True:
            try:
                piece = self.zlib.decompress(data, PIECE_BYTES)
            except zlib.error as error:
                if self.deflate and not self.started:  # no zlib header: raw deflate
                    self.zlib, self.deflate = zlib.decompressobj(-zlib.MAX_WBITS), False
                    continue
                raise Undecodable(f"its body does not decode ({error})") from None
            self.started = True
            if piece:
                yield piece
            data = self.zlib.unconsumed_tail
            if not data and len(piece) < PIECE_BYTES:
                return

    def check_ended(self) -> None:
        if self.started and not self.zlib.eof:
            raise Undecodable("its body ends before its encoding does")


async def read_body(response: httpx.Response, limit: int) -> tuple[bytearray, bool]:
    """At most `limit` bytes of the decoded body, and whether that is all of it."""
    decoder = Decoder(response.headers.get("content-encoding", ""))
    body = bytearray()
    async for data in response.aiter_raw():
        for piece in decoder.pieces(data):
            body += piece
            if len(body) > limit:
                del body[limit:]
                return body, False
            await checkpoint()  # a bomb's pieces come from one read: let others run between
    decoder.check_ended()
    return body, True
