"""storage.py: the local store's signed links, S3 links and uploads, error mapping."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

import boto3.s3.transfer
import pytest
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from moto import mock_aws

import storage
from storage import LocalStorage, S3Storage, StorageError
from upload_parser import content_disposition

BASE_URL = "http://testserver"
ENDPOINT_URL = "http://127.0.0.1:9"
SECRET_ACCESS_KEY = "testing"  # conftest's aws_environment
MiB = 1024 * 1024
METADATA = '{"content_type": "text/plain", "content_disposition": "attachment"}'
Link = tuple[str, str, str]
PutObject = Callable[[bytes, str, str], dict[str, Any]]


def new_key() -> str:
    return f"uploads/{uuid4().hex}"


def link_parts(url: str) -> Link:
    """The key, expires and signature that the /files route passes to LocalStorage.open."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    return parts.path.removeprefix("/files/"), query["expires"][0], query["signature"][0]


def put_bytes(store: LocalStorage, key: str, data: bytes = b"hello") -> storage.Stored:
    return store.put(key, io.BytesIO(data), content_type="text/plain", content_disposition="attachment")


def client_error(code: str, http_status: int) -> ClientError:
    # Real messages can name the endpoint; the mapped detail must not pass that on.
    message = f"{code} at {ENDPOINT_URL}/assets with key {SECRET_ACCESS_KEY}"
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": http_status}}
    return ClientError(response, "PutObject")


# ---------------------------------------------------------------- LocalStorage


@dataclass
class Clock:
    now: float

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A settable time.time as the storage module sees it, so expiry is tested without sleeping."""
    clock = Clock(1_700_000_000.0)
    monkeypatch.setattr(storage, "time", SimpleNamespace(time=clock.time))
    return clock


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The local store's directory, one level down so that tests can put files just outside it."""
    return tmp_path / "data"


@pytest.fixture
def local(root: Path) -> LocalStorage:
    """A local store with hour-long links."""
    return LocalStorage(root, BASE_URL, presign_ttl_seconds=3600)


@pytest.fixture
def stored_key(local: LocalStorage) -> str:
    """The key of a file already put in the local store."""
    key = new_key()
    put_bytes(local, key)
    return key


@pytest.mark.parametrize("base_url", ["http://testserver", "http://testserver/", "https://cdn.example/assets/"])
def test_local_url_is_the_files_route_under_the_public_base_url(root: Path, base_url: str) -> None:
    key = new_key()
    url = LocalStorage(root, base_url, presign_ttl_seconds=60).link(key).url
    assert url.startswith(f"{base_url.rstrip('/')}/files/{key}?")


@pytest.mark.parametrize("data", [b"", b"hello", bytes(range(256)) * 4096], ids=["empty", "small", "1-MiB"])
def test_local_link_opens_the_bytes_that_were_put(local: LocalStorage, data: bytes) -> None:
    key = new_key()
    put_bytes(local, key, data)
    path, _ = local.open(*link_parts(local.link(key).url))
    assert path.read_bytes() == data


def test_local_link_opens_the_metadata_that_was_put(local: LocalStorage) -> None:
    key = new_key()
    disposition = content_disposition("résumé.pdf")
    local.put(key, io.BytesIO(b"%PDF"), content_type="application/pdf", content_disposition=disposition)
    _, metadata = local.open(*link_parts(local.link(key).url))
    assert metadata == {
        "content_type": "application/pdf",
        "content_disposition": disposition,
        "sha256": hashlib.sha256(b"%PDF").hexdigest(),
    }


TAMPERINGS: dict[str, Callable[[Link], Link]] = {
    "last-hex-digit-changed": lambda link: (link[0], link[1], link[2][:-1] + ("0" if link[2][-1] != "0" else "1")),
    "upper-case": lambda link: (link[0], link[1], link[2].upper()),
    "truncated": lambda link: (link[0], link[1], link[2][:32]),
    "empty": lambda link: (link[0], link[1], ""),
    "expires-extended": lambda link: (link[0], str(int(link[1]) + 1), link[2]),
    "other-key": lambda link: (new_key(), link[1], link[2]),
}


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_local_tampered_link_is_refused(local: LocalStorage, stored_key: str, tamper: Callable[[Link], Link]) -> None:
    with pytest.raises(StorageError) as refused:
        local.open(*tamper(link_parts(local.link(stored_key).url)))
    assert refused.value.status_code == 403


