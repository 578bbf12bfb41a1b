"""Where stored files live: S3, or a directory on local disk with signed links served by us.

Both stores have the same verbs: `begin` storing a file that may still be arriving (then `write` it a
part at a time, and `commit` or `abort` it), `put` a whole file, make a time-limited `link` to a file,
`delete` one, and `check` that files can be stored now. They raise `StorageError` for failures the
caller should see, and nothing else. Every verb but `begin` blocks: callers run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol
from urllib.parse import urlencode

import boto3
from botocore.config import Config
from botocore.credentials import Credentials, RefreshableCredentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as NotConnectedError

log = logging.getLogger(__name__)

# S3's smallest part: a file under it goes up in one PUT, a larger one in parts of at least this size.
MULTIPART_THRESHOLD = 5 * 1024 * 1024
# A file still arriving has no known size, so its parts cannot grow with it: S3 takes 10,000.
MAX_OBJECT_BYTES = 10_000 * MULTIPART_THRESHOLD
# Completing a multipart upload makes S3 assemble the object, which takes minutes for the largest
# (S3 keeps the connection alive meanwhile): the one call that waits this long for an answer.
COMPLETE_READ_TIMEOUT_SECONDS = 15 * 60
# Attempts at CompleteMultipartUpload, as botocore's standard retry mode makes of every other call.
COMPLETE_ATTEMPTS = 3
LOCAL_PART_BYTES = 1024 * 1024
# The only keys the service ever makes: the local store refuses to serve anything else.
KEY_PREFIXES = ("uploads", "generated")
KEY_PATTERN = re.compile(r"(uploads|generated)/[0-9a-f]{32}(\.(png|jpg|webp))?")
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


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes (all that is left if -1); fewer only at the end."""


class Upload(Protocol):
    """One file being stored while it arrives, one step at a time.

    Each step takes the list of chunks that arrived since the last one and empties it, so that the
    chunks are freed as soon as they are stored. `write` is given at least the store's `part_bytes`.
    After a failed step, or to give up, the caller calls `abort`, which leaves nothing behind.
    """

    def write(self, chunks: list[bytes]) -> None: ...

    def commit(self, chunks: list[bytes]) -> Stored: ...

    def abort(self) -> None: ...


class Storage:
    """What both stores offer; `put` is `begin` for a file that is already whole."""

    part_bytes: int

    def begin(self, key: str, *, content_type: str, content_disposition: str) -> Upload:
        """Starts storing `key`; does no I/O, so it may be called on the event loop."""
        raise NotImplementedError

    def put(self, key: str, fileobj: Readable, *, content_type: str, content_disposition: str) -> Stored:
        upload = self.begin(key, content_type=content_type, content_disposition=content_disposition)
        try:
            while len(part := fileobj.read(self.part_bytes)) == self.part_bytes:
                upload.write([part])
            return upload.commit([part])
        except BaseException:
            upload.abort()
            raise

    def link(self, key: str) -> Link:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Removes a stored file; a file that is not there is no error."""
        raise NotImplementedError

    def check(self) -> None:
        """Raises StorageError unless the store can take files now."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class Hasher:
    """Counts and hashes the chunks of a file in the pass that stores them."""

    def __init__(self) -> None:
        self.size = 0
        self.sha256 = hashlib.sha256()

    def take(self, chunks: list[bytes]) -> list[bytes]:
        """The chunks, counted and hashed, in a new list; `chunks` is emptied."""
        taken = chunks[:]
        chunks.clear()
        for chunk in taken:
            self.size += len(chunk)
            self.sha256.update(chunk)
        return taken

    def stored(self) -> Stored:
        return Stored(self.size, self.sha256.hexdigest())


# ---------------------------------------------------------------- S3


