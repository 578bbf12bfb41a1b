"""The upload's multipart form, parsed by Starlette's own parser while its file part streams to the store.

From the file part's headers on, its bytes go to an UploadStream (upload_stream.py) instead of a
spool. The parser's caller ends the stream: `stored()` once the whole form is in, which commits the
file; `undone_on_error()` on any failure (a bad form, a file too large, a client gone or too slow, a
store that failed), which aborts it so that nothing is left in the store.
"""

from __future__ import annotations

import io
import re
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote

from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser, MultipartPart
from starlette.requests import Request

from body_limits import file_too_large
from storage import Stored
from upload_stream import UploadStream

# type/subtype, then parameters with spaces and tabs as the only blanks: the multipart parser keeps a bare
# LF, VT or FF in a header value, and no download could carry such a type back.
CONTENT_TYPE = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+([ \t]*;[\t -~]*)?", re.ASCII)
MAX_FILENAME_CHARS = 255
# Controls, surrogates, and format characters: those that reorder how a name displays ("invoice\u202efdp.exe"
# shows as "invoiceexe.pdf"), zero-width ones (U+200B, U+FEFF), the soft hyphen; and line and paragraph separators.
DROPPED_CATEGORIES = frozenset({"Cc", "Cs", "Cf", "Zl", "Zp"})
# But the zero-width joiner and non-joiner, which shape words (Persian "نامه\u200cها") and emoji sequences.
KEPT_FORMAT_CHARACTERS = frozenset("\u200c\u200d")
# What the text fields of one form may hold in all, beside its file: a stalled upload holds them in memory.
MAX_FIELD_BYTES = 64 * 1024


def clean_filename(name: str | None) -> str | None:
    """The name a download will carry: no directories, no control, format or separator characters, bounded."""
    if name is None:
        return None
    # Browsers, curl, httpx and Node's FormData send '"', CR and LF in a filename as %22, %0D, %0A.
    name = name.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")
    base = re.split(r"[/\\]", name)[-1]
    kept = "".join(char for char in base if not dropped(char))
    kept = kept.strip()[:MAX_FILENAME_CHARS].rstrip()
    return None if kept in ("", ".", "..") else kept


def dropped(char: str) -> bool:
    """Whether a character of a filename is left out of the name a download carries."""
    return unicodedata.category(char) in DROPPED_CATEGORIES and char not in KEPT_FORMAT_CHARACTERS


def content_disposition(filename: str | None) -> str:
    """RFC 6266 attachment header: an ASCII fallback name, then the exact name as UTF-8."""
    if filename is None:
        return "attachment"
    fallback = "".join(char if " " <= char <= "~" and char not in '"\\%' else "_" for char in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


class StreamedFile(UploadFile):
    """The upload's file part as Starlette's parser sees it: its bytes go to the store, not a spool."""

    def __init__(self, stream: UploadStream, max_bytes: int, *, filename: str | None, headers: Headers) -> None:
        super().__init__(io.BytesIO(), size=0, filename=filename, headers=headers)
        self.stream = stream
        self.max_bytes = max_bytes

    async def write(self, data: bytes) -> None:
        self.size = (self.size or 0) + len(data)
        if self.size > self.max_bytes:
            raise HTTPException(413, file_too_large(self.max_bytes))
        await self.stream.add(data)

    async def seek(self, offset: int) -> None:
        """Starlette rewinds a spool when its part ends; a stream has nothing to rewind."""

    async def close(self) -> None:
        """Ended by StoringMultiPartParser, which knows whether the form was whole."""


class StoringMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, storing the file part while it arrives."""

    def __init__(self, request: Request, key: str) -> None:
        super().__init__(request.headers, request.stream(), max_files=1, max_fields=16, max_part_size=MAX_FIELD_BYTES)
        self.state = request.app.state
        self.key = key
        self.storing: UploadStream | None = None  # not `stream`: the parser's name for the request body
        self.content_type = "application/octet-stream"
        self.filename: str | None = None  # cleaned
        self.field_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if current_part(self).file is None:
            self.field_bytes += end - start
            if self.field_bytes > MAX_FIELD_BYTES:
                raise MultiPartException(f"text fields are larger than {MAX_FIELD_BYTES} bytes in all")
        super().on_part_data(data, start, end)

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = current_part(self)
        if part.file is None:  # a text field; max_files=1 stops a second file part
            return
        if part.field_name != "file":
            raise HTTPException(422, "file is required")
        # Blanks around a header value are not part of it (RFC 9110), and a download would not carry them.
        self.content_type = (part.file.content_type or "").strip(" \t") or self.content_type
        if not CONTENT_TYPE.fullmatch(self.content_type):
            raise HTTPException(422, "file has an invalid Content-Type")
        self.filename = clean_filename(part.file.filename)
        storage = self.state.storage
        upload = storage.begin(
            self.key, content_type=self.content_type, content_disposition=content_disposition(self.filename)
        )
        self.storing = UploadStream(upload, self.state.upload_slots)
        # Starlette made a spool for the part; it is never written to, so it holds nothing.
        part.file = StreamedFile(
            self.storing, self.state.settings.max_upload_bytes, filename=part.file.filename, headers=part.file.headers
        )

    async def stored(self) -> Stored:
        """Ends the file once the whole form is in; the store then commits it."""
        assert self.storing is not None
        return await self.storing.commit()

    @asynccontextmanager
    async def undone_on_error(self) -> AsyncIterator[None]:
        """On any failure, the store abandons the file (S3 aborts the multipart upload) before we answer."""
        try:
            yield
        except BaseException:
            if self.storing is not None:
                await self.storing.abort()
            raise


def current_part(parser: MultiPartParser) -> MultipartPart:
    """The part whose headers the parser has just read. Starlette keeps it in a private attribute and
    offers no public way to reach it from its callbacks; tests/test_upload_parser.py fails loudly if
    an upgrade renames it."""
    return parser._current_part