@pytest.mark.parametrize(
    "expires",
    [
        "",
        "soon",
        "-1",
        "1.5",
        " 1",
        pytest.param("²", id="superscript-digit"),
        pytest.param("9" * 5000, id="5000-digits"),
    ],
)
def test_local_malformed_expiry_is_refused(local: LocalStorage, stored_key: str, expires: str) -> None:
    _, _, signature = link_parts(local.link(stored_key).url)
    with pytest.raises(StorageError) as refused:
        local.open(stored_key, expires, signature)
    assert refused.value.status_code == 403


@pytest.fixture
def one_second_link(root: Path, clock: Clock) -> tuple[LocalStorage, Link]:
    """A stored file and the pieces of its link, which lives one second on the fake clock."""
    local = LocalStorage(root, BASE_URL, presign_ttl_seconds=1)
    key = new_key()
    put_bytes(local, key)
    return local, link_parts(local.link(key).url)


@pytest.mark.parametrize("seconds_later", [0, 0.5, 1])
def test_local_link_opens_until_it_expires(
    one_second_link: tuple[LocalStorage, Link], clock: Clock, seconds_later: float
) -> None:
    local, link = one_second_link
    clock.now += seconds_later
    assert local.open(*link)[0].read_bytes() == b"hello"


@pytest.mark.parametrize("seconds_later", [1.001, 2, 86400])
def test_local_link_is_refused_after_it_expires(
    one_second_link: tuple[LocalStorage, Link], clock: Clock, seconds_later: float
) -> None:
    local, link = one_second_link
    clock.now += seconds_later
    with pytest.raises(StorageError) as refused:
        local.open(*link)
    assert refused.value.status_code == 403


@pytest.mark.parametrize(
    "key",
    [
        "../x",
        "uploads/../../x",
        f"uploads/{'0' * 32}/../../../x",
        ".signing-key",
        "/etc/passwd",
        f"uploads/{'a' * 32}.json",
        f"uploads/{'A' * 32}",
        f"other/{'a' * 32}",
        "uploads/x",
    ],
)
def test_local_key_outside_the_pattern_is_refused_even_when_signed(
    local: LocalStorage, root: Path, tmp_path: Path, key: str
) -> None:
    target = (root / key).resolve()
    # A file and metadata wait at each target we may write to (not /etc), so only the key check refuses.
    if target.is_relative_to(tmp_path):
        plant(target)
    expires = int(storage.time.time()) + 60
    with pytest.raises(StorageError) as refused:
        local.open(key, str(expires), local.signature(key, expires))
    assert refused.value.status_code == 403


def plant(path: Path) -> None:
    for file in (path, path.with_name(f"{path.name}.json")):
        file.parent.mkdir(parents=True, exist_ok=True)
        if not file.exists():
            file.write_text(METADATA)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the store's root holding a secret and metadata that would serve it."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret").write_bytes(b"not yours")
    (directory / "secret.json").write_text(METADATA)
    return directory


def link_file(root: Path, key: str, outside: Path) -> None:
    (root / "uploads").mkdir()
    (root / key).symlink_to(outside / "secret")
    (root / f"{key}.json").write_text(METADATA)


def link_metadata(root: Path, key: str, outside: Path) -> None:
    (root / "uploads").mkdir()
    (root / key).write_bytes(b"ours")
    (root / f"{key}.json").symlink_to(outside / "secret.json")


def link_uploads_directory(root: Path, key: str, outside: Path) -> None:
    name = key.removeprefix("uploads/")
    (outside / "secret").rename(outside / name)
    (outside / "secret.json").rename(outside / f"{name}.json")
    (root / "uploads").symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("place_symlink", [link_file, link_metadata, link_uploads_directory])
def test_local_symlink_out_of_the_root_is_refused(
    local: LocalStorage, root: Path, outside: Path, place_symlink: Callable[[Path, str, Path], None]
) -> None:
    key = new_key()
    place_symlink(root, key, outside)
    with pytest.raises(StorageError) as refused:
        local.open(*link_parts(local.link(key).url))
    assert refused.value.status_code == 403


def test_local_signing_key_is_private(local: LocalStorage, root: Path) -> None:
    assert stat.S_IMODE((root / ".signing-key").stat().st_mode) == 0o600


def test_local_signing_key_is_32_bytes(local: LocalStorage, root: Path) -> None:
    assert len((root / ".signing-key").read_bytes()) == 32


def test_local_signing_key_survives_a_restart(local: LocalStorage, root: Path) -> None:
    key = new_key()
    restarted = LocalStorage(root, BASE_URL, presign_ttl_seconds=3600)
    assert restarted.signature(key, 1_700_000_000) == local.signature(key, 1_700_000_000)


def test_local_stores_have_different_signing_keys(tmp_path: Path) -> None:
    first, second = (LocalStorage(tmp_path / name, BASE_URL, 60) for name in ("a", "b"))
    assert first.signing_key != second.signing_key


