"""Where stored files live: S3, or a directory on local disk with signed links served by us.

Both stores have the same two verbs: `put` a file under a key, reading it once from start to end
(it may be a pipe still being filled), and make a time-limited `link` to it. They raise
`StorageError` for failures the caller should see, and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol
from urllib.parse import urlencode

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from s3transfer.futures import TransferFuture
from s3transfer.subscribers import BaseSubscriber

log = logging.getLogger(__name__)

# A file under 5 MiB goes up in one PUT. A larger one goes up in 5 MiB parts (S3's smallest), one
# at a time while the next arrives, so that an upload holds 11 to 16 MiB of memory; boto3's
# defaults (10 threads, 10 parts of 8 MiB read ahead) hold ~100 MiB for every upload.
MULTIPART_THRESHOLD = 5 * 1024 * 1024
# A file still arriving has no known size, so its parts cannot grow with it: S3 takes 10,000.
MAX_OBJECT_BYTES = 10_000 * MULTIPART_THRESHOLD
TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD, max_concurrency=1
)
TRANSFER_CONFIG.max_in_memory_upload_chunks = 1  # s3transfer's setting, not a parameter of boto3's
# The only keys the service ever makes: the local store refuses to serve anything else.
KEY_PREFIXES = ("uploads", "generated")
KEY_PATTERN = re.compile(r"(uploads|generated)/[0-9a-f]{32}(\.png)?")
METADATA_SUFFIX = ".json"
EXPIRES = re.compile(r"[0-9]{1,12}")


class StorageError(Exception):
    """A failure of the store, with the HTTP status and the short detail a caller should see."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


class Link(NamedTuple):
    url: str
    expires_at: datetime


class Stored(NamedTuple):
    size: int
    sha256: str


class Storage(Protocol):
    def put(self, key: str, fileobj: Readable, *, content_type: str, content_disposition: str) -> Stored: ...

    def link(self, key: str) -> Link: ...

    def check(self) -> None:
        """Raises StorageError unless the store can take files now."""

    def describe(self) -> str: ...


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes (all that is left if -1); fewer only at the end."""


class HashingReader:
    """Counts and hashes what is read through it, so a file is hashed in the pass that stores it."""

    def __init__(self, fileobj: Readable) -> None:
        self.fileobj = fileobj
        self.size = 0
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        self.size += len(data)
        self.sha256.update(data)
        return data

    def stored(self) -> Stored:
        return Stored(self.size, self.sha256.hexdigest())


class MultipartBody(BaseSubscriber):
    """What a multipart upload reads: `head`, then the rest of `fileobj`. It stops once the transfer has
    failed, where s3transfer alone would go on reading to the end (a slow client would hear of the
    failure only after sending everything)."""

    def __init__(self, head: bytes, fileobj: Readable) -> None:
        self.head = head
        self.fileobj = fileobj
        self.transfer: TransferFuture | None = None

    def on_queued(self, future: TransferFuture, **kwargs: Any) -> None:
        """s3transfer's hook, called before it reads anything."""
        self.transfer = future

    def read(self, size: int = -1) -> bytes:
        if self.transfer is not None and self.transfer.done():
            # Never seen by the caller: the transfer keeps its first failure, which result() raises.
            raise RuntimeError("the upload has failed")
        if not self.head:
            return self.fileobj.read(size)
        if size < 0 or size > len(self.head):
            data, self.head = self.head, b""
            return data + self.fileobj.read(-1 if size < 0 else size - len(data))
        data, self.head = self.head[:size], self.head[size:]
        return data


# ---------------------------------------------------------------- S3


