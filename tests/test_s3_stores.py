"""The end-to-end contract on each S3 implementation the suite runs, moto and s3rver, through the real server;
and what s3rver does that S3 does not, as the store meets it."""

from __future__ import annotations

import hashlib
import io
import os
import re
from typing import Any, NamedTuple
from urllib.parse import quote
from uuid import uuid4

import boto3
import httpx
import pytest
from botocore.config import Config
from PIL import Image

import storage
from conftest import FILENAME, S3RVER_CREDENTIALS, StartServer, s3_key, upload

MiB = 1024 * 1024


class Store(NamedTuple):
    settings: dict[str, str | None]  # the service's, credentials included
    client: Any  # to look at what landed
    bucket: str


@pytest.fixture(params=["moto", "s3rver"])
def store(request: pytest.FixtureRequest) -> Store:
    """An empty bucket on each S3 implementation."""
    if request.param == "moto":
        bucket = request.getfixturevalue("bucket")
        return Store(request.getfixturevalue("s3_env"), request.getfixturevalue("s3"), bucket)
    return s3rver_store(request.getfixturevalue("s3rver"))


def s3rver_store(endpoint: str) -> Store:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        aws_access_key_id=S3RVER_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3RVER_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    bucket = f"test-{uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return Store({"S3_BUCKET": bucket, "S3_ENDPOINT_URL": endpoint, **S3RVER_CREDENTIALS}, client, bucket)


def test_ready_on_each_store(store: Store, start_server: StartServer, http: httpx.Client) -> None:
    server = start_server(store.settings)
    response = http.get(f"{server.base_url}/ready")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


def test_ready_without_the_bucket_says_so_on_each_store(
    store: Store, start_server: StartServer, http: httpx.Client
) -> None:
    server = start_server({**store.settings, "S3_BUCKET": f"missing-{uuid4().hex[:12]}"})
    response = http.get(f"{server.base_url}/ready")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"


@pytest.mark.parametrize("size", [300 * 1024, 11 * MiB], ids=["one-put", "three-parts"])
def test_upload_downloads_through_its_link_on_each_store(
    store: Store, start_server: StartServer, http: httpx.Client, size: int
) -> None:
    server = start_server(store.settings)
    data = os.urandom(size)

    answer = upload(http, server, data)

    download = http.get(answer["url"])
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["content-type"] == "application/pdf"
    assert f"filename*=UTF-8''{quote(FILENAME, safe='')}" in download.headers["content-disposition"]
    key = s3_key(answer["url"], store.bucket)
    sha256 = hashlib.sha256(data).hexdigest()
    assert answer["sha256"] == sha256
    head = store.client.head_object(Bucket=store.bucket, Key=key)
    tags = store.client.get_object_tagging(Bucket=store.bucket, Key=key)["TagSet"]
    carried = head["Metadata"] | {tag["Key"]: tag["Value"] for tag in tags}
    assert carried == {"sha256": sha256}


def test_generate_downloads_a_png_through_its_link_on_each_store(
    store: Store, start_server: StartServer, http: httpx.Client
) -> None:
    server = start_server(store.settings)

    response = http.post(f"{server.base_url}/generate", json={"prompt": "a lighthouse at dusk"})

    assert response.status_code == 200, response.text
    download = http.get(response.json()["url"])
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(download.content)) as image:
        assert image.format == "PNG"
    assert re.fullmatch(r"generated/[0-9a-f]{32}\.png", s3_key(response.json()["url"], store.bucket))


# ---------------------------------------------------------------- where s3rver is not quite S3


@pytest.fixture
def s3rver_storage(s3rver: str, monkeypatch: pytest.MonkeyPatch) -> storage.S3Storage:
    """The service's S3 store on a fresh s3rver bucket."""
    for name, value in S3RVER_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return storage.make_s3_storage(
        bucket=s3rver_store(s3rver).bucket,
        presign_ttl_seconds=60,
        region="us-east-1",
        endpoint_url=s3rver,
        connect_timeout=1,
        read_timeout=5,
    )


def test_s3rver_completion_repeated_after_it_finished_is_a_success(s3rver_storage: storage.S3Storage) -> None:
    """s3rver answers a completion of an upload it has finished with InternalError, not NoSuchUpload, and
    gives a multipart object a plain MD5 for its ETag, without S3's part count: the object is found by its size."""
    data = os.urandom(2 * storage.MULTIPART_THRESHOLD + 1)
    upload = s3rver_storage.begin(f"uploads/{uuid4().hex}", content_type="text/plain", content_disposition="a")
    upload.write([data[: storage.MULTIPART_THRESHOLD]])
    upload.write([data[storage.MULTIPART_THRESHOLD : 2 * storage.MULTIPART_THRESHOLD]])
    upload_id = upload.upload_id
    upload.commit([data[2 * storage.MULTIPART_THRESHOLD :]])

    upload.upload_id = upload_id  # as if its answer had been lost and the completion were sent again
    upload.complete(len(data))

    landed = s3rver_storage.client.get_object(Bucket=s3rver_storage.bucket, Key=upload.object["Key"])
    assert landed["Body"].read() == data
    assert "-" not in landed["ETag"]