def make_s3_storage(
    bucket: str,
    presign_ttl_seconds: int,
    *,
    region: str,
    endpoint_url: str | None,
    connect_timeout: float,
    read_timeout: float,
    checksums: str = "when_supported",
) -> S3Storage:
    """The S3 store, with the process's two clients: thread-safe, SigV4 links, bounded time on failure.

    Both come from one session, so they sign with the same credentials and S3's service model is
    loaded once (a session of its own costs 12 MB more). `checksums="when_required"` stops boto3
    sending the checksums some S3-compatible stores reject.
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
    # botocore would retry a completion that times out or loses its connection while S3 may still be
    # assembling the object: S3Upload.complete retries only what has surely ended.
    completing = Config(
        read_timeout=COMPLETE_READ_TIMEOUT_SECONDS, retries={"mode": "standard", "total_max_attempts": 1}
    )
    session = boto3.session.Session()
    return S3Storage(
        client=session.client("s3", endpoint_url=endpoint_url, config=config),
        completion_client=session.client("s3", endpoint_url=endpoint_url, config=config.merge(completing)),
        credentials=session.get_credentials(),
        bucket=bucket,
        presign_ttl_seconds=presign_ttl_seconds,
    )


class S3Storage(Storage):
    part_bytes = MULTIPART_THRESHOLD

    def __init__(
        self,
        client: Any,
        completion_client: Any,
        credentials: Credentials | None,
        bucket: str,
        presign_ttl_seconds: int,
    ) -> None:
        self.client = client
        # The same store with a long read timeout and no retries of botocore's, for CompleteMultipartUpload alone.
        self.completion_client = completion_client
        self.credentials = credentials  # what both clients sign with
        self.bucket = bucket
        self.presign_ttl_seconds = presign_ttl_seconds
        self.warned: set[str] = set()

    def begin(self, key: str, *, content_type: str, content_disposition: str) -> S3Upload:
        return S3Upload(self, key, {"ContentType": content_type, "ContentDisposition": content_disposition})

    def link(self, key: str) -> Link:
        now = datetime.now(UTC)
        expires_at = now + timedelta(seconds=self.presign_ttl_seconds)
        with s3_errors(f"presign {key}"):
            # Temporary credentials (a Fargate task role's) sign links that die with them, whatever the TTL.
            try:
                credentials_expire = credentials_expiry(self.credentials)
            except LookupError:
                credentials_expire = None
                self.warn_once(
                    "cannot tell when the signing credentials expire: links may stop working before their "
                    "expires_at (has botocore changed RefreshableCredentials? pin the botocore that works)"
                )
            if credentials_expire is not None and credentials_expire < expires_at:
                expires_at = credentials_expire
                self.warn_once("links live less than S3_PRESIGN_TTL_SECONDS: the signing credentials expire sooner")
            expires_in = max(1, int((expires_at - now).total_seconds()))
            url = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
            )
        return Link(url, expires_at)

    def delete(self, key: str) -> None:
        with s3_errors(f"delete {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def check(self) -> None:
        with s3_errors("head bucket"):
            self.client.head_bucket(Bucket=self.bucket)

    def describe(self) -> str:
        return f"S3 bucket {self.bucket!r} via {self.client.meta.endpoint_url}"

    def tag(self, key: str, stored: Stored) -> None:
        """Best effort: the sha256 tag of a file stored in parts. Some S3-compatible stores have no
        tagging, and a role may lack s3:PutObjectTagging; the file is stored either way."""
        tags = {"TagSet": [{"Key": "sha256", "Value": stored.sha256}]}
        try:
            self.client.put_object_tagging(Bucket=self.bucket, Key=key, Tagging=tags)
        except (BotoCoreError, ClientError) as error:
            self.warn_once(
                f"files stored in parts carry no sha256 tag: tagging failed: {storage_error(error).detail}. Grant "
                "s3:PutObjectTagging, or use a store with object tagging, to get it (the answer's sha256 is unaffected)"
            )

    def warn_once(self, message: str) -> None:
        """A warning for the operator, once per process and cause: every request would say the same."""
        if message not in self.warned:
            self.warned.add(message)
            log.warning(message)


def credentials_expiry(credentials: Credentials | None) -> datetime | None:
    """When refreshable credentials (a task role's) expire; None for credentials that do not.

    botocore has no public way to read it: RefreshableCredentials keeps it in `_expiry_time`, a private
    name that may change in any release. tests/test_operations.py fails if it goes, and here a refreshable
    credential whose expiry cannot be read raises LookupError rather than pass for one that never expires.
    """
    if not isinstance(credentials, RefreshableCredentials):
        return None
    credentials.get_frozen_credentials()  # refreshed first if they are about to expire, as signing does
    expiry = getattr(credentials, "_expiry_time", None)
    if not isinstance(expiry, datetime):
        raise LookupError("refreshable credentials without a readable expiry")
    return expiry


class S3Upload:
    """A file under 5 MiB goes up in one PutObject, with its sha256 as metadata. A larger one goes up
    in parts while the rest arrives; S3 takes metadata only before the first byte, when the hash is
    not known yet, so the sha256 becomes a tag once the last part is in."""

    def __init__(self, store: S3Storage, key: str, headers: dict[str, str]) -> None:
        self.store = store
        self.object = {"Bucket": store.bucket, "Key": key}
        self.headers = headers
        self.hasher = Hasher()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        # With checksums on (the default), botocore adds a CRC32 that S3 checks as the bytes arrive;
        # a multipart upload must name it from the start, and its completion list each part's.
        checksums = store.client.meta.config.request_checksum_calculation == "when_supported"
        self.checksum = {"ChecksumAlgorithm": "CRC32"} if checksums else {}

    def write(self, chunks: list[bytes]) -> None:
        body = b"".join(self.hasher.take(chunks))
        with s3_errors(f"upload a part of {self.object['Key']}"):
            if self.upload_id is None:
                created = self.store.client.create_multipart_upload(**self.object, **self.headers, **self.checksum)
                self.upload_id = created["UploadId"]
            self.send_part(body)

    def commit(self, chunks: list[bytes]) -> Stored:
        body = b"".join(self.hasher.take(chunks))
        stored = self.hasher.stored()
        with s3_errors(f"put {self.object['Key']}"):
            if self.upload_id is None:
                self.store.client.put_object(
                    **self.object, Body=body, Metadata={"sha256": stored.sha256}, **self.headers
                )
                return stored
            if body:
                self.send_part(body)
            self.complete(stored.size)
        self.store.tag(self.object["Key"], stored)
        return stored

    def abort(self) -> None:
        if self.upload_id is None:
            return
        with suppress(StorageError), s3_errors(f"abort the upload of {self.object['Key']}"):
            # Left behind if this fails too: the bucket's lifecycle rule removes it (see the README).
            self.store.client.abort_multipart_upload(**self.object, UploadId=self.upload_id)
        self.upload_id = None

    def send_part(self, body: bytes) -> None:
        number = len(self.parts) + 1
        sent = self.store.client.upload_part(
            **self.object, UploadId=self.upload_id, PartNumber=number, Body=body, **self.checksum
        )
        self.parts.append({"PartNumber": number, "ETag": sent["ETag"]} | pick(sent, "ChecksumCRC32"))

    def complete(self, size: int) -> None:
        """CompleteMultipartUpload, with a read timeout of its own. An attempt is repeated only once the
        earlier one has surely ended; when the last one fails, the object may be there all the same (S3
        answers a retry of a completion it had in fact finished with NoSuchUpload, s3rver with
        InternalError, and a lost answer says nothing), and then the upload has succeeded."""
        for attempt in range(COMPLETE_ATTEMPTS):
            try:
                self.store.completion_client.complete_multipart_upload(
                    **self.object, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts}
                )
                break
            except (BotoCoreError, ClientError) as error:
                if attempt < COMPLETE_ATTEMPTS - 1 and surely_ended(error):
                    time.sleep(random.uniform(0, 2**attempt))  # jittered backoff: up to 1 s, then 2 s
                elif self.landed(size):
                    break
                else:
                    raise
        self.upload_id = None

    def landed(self, size: int) -> bool:
        """The object is there, whole: its size, and the part count in its multipart ETag ("<hash>-<parts>");
        some S3-compatible stores give a plain hash of the whole object, which then says nothing either way."""
        with suppress(BotoCoreError, ClientError):
            head = self.store.client.head_object(**self.object)
            etag = head["ETag"].strip('"')
            return head["ContentLength"] == size and ("-" not in etag or etag.endswith(f"-{len(self.parts)}"))
        return False


def surely_ended(error: BotoCoreError | ClientError) -> bool:
    """Whether a failed request is over at S3 too: it never reached S3, or S3 answered it with an error of its
    own (5xx). A request whose answer was lost (timed out, connection closed) may still be running there."""
    if isinstance(error, ClientError):
        return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return isinstance(error, NotConnectedError)


def pick(mapping: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: mapping[name] for name in names if name in mapping}


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


class LocalStorage(Storage):
    """Files under one directory; links are `/files/<key>?expires=..&signature=..` on this service."""

    part_bytes = LOCAL_PART_BYTES

    def __init__(self, root: Path, public_base_url: str, presign_ttl_seconds: int) -> None:
        self.root = root.resolve()
        self.public_base_url = public_base_url.rstrip("/")
        self.presign_ttl_seconds = presign_ttl_seconds
        self.root.mkdir(parents=True, exist_ok=True)
        self.signing_key = load_or_create_signing_key(self.root / ".signing-key")

    def begin(self, key: str, *, content_type: str, content_disposition: str) -> LocalUpload:
        return LocalUpload(self, key, {"content_type": content_type, "content_disposition": content_disposition})

    def delete(self, key: str) -> None:
        with local_errors(f"delete {key}", "storage could not delete the file"):
            self.path(key, METADATA_SUFFIX).unlink(missing_ok=True)
            self.path(key).unlink(missing_ok=True)

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


class LocalUpload:
    """Written straight into a partial file beside its final name, renamed into place on commit, so
    that no reader ever sees half a file; its metadata (type, name, sha256) goes in a file beside it."""

    def __init__(self, store: LocalStorage, key: str, metadata: dict[str, str]) -> None:
        self.store = store
        self.key = key
        self.metadata = metadata
        self.hasher = Hasher()
        self.partial: BinaryIO | None = None
        self.partial_path = ""

    @property
    def path(self) -> Path:
        return self.store.path(self.key)

    def write(self, chunks: list[bytes]) -> None:
        with local_errors(f"write {self.key}", "storage could not write the file"):
            if self.partial is None:
                self.path.parent.mkdir(exist_ok=True)
                handle, self.partial_path = tempfile.mkstemp(dir=self.path.parent, prefix=".partial-")
                self.partial = os.fdopen(handle, "wb")
            self.partial.writelines(self.hasher.take(chunks))

    def commit(self, chunks: list[bytes]) -> Stored:
        self.write(chunks)
        assert self.partial is not None
        stored = self.hasher.stored()
        metadata = json.dumps(self.metadata | {"sha256": stored.sha256}).encode()
        with local_errors(f"commit {self.key}", "storage could not write the file"):
            self.partial.close()
            os.replace(self.partial_path, self.path)
            try:
                write_atomically(self.store.path(self.key, METADATA_SUFFIX), lambda out: out.write(metadata))
            except OSError:
                self.path.unlink(missing_ok=True)
                raise
        self.partial = None
        return stored

    def abort(self) -> None:
        if self.partial is not None:
            self.partial.close()
            with suppress(OSError):
                os.unlink(self.partial_path)
            self.partial = None


@contextmanager
def local_errors(action: str, detail: str) -> Iterator[None]:
    """Turns a failure of the local disk into StorageError(503)."""
    try:
        yield
    except OSError as error:
        log.warning("local %s failed: %r", action, error)
        raise StorageError(503, detail) from error


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