def make_s3_client(
    *,
    region: str,
    endpoint_url: str | None,
    connect_timeout: float,
    read_timeout: float,
    checksums: str = "when_supported",
) -> Any:
    """The one S3 client of the process: thread-safe, SigV4 links, bounded time on failure.

    `checksums="when_required"` stops boto3 sending the checksums some S3-compatible stores reject.
    """
    config = Config(
        region_name=region,
        signature_version="s3v4",
        # Virtual-host links name the region (bucket.s3.<region>.amazonaws.com) and so work for
        # buckets outside us-east-1; S3-compatible endpoints usually want path style.
        s3={"addressing_style": "path" if endpoint_url else "virtual"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "total_max_attempts": 3},
        request_checksum_calculation=checksums,
        response_checksum_validation=checksums,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


@dataclass
class S3Storage:
    client: Any
    bucket: str
    presign_ttl_seconds: int
    warned_about_short_links: bool = False

    def put(self, key: str, fileobj: Readable, *, content_type: str, content_disposition: str) -> Stored:
        # With checksums on (the default), botocore adds a CRC32 that S3 checks as the bytes arrive.
        reader = HashingReader(fileobj)
        headers = {"ContentType": content_type, "ContentDisposition": content_disposition}
        with s3_errors(f"put {key}"):
            head = reader.read(MULTIPART_THRESHOLD)
            if len(head) < MULTIPART_THRESHOLD:
                stored = reader.stored()
                metadata = {"sha256": stored.sha256}
                self.client.put_object(Bucket=self.bucket, Key=key, Body=head, Metadata=metadata, **headers)
                return stored
            # Parts go up while the rest is still arriving. S3 takes metadata only before the first
            # byte, when the hash is not known yet; a tag can be set after the last one.
            body, head = MultipartBody(head, reader), b""  # so that the first part is freed once it is sent
            # boto3's upload_fileobj, unrolled to hand the transfer to the body.
            with create_transfer_manager(self.client, TRANSFER_CONFIG) as transfers:
                transfers.upload(body, self.bucket, key, extra_args=headers, subscribers=[body]).result()
            stored = reader.stored()
            tags = {"TagSet": [{"Key": "sha256", "Value": stored.sha256}]}
            self.client.put_object_tagging(Bucket=self.bucket, Key=key, Tagging=tags)
        return stored

    def link(self, key: str) -> Link:
        now = datetime.now(UTC)
        expires_at = now + timedelta(seconds=self.presign_ttl_seconds)
        # Temporary credentials (a Fargate task role's) sign links that die with them, whatever the TTL.
        credentials_expire = getattr(self.client._get_credentials(), "_expiry_time", None)
        if credentials_expire is not None and credentials_expire < expires_at:
            expires_at = credentials_expire
            if not self.warned_about_short_links:
                self.warned_about_short_links = True
                log.warning("links live less than S3_PRESIGN_TTL_SECONDS: the signing credentials expire sooner")
        expires_in = max(1, int((expires_at - now).total_seconds()))
        with s3_errors(f"presign {key}"):
            url = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
            )
        return Link(url, expires_at)

    def check(self) -> None:
        with s3_errors("head bucket"):
            self.client.head_bucket(Bucket=self.bucket)

    def describe(self) -> str:
        return f"S3 bucket {self.bucket!r} via {self.client.meta.endpoint_url}"


@contextmanager
def s3_errors(action: str) -> Iterator[None]:
    """Turns botocore's failures into StorageError: refused -> 502, unreachable -> 503, slow -> 504."""
    try:
        yield
    except (BotoCoreError, ClientError) as error:
        log.warning("S3 %s failed: %r", action, error)
        raise storage_error(error) from error


def storage_error(error: BotoCoreError | ClientError) -> StorageError:
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "unknown")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status >= 500:
            return StorageError(503, f"storage is unavailable ({code})")
        return StorageError(502, f"storage refused the request ({code})")
    if isinstance(error, (ConnectTimeoutError, ReadTimeoutError)):
        return StorageError(504, "storage did not answer in time")
    if isinstance(error, EndpointConnectionError):
        return StorageError(503, "storage is unreachable")
    if isinstance(error, ConnectionClosedError):
        return StorageError(503, "storage closed the connection")
    if isinstance(error, NoCredentialsError):
        return StorageError(502, "storage credentials are not configured")
    return StorageError(503, f"storage failed ({type(error).__name__})")