class FullDisk:
    """A file on a disk that fills up after `room` bytes."""

    def __init__(self, file: BinaryIO, room: int) -> None:
        self.file = file
        self.room = room

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if len(chunk) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(chunk)
            self.file.write(chunk)

    def write(self, data: bytes) -> None:
        self.writelines([data])

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local store's disk has room for 1.5 MiB more: a file's second part, or its metadata, fails."""
    fdopen = os.fdopen
    room = [3 * MiB // 2]

    def open_on_full_disk(handle: int, mode: str) -> FullDisk:
        disk = FullDisk(fdopen(handle, mode), room[0])
        room[0] = 0
        return disk

    monkeypatch.setattr(os, "fdopen", open_on_full_disk)


@pytest.mark.parametrize("size", [10, 4 * MiB], ids=["metadata-fails", "data-fails"])
def test_local_disk_full_is_a_503_leaving_nothing(local: LocalStorage, root: Path, full_disk: None, size: int) -> None:
    with pytest.raises(StorageError) as failed:
        put_bytes(local, new_key(), os.urandom(size))
    assert (failed.value.status_code, failed.value.detail) == (503, "storage could not write the file")
    assert [path for path in root.rglob("*") if path.is_file()] == [root / ".signing-key"]


@pytest.mark.parametrize("size", [0, 1, MiB - 1, MiB, 3 * MiB + 1])
def test_local_put_stores_every_size_in_parts(local: LocalStorage, root: Path, size: int) -> None:
    data, key = os.urandom(size), new_key()
    stored = put_bytes(local, key, data)
    assert (root / key).read_bytes() == data
    assert stored == (size, hashlib.sha256(data).hexdigest())
    assert list(root.rglob(".partial-*")) == []


# ---------------------------------------------------------------- S3


def s3_storage(
    *, region: str = "us-east-1", endpoint_url: str | None = None, ttl: int = 3600, bucket: str = "assets"
) -> S3Storage:
    return storage.make_s3_storage(
        bucket=bucket,
        presign_ttl_seconds=ttl,
        region=region,
        endpoint_url=endpoint_url,
        connect_timeout=1,
        read_timeout=1,
    )


def s3_query(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


@pytest.fixture
def aws() -> Iterator[None]:
    """moto's in-process mock, started before any client is made, so no request can leave the process."""
    with mock_aws():
        yield


@pytest.fixture
def s3_store(aws: None) -> S3Storage:
    """An S3Storage whose mocked bucket `assets` exists; its own client reads back what landed."""
    store = s3_storage()
    store.client.create_bucket(Bucket="assets")
    return store


uses_moto = pytest.mark.usefixtures("aws")


@uses_moto
@pytest.mark.parametrize("region", ["eu-west-2", "ap-southeast-2"])
def test_s3_url_is_virtual_host_in_the_region(region: str) -> None:
    key = new_key()
    url = s3_storage(region=region).link(key).url
    assert url.startswith(f"https://assets.s3.{region}.amazonaws.com/{key}?")


