"""The upload's multipart form, parsed by Starlette's parser while its file part streams to the store.

Who ends the pipe between the two, and when:
- the parser `close()`s it once the whole form is in (`stored()`): the store reads to the end and commits;
- the request side `abort()`s it when the request fails (bad form, file too large, client gone):
  the store's next read raises PipeBroken and it drops what it had (S3 aborts the multipart upload);
- the storing thread `abort()`s it when the store fails: the parser's next write raises PipeBroken
  and the request answers with the store's own error.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import quote

from anyio import to_thread
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

from body_limits import declared_length, file_too_large
from pipe import Pipe, PipeBroken
from storage import Stored

PIPE_BYTES = 1024 * 1024  # how far receiving may run ahead of storing
CONTENT_TYPE = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+(\s*;[ -~]*)?", re.ASCII)
MAX_FILENAME_CHARS = 255
# Marks that reorder how a name displays ("invoice\u202efdp.exe" shows as "invoiceexe.pdf").
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def clean_filename(name: str | None) -> str | None:
    """The name a download will carry: no directories, no control or bidi characters, bounded."""
    if name is None:
        return None
    # Browsers, curl, httpx and Node's FormData send '"', CR and LF in a filename as %22, %0D, %0A.
    name = name.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")
    base = re.split(r"[/\\]", name)[-1]
    kept = "".join(
        char for char in base if unicodedata.category(char) not in ("Cc", "Cs") and char not in BIDI_CONTROLS
    )
    kept = kept.strip()[:MAX_FILENAME_CHARS].rstrip()
    return None if kept in ("", ".", "..") else kept


def content_disposition(filename: str | None) -> str:
    """RFC 6266 attachment header: an ASCII fallback name, then the exact name as UTF-8."""
    if filename is None:
        return "attachment"
    fallback = "".join(char if " " <= char <= "~" and char not in '"\\%' else "_" for char in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


class PipedFile(UploadFile):
    """The upload's file part as Starlette's parser sees it: its bytes go into a Pipe, not a spool."""

    def __init__(self, pipe: Pipe, max_bytes: int, *, filename: str | None, headers: Headers) -> None:
        super().__init__(pipe, size=0, filename=filename, headers=headers)  # type: ignore[arg-type]
        self.pipe = pipe
        self.max_bytes = max_bytes

    async def write(self, data: bytes) -> None:
        self.size = (self.size or 0) + len(data)
        if self.size > self.max_bytes:
            raise HTTPException(413, file_too_large(self.max_bytes))
        await self.pipe.write(data)

    async def seek(self, offset: int) -> None:
        """Starlette rewinds a spool when its part ends; a pipe has nothing to rewind."""

    async def close(self) -> None:
        """Ended by StoringMultiPartParser, which knows whether the form was whole."""


class StoringMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, storing the file part while it arrives: from the part's headers on,
    `storage.put` runs in a worker thread and reads the part through a Pipe. Storing overlaps receiving,
    nothing is spooled to disk, and the file is hashed in the thread as it goes to the store."""

    def __init__(self, request: Request, key: str) -> None:
        super().__init__(request.headers, request.stream(), max_files=1, max_fields=16, max_part_size=64 * 1024)
        self.state = request.app.state
        self.key = key
        self.pipe: Pipe | None = None
        self.storing: asyncio.Task[Stored] | None = None
        self.content_type = "application/octet-stream"
        self.filename: str | None = None  # cleaned
        self.body_bytes = declared_length(request.headers)

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        if part.file is None:  # a text field; max_files=1 stops a second file part
            return
        if part.field_name != "file":
            raise HTTPException(422, "file is required")
        self.content_type = part.file.content_type or self.content_type
        if not CONTENT_TYPE.fullmatch(self.content_type):
            raise HTTPException(422, "file has an invalid Content-Type")
        self.filename = clean_filename(part.file.filename)
        self.pipe = Pipe(PIPE_BYTES, at_most=self.body_bytes)
        part.file = PipedFile(
            self.pipe, self.state.settings.max_upload_bytes, filename=part.file.filename, headers=part.file.headers
        )
        put = partial(self.put, self.pipe, self.content_type, content_disposition(self.filename))
        self.storing = asyncio.get_running_loop().create_task(to_thread.run_sync(put, limiter=self.state.upload_slots))

    def put(self, pipe: Pipe, content_type: str, disposition: str) -> Stored:
        try:
            return self.state.storage.put(self.key, pipe, content_type=content_type, content_disposition=disposition)
        except BaseException:
            pipe.abort()  # so that the parser stops feeding a store that has given up
            raise

    async def stored(self) -> Stored:
        """Ends the file once the whole form is in; the store then finishes and commits it."""
        assert self.pipe is not None and self.storing is not None
        self.pipe.close()
        # Waited for, not awaited: cancelling this request must not cancel the storing task, whose
        # thread would go on unwatched (and could still commit the file).
        await asyncio.wait([self.storing])
        return self.storing.result()

    @asynccontextmanager
    async def undone_on_error(self) -> AsyncIterator[None]:
        """On any failure, the store abandons the file (S3 aborts the multipart upload) before we answer."""
        try:
            yield
        except BaseException as error:
            if self.pipe is None or self.storing is None:
                raise
            self.pipe.abort()
            await asyncio.wait([self.storing])
            # Taken even when unused, or asyncio would log it as an exception nobody retrieved.
            failure = None if self.storing.cancelled() else self.storing.exception()
            if isinstance(error, PipeBroken) and failure is not None:  # the store gave up first: it says why
                raise failure from None
            raise