# ---------------------------------------------------------------- local disk


class LocalStorage:
    """Files under one directory; links are `/files/<key>?expires=..&signature=..` on this service."""

    def __init__(self, root: Path, public_base_url: str, presign_ttl_seconds: int) -> None:
        self.root = root.resolve()
        self.public_base_url = public_base_url.rstrip("/")
        self.presign_ttl_seconds = presign_ttl_seconds
        self.root.mkdir(parents=True, exist_ok=True)
        self.signing_key = load_or_create_signing_key(self.root / ".signing-key")

    def put(self, key: str, fileobj: Readable, *, content_type: str, content_disposition: str) -> Stored:
        reader = HashingReader(fileobj)
        data, metadata_path = self.path(key), self.path(key, METADATA_SUFFIX)
        try:
            data.parent.mkdir(exist_ok=True)
            write_atomically(data, lambda out: shutil.copyfileobj(reader, out, 1024 * 1024))
            stored = reader.stored()
            metadata = {
                "content_type": content_type,
                "content_disposition": content_disposition,
                "sha256": stored.sha256,
            }
            write_atomically(metadata_path, lambda out: out.write(json.dumps(metadata).encode()))
            return stored
        except OSError as error:
            with suppress(OSError):
                data.unlink(missing_ok=True)
            log.warning("local put %s failed: %r", key, error)
            raise StorageError(503, "storage could not write the file") from error

    def link(self, key: str) -> Link:
        expires = int(time.time()) + self.presign_ttl_seconds
        query = urlencode({"expires": expires, "signature": self.signature(key, expires)})
        return Link(f"{self.public_base_url}/files/{key}?{query}", datetime.fromtimestamp(expires, UTC))

    def check(self) -> None:
        try:
            for prefix in KEY_PREFIXES:
                (self.root / prefix).mkdir(exist_ok=True)
                handle, probe = tempfile.mkstemp(dir=self.root / prefix, prefix=".ready-")
                os.close(handle)
                os.unlink(probe)
        except OSError as error:
            log.warning("local store is not writable: %r", error)
            raise StorageError(503, "storage directory is not writable") from error

    def describe(self) -> str:
        return f"local directory {str(self.root)!r}, links at {self.public_base_url}/files/"

    def open(self, key: str, expires: str, signature: str) -> tuple[Path, dict[str, str]]:
        """The file and its metadata behind a link, or StorageError(403) for any link we did not make."""
        expected = self.signature(key, int(expires)) if EXPIRES.fullmatch(expires) else ""
        if not expected or not hmac.compare_digest(signature.encode(), expected.encode()):
            raise StorageError(403, "link signature is invalid")
        if int(expires) < time.time():
            raise StorageError(403, "link has expired")
        path = self.path(key)
        try:
            metadata = json.loads(self.path(key, METADATA_SUFFIX).read_bytes())
        except (OSError, ValueError):
            raise StorageError(403, "link points to no file") from None
        if not path.is_file():
            raise StorageError(403, "link points to no file")
        return path, metadata

    def signature(self, key: str, expires: int) -> str:
        return hmac.new(self.signing_key, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def path(self, key: str, suffix: str = "") -> Path:
        # Keys are ours (uuid-based, checked here) and symlinks are resolved, so no key or link
        # placed in the directory can reach a file outside it.
        if not KEY_PATTERN.fullmatch(key):
            raise StorageError(403, "link points to no file")
        path = (self.root / (key + suffix)).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(403, "link points to no file")
        return path


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write beside the target and rename into place, so that no reader ever sees half a file."""
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise


def load_or_create_signing_key(path: Path) -> bytes:
    """A secret kept beside the files (mode 0600), so that links stay valid across restarts."""
    if not path.exists():
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".partial-")  # made 0600
        with os.fdopen(handle, "wb") as out:
            out.write(secrets.token_bytes(32))
        with suppress(FileExistsError):  # another worker made one first: everyone uses that one
            os.link(temp_name, path)
        os.unlink(temp_name)
    return path.read_bytes()
