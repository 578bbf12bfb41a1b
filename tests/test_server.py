"""The real server process, started as a user would: `python gen_service.py`, configured by its environment."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit
from uuid import uuid4

import dockerfile
import httpx
import pytest
from PIL import Image

from conftest import (
    FILENAME,
    SCRIPT,
    Server,
    StartServer,
    exit_of,
    free_port,
    keys_in,
    query_value,
    s3_key,
    stop,
    upload,
    write_dotenv,
)

# ---------------------------------------------------------------- S3


def test_s3_upload_downloads_from_presigned_link(
    start_server: StartServer, http: httpx.Client, s3: Any, bucket: str, s3_env: dict[str, str | None]
) -> None:
    server = start_server({**s3_env, "S3_PRESIGN_TTL_SECONDS": "900"})
    data = os.urandom(300 * 1024)

    answer = upload(http, server, data)

    assert answer["filename"] == FILENAME
    url = answer["url"]
    assert re.fullmatch(rf"/{bucket}/uploads/[0-9a-f]{{32}}", urlsplit(url).path)
    assert query_value(url, "X-Amz-Algorithm") == "AWS4-HMAC-SHA256"
    assert query_value(url, "X-Amz-Expires") == "900"
    assert "/us-east-1/s3/aws4_request" in query_value(url, "X-Amz-Credential")
    download = http.get(url)
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["content-type"] == "application/pdf"
    encoded_name = re.search(r"filename\*=UTF-8''([^;\s]+)", download.headers["content-disposition"])
    assert encoded_name is not None
    assert encoded_name[1] == quote(FILENAME, safe="")
    assert unquote(encoded_name[1]) == FILENAME
    key = s3_key(url, bucket)
    assert keys_in(s3, bucket, "uploads/") == [key]
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_s3_generate_stores_a_png(
    start_server: StartServer, http: httpx.Client, s3: Any, bucket: str, s3_env: dict[str, str | None]
) -> None:
    server = start_server(s3_env)

    response = http.post(f"{server.base_url}/generate", json={"prompt": "a lighthouse at dusk"})

    assert response.status_code == 200, response.text
    url = response.json()["url"]
    download = http.get(url)
    assert download.status_code == 200
    assert download.content.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(download.content)) as image:
        assert image.size == (512, 512)
    key = s3_key(url, bucket)
    assert re.fullmatch(r"generated/[0-9a-f]{32}\.png", key)
    assert keys_in(s3, bucket, "generated/") == [key]


# ---------------------------------------------------------------- local store


def test_local_upload_downloads_from_signed_link(local_server: Server, http: httpx.Client) -> None:
    data = os.urandom(300 * 1024)

    url = upload(http, local_server, data)["url"]

    assert re.match(rf"{re.escape(local_server.base_url)}/files/uploads/[0-9a-f]{{32}}\?", url)
    download = http.get(url)
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["content-type"] == "application/pdf"
    assert f"filename*=UTF-8''{quote(FILENAME, safe='')}" in download.headers["content-disposition"]


def other_signature(key: str, expires: str, signature: str) -> tuple[str, str, str]:
    return key, expires, signature[:-1] + ("1" if signature[-1] == "0" else "0")


def other_key(key: str, expires: str, signature: str) -> tuple[str, str, str]:
    return f"uploads/{uuid4().hex}", expires, signature


def later_expiry(key: str, expires: str, signature: str) -> tuple[str, str, str]:
    return key, str(int(expires) + 3600), signature


@pytest.mark.parametrize("tamper", [other_signature, other_key, later_expiry])
def test_local_tampered_link_is_refused(
    local_server: Server, http: httpx.Client, tamper: Callable[[str, str, str], tuple[str, str, str]]
) -> None:
    data = os.urandom(1024)
    url = upload(http, local_server, data)["url"]
    key = urlsplit(url).path.removeprefix("/files/")
    key, expires, signature = tamper(key, query_value(url, "expires"), query_value(url, "signature"))

    response = http.get(f"{local_server.base_url}/files/{key}", params={"expires": expires, "signature": signature})

    assert response.status_code == 403
    assert response.json()["detail"]
    assert data not in response.content


def test_local_link_expires(start_server: StartServer, http: httpx.Client, data_dir: Path) -> None:
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "S3_PRESIGN_TTL_SECONDS": "1"})
    url = upload(http, server, b"soon gone")["url"]
    # Links carry whole seconds, so a 1 s link may live almost 2 s.
    time.sleep(2.5)

    response = http.get(url)

    assert response.status_code == 403
    assert "expired" in response.json()["detail"]


def test_local_signing_key_is_private(local_server: Server, data_dir: Path) -> None:
    assert stat.S_IMODE((data_dir / ".signing-key").stat().st_mode) == 0o600


def test_local_link_survives_restart(start_server: StartServer, http: httpx.Client, data_dir: Path) -> None:
    settings = {"LOCAL_STORAGE_DIR": str(data_dir), "PORT": str(free_port())}
    first = start_server(settings)
    data = os.urandom(1024)
    url = upload(http, first, data)["url"]
    stop(first.process)

    start_server(settings)

    download = http.get(url)
    assert download.status_code == 200
    assert download.content == data


@pytest.mark.parametrize(
    "path",
    ["/files/..%2f.signing-key?{query}", "/files/%2e%2e/%2e%2e/etc/passwd?{query}", "/files//etc/passwd?{query}"],
)
def test_local_path_traversal_is_refused(local_server: Server, http: httpx.Client, data_dir: Path, path: str) -> None:
    # A genuine link's expiry and signature, so that only the path is wrong.
    query = urlsplit(upload(http, local_server, b"x")["url"]).query

    response = http.get(local_server.base_url + path.format(query=query))

    # Clients may normalise dot segments; this checks the server was sent the path under test.
    assert response.request.url.raw_path.decode() == path.format(query=query)
    assert response.status_code in (403, 404)
    assert response.json()["detail"]
    assert (data_dir / ".signing-key").read_bytes() not in response.content
    assert b"root:" not in response.content


def test_local_startup_log_names_directory(local_server: Server, data_dir: Path) -> None:
    assert f"local directory {str(data_dir.resolve())!r}" in local_server.log()


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "overrides",
    [
        {"S3_PRESIGN_TTL_SECONDS": "soon"},
        {"S3_PRESIGN_TTL_SECONDS": "0"},
        {"S3_PRESIGN_TTL_SECONDS": "604801"},
        {"S3_BUCKET": ""},
        {"MAX_UPLOAD_BYTES": str(10_000 * 5 * 1024 * 1024 + 1)},  # more than 10,000 parts of 5 MiB
    ],
    ids=["ttl-soon", "ttl-0", "ttl-over-7-days", "empty-bucket", "upload-over-s3-parts"],
)
def test_invalid_setting_stops_the_process(workdir: Path, overrides: dict[str, str]) -> None:
    [name] = overrides

    result = exit_of(workdir, overrides)

    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert name in result.stderr
    assert "Traceback" not in result.stderr


def test_old_lower_case_names(
    start_server: StartServer, http: httpx.Client, s3: Any, bucket: str, moto_server: str
) -> None:
    server = start_server({"s3_bucket": bucket, "S3_ENDPOINT_URL": moto_server, "s3_presign_ttl_seconds": "120"})

    url = upload(http, server, b"old names")["url"]

    assert query_value(url, "X-Amz-Expires") == "120"
    assert keys_in(s3, bucket, "uploads/") == [s3_key(url, bucket)]


def test_dotenv_credentials_reach_boto3(
    start_server: StartServer, http: httpx.Client, s3: Any, bucket: str, moto_server: str, workdir: Path
) -> None:
    write_dotenv(
        workdir,
        {
            "S3_BUCKET": bucket,
            "S3_ENDPOINT_URL": moto_server,
            "AWS_ACCESS_KEY_ID": "fromdotenv",
            "AWS_SECRET_ACCESS_KEY": "x",
        },
    )
    server = start_server({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, workdir)

    url = upload(http, server, b"configured by .env")["url"]

    assert query_value(url, "X-Amz-Credential").startswith("fromdotenv/")
    assert keys_in(s3, bucket, "uploads/") == [s3_key(url, bucket)]


def test_environment_wins_over_dotenv(
    start_server: StartServer, http: httpx.Client, workdir: Path, s3_env: dict[str, str | None]
) -> None:
    write_dotenv(workdir, {"S3_PRESIGN_TTL_SECONDS": "100"})
    server = start_server({**s3_env, "S3_PRESIGN_TTL_SECONDS": "300"}, workdir)

    url = upload(http, server, b"env first")["url"]

    assert query_value(url, "X-Amz-Expires") == "300"


# ---------------------------------------------------------------- the container


def test_dockerfile_healthcheck_passes_against_the_service(start_server: StartServer, data_dir: Path) -> None:
    check = next(
        command for command in dockerfile.parse_file(str(SCRIPT.parent / "Dockerfile")) if command.cmd == "HEALTHCHECK"
    )
    argv = [sys.executable if word == "python" else word for word in check.value[1:]]
    port = str(free_port())
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "PORT": port})

    assert subprocess.run(argv, env={**os.environ, "PORT": port}, timeout=10).returncode == 0
    stop(server.process)
    assert subprocess.run(argv, env={**os.environ, "PORT": port}, timeout=10, capture_output=True).returncode != 0