@uses_moto
def test_s3_url_is_sigv4() -> None:
    assert s3_query(s3_storage(region="eu-west-2").link(new_key()).url)["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"


@uses_moto
@pytest.mark.parametrize("ttl", [1, 3600, 604800])
def test_s3_url_expires_after_the_ttl(ttl: int) -> None:
    assert s3_query(s3_storage(region="eu-west-2", ttl=ttl).link(new_key()).url)["X-Amz-Expires"] == str(ttl)


@uses_moto
@pytest.mark.parametrize("region", ["eu-west-2", "ap-southeast-2"])
def test_s3_url_credential_scope_names_the_region(region: str) -> None:
    credential = s3_query(s3_storage(region=region).link(new_key()).url)["X-Amz-Credential"]
    assert credential.endswith(f"/{region}/s3/aws4_request")


@uses_moto
def test_s3_url_with_an_endpoint_is_path_style() -> None:
    key = new_key()
    url = s3_storage(region="eu-west-2", endpoint_url=ENDPOINT_URL).link(key).url
    assert url.startswith(f"{ENDPOINT_URL}/assets/{key}?")


@pytest.fixture
def put_object(s3_store: S3Storage) -> PutObject:
    """Puts through S3Storage and answers with what get_object then finds in the bucket."""

    def put(data: bytes, content_type: str, disposition: str) -> dict[str, Any]:
        key = new_key()
        s3_store.put(key, io.BytesIO(data), content_type=content_type, content_disposition=disposition)
        return s3_store.client.get_object(Bucket="assets", Key=key)

    return put


@pytest.mark.parametrize("data", [b"", b"hello", bytes(range(256)) * 64], ids=["empty", "small", "16-KiB"])
def test_s3_put_stores_the_bytes(put_object: PutObject, data: bytes) -> None:
    assert put_object(data, "application/octet-stream", "attachment")["Body"].read() == data


@pytest.mark.parametrize("content_type", ["image/png", "text/plain; charset=utf-8", "application/octet-stream"])
def test_s3_put_stores_the_content_type(put_object: PutObject, content_type: str) -> None:
    assert put_object(b"x", content_type, "attachment")["ContentType"] == content_type


@pytest.mark.parametrize(
    "disposition",
    ["inline", "attachment", content_disposition("résumé.pdf"), content_disposition('a "b".txt')],
    ids=["inline", "attachment", "unicode-name", "quoted-name"],
)
def test_s3_put_stores_the_content_disposition(put_object: PutObject, disposition: str) -> None:
    assert put_object(b"x", "text/plain", disposition)["ContentDisposition"] == disposition


THRESHOLD = storage.MULTIPART_THRESHOLD
SIZES = pytest.mark.parametrize("size", [0, 1000, THRESHOLD - 1, THRESHOLD, 3 * THRESHOLD + 1])


class Unseekable:
    """A body that can only be read forward, as a file arriving from a client."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self.data.read(size)


@SIZES
def test_s3_put_answers_the_size_and_sha256_of_what_landed(s3_store: S3Storage, size: int) -> None:
    data, key = os.urandom(size), new_key()
    stored = s3_store.put(key, Unseekable(data), content_type="text/plain", content_disposition="attachment")
    landed = s3_store.client.get_object(Bucket="assets", Key=key)["Body"].read()
    assert landed == data
    assert stored == (len(data), hashlib.sha256(data).hexdigest())


@SIZES
def test_s3_object_carries_its_sha256(s3_store: S3Storage, size: int) -> None:
    """As metadata when it goes up in one PUT; as a tag when it goes up in parts while still arriving."""
    data, key = os.urandom(size), new_key()
    s3_store.put(key, Unseekable(data), content_type="text/plain", content_disposition="attachment")
    metadata = s3_store.client.head_object(Bucket="assets", Key=key)["Metadata"]
    tags = s3_store.client.get_object_tagging(Bucket="assets", Key=key)["TagSet"]
    expected = {"sha256": hashlib.sha256(data).hexdigest()}
    if size < storage.MULTIPART_THRESHOLD:
        assert (metadata, tags) == (expected, [])
    else:
        assert (metadata, tags) == ({}, [{"Key": "sha256", "Value": expected["sha256"]}])


class BrokenAfter(Unseekable):
    """A body whose client goes away after `size` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(os.urandom(size))

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        if len(data) < size or size < 0:
            raise OSError("client went away")
        return data


@pytest.mark.parametrize("size", [1000, THRESHOLD, 4 * THRESHOLD])
def test_s3_put_of_a_body_that_breaks_leaves_nothing(s3_store: S3Storage, size: int) -> None:
    with pytest.raises(OSError, match="client went away"):
        s3_store.put(new_key(), BrokenAfter(size), content_type="text/plain", content_disposition="attachment")
    assert "Contents" not in s3_store.client.list_objects_v2(Bucket="assets")
    assert "Uploads" not in s3_store.client.list_multipart_uploads(Bucket="assets")


TAGGING_FAILURES = {
    "access-denied": client_error("AccessDenied", 403),
    "not-implemented": client_error("NotImplemented", 501),
    "timed-out": ReadTimeoutError(endpoint_url=ENDPOINT_URL),
}


@pytest.mark.parametrize("failure", TAGGING_FAILURES.values(), ids=TAGGING_FAILURES.keys())
def test_s3_put_that_cannot_tag_stores_the_file_and_warns_once(
    s3_store: S3Storage,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: BotoCoreError | ClientError,
) -> None:
    def refuse(**_: Any) -> None:
        raise failure

    monkeypatch.setattr(s3_store.client, "put_object_tagging", refuse)
    files = {new_key(): os.urandom(6 * MiB) for _ in range(3)}
    for key, data in files.items():
        stored = s3_store.put(key, Unseekable(data), content_type="text/plain", content_disposition="a")
        assert stored == (len(data), hashlib.sha256(data).hexdigest())

    for key, data in files.items():
        assert s3_store.client.get_object(Bucket="assets", Key=key)["Body"].read() == data
        assert s3_store.client.get_object_tagging(Bucket="assets", Key=key)["TagSet"] == []
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len([warning for warning in warnings if "no sha256 tag" in warning]) == 1
    assert "s3:PutObjectTagging" in warnings[-1] and storage.storage_error(failure).detail in warnings[-1]


def test_s3_upload_has_landed_only_with_its_size_and_part_count(s3_store: S3Storage) -> None:
    """What tells a completion that answered NoSuchUpload or lost its answer from one that failed."""
    data = os.urandom(2 * THRESHOLD + 1)
    upload = s3_store.begin(new_key(), content_type="text/plain", content_disposition="attachment")
    for start in (0, THRESHOLD):
        upload.write([data[start : start + THRESHOLD]])
    upload.commit([data[2 * THRESHOLD :]])
    assert upload.landed(len(data))
    assert not upload.landed(len(data) + 1)
    assert not upload.landed(len(data) - 1)
    upload.parts.append(upload.parts[-1])
    assert not upload.landed(len(data))


def test_s3_upload_that_is_not_there_has_not_landed(s3_store: S3Storage) -> None:
    assert not s3_store.begin(new_key(), content_type="text/plain", content_disposition="attachment").landed(0)


@uses_moto
def test_s3_links_read_the_credentials_both_clients_sign_with() -> None:
    """The store reads the session's credentials (public); this checks, through botocore's private accessor, that
    they are the very ones its clients sign with, so that an upgrade that makes them differ fails here."""
    store = s3_storage()
    assert store.credentials is not None
    assert store.client._get_credentials() is store.credentials
    assert store.completion_client._get_credentials() is store.credentials


def test_s3_multipart_put_never_switches_to_awscrt(s3_store: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where awscrt is installed, on instance types it is tuned for, boto3's transfer manager would switch to it
    unasked (about 100 MB more memory per upload): the store must go on sending its own parts. boto3 imports
    these names only when awscrt is installed, which here it is not."""
    switched: list[str] = []
    awscrt = SimpleNamespace(__version__="0.29.0", s3=SimpleNamespace(is_optimized_for_system=lambda: True))
    for name, value in {
        "HAS_CRT": True,
        "awscrt": awscrt,
        "create_crt_transfer_manager": lambda *_: switched.append("crt"),
    }.items():
        monkeypatch.setattr(boto3.s3.transfer, name, value, raising=False)
    data, key = os.urandom(2 * THRESHOLD), new_key()

    s3_store.put(key, Unseekable(data), content_type="text/plain", content_disposition="attachment")

    assert switched == []
    assert s3_store.client.get_object(Bucket="assets", Key=key)["Body"].read() == data


@uses_moto
def test_s3_put_to_a_missing_bucket_is_a_502() -> None:
    with pytest.raises(StorageError) as refused:
        s3_storage(bucket="no-such-bucket").put(
            new_key(), io.BytesIO(b"x"), content_type="text/plain", content_disposition="attachment"
        )
    assert refused.value.status_code == 502


# ---------------------------------------------------------------- storage_error


ERRORS: dict[str, tuple[BotoCoreError | ClientError, int]] = {
    "no-such-bucket": (client_error("NoSuchBucket", 404), 502),
    "access-denied": (client_error("AccessDenied", 403), 502),
    "invalid-access-key": (client_error("InvalidAccessKeyId", 403), 502),
    "slow-down": (client_error("SlowDown", 503), 503),
    "internal-error": (client_error("InternalError", 500), 503),
    "endpoint-unreachable": (EndpointConnectionError(endpoint_url=ENDPOINT_URL), 503),
    "connect-timeout": (ConnectTimeoutError(endpoint_url=ENDPOINT_URL), 504),
    "read-timeout": (ReadTimeoutError(endpoint_url=ENDPOINT_URL), 504),
    "no-credentials": (NoCredentialsError(), 502),
}


@pytest.mark.parametrize(("error", "status"), ERRORS.values(), ids=ERRORS.keys())
def test_storage_error_status(error: BotoCoreError | ClientError, status: int) -> None:
    assert storage.storage_error(error).status_code == status


def test_storage_error_names_the_s3_error_code() -> None:
    assert "NoSuchBucket" in storage.storage_error(client_error("NoSuchBucket", 404)).detail


@pytest.mark.parametrize("error", [error for error, _ in ERRORS.values()], ids=ERRORS.keys())
@pytest.mark.parametrize("secret", [SECRET_ACCESS_KEY, ENDPOINT_URL, "127.0.0.1"])
def test_storage_error_detail_reveals_no_secret_or_endpoint(error: BotoCoreError | ClientError, secret: str) -> None:
    assert secret not in storage.storage_error(error).detail
