"""The real server process, started as a user would: `python gen_service.py`, configured by its environment."""

from __future__ import annotations

import io
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit
from uuid import uuid4

import dockerfile
import httpx
import pytest
from PIL import Image

from conftest import free_port

SCRIPT = Path(__file__).resolve().parent.parent / "gen_service.py"
FILENAME = 'résumé "final".pdf'
STARTUP_SECONDS = 15
# The developer's shell may set any of these; each test runs with exactly the settings it names.
SERVICE_VARIABLES = re.compile(
    r"HOST|PORT|S3_\w+|s3_\w+|LOCAL_STORAGE_DIR|PUBLIC_BASE_URL|MAX_UPLOAD_BYTES|MAX_PROMPT_CHARS|API_TOKEN"
)


class Server(NamedTuple):
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


StartServer = Callable[..., Server]


def service_env(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """os.environ without the service's settings, on a free loopback port, plus `overrides` (None unsets)."""
    env = {name: value for name, value in os.environ.items() if not SERVICE_VARIABLES.fullmatch(name)}
    env.update(HOST="127.0.0.1", PORT=str(free_port()), PYTHONUNBUFFERED="1")
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def wait_until_healthy(http: httpx.Client, server: Server) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with status {server.process.returncode}:\n{server.log()}")
        # Another process may hold the port picked for us: only our own log proves the bind is ours.
        if f"Uvicorn running on {server.base_url}" in server.log():
            try:
                if http.get(f"{server.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    pytest.fail(f"server did not answer /health within {STARTUP_SECONDS} s:\n{server.log()}")


def stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, as a supervisor would, then SIGKILL if the process is still there after `timeout`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A client that ignores proxy settings, so nothing it sends leaves loopback."""
    with httpx.Client(trust_env=False, timeout=10) as client:
        yield client


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The server's working directory, where `./data` and `.env` resolve."""
    path = tmp_path / "workdir"
    path.mkdir()
    return path


@pytest.fixture
def start_server(http: httpx.Client, workdir: Path, tmp_path: Path) -> Iterator[StartServer]:
    """Starts `python gen_service.py` and waits for /health; stops every process it started at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(env_overrides: Mapping[str, str | None], cwd: Path = workdir) -> Server:
        env = service_env(env_overrides)
        log_path = tmp_path / f"server-{len(processes)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([sys.executable, str(SCRIPT)], cwd=cwd, env=env, stdout=log, stderr=log)
        processes.append(process)
        server = Server(f"http://127.0.0.1:{env['PORT']}", process, log_path)
        wait_until_healthy(http, server)
        return server

    yield start
    for process in processes:
        stop(process)


@pytest.fixture
def s3_env(moto_server: str, bucket: str) -> dict[str, str | None]:
    """Settings for the S3 store on the moto server."""
    return {"S3_BUCKET": bucket, "S3_ENDPOINT_URL": moto_server}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The local store's directory, outside the working directory."""
    return tmp_path / "data"


@pytest.fixture
def local_server(start_server: StartServer, data_dir: Path) -> Server:
    """The server on the local store, its links on itself (no PUBLIC_BASE_URL)."""
    return start_server({"LOCAL_STORAGE_DIR": str(data_dir)})


def upload(http: httpx.Client, server: Server, data: bytes) -> dict[str, Any]:
    """POST /upload with `data` as the `file` part, named FILENAME, type application/pdf."""
    response = http.post(f"{server.base_url}/upload", files={"file": (FILENAME, data, "application/pdf")})
    assert response.status_code == 200, response.text
    return response.json()


def query_value(url: str, name: str) -> str:
    [value] = parse_qs(urlsplit(url).query)[name]
    return value


def s3_key(url: str, bucket: str) -> str:
    """The object key of a path-style presigned URL."""
    path = urlsplit(url).path
    assert path.startswith(f"/{bucket}/"), url
    return path.removeprefix(f"/{bucket}/")


def keys_in(s3: Any, bucket: str, prefix: str) -> list[str]:
    return [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def write_dotenv(directory: Path, values: Mapping[str, str]) -> None:
    (directory / ".env").write_text("".join(f"{name}={value}\n" for name, value in values.items()))


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
    ],
    ids=["ttl-soon", "ttl-0", "ttl-over-7-days", "empty-bucket"],
)
def test_invalid_setting_stops_the_process(workdir: Path, overrides: dict[str, str]) -> None:
    [name] = overrides

    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        cwd=workdir,
        env=service_env(overrides),
        capture_output=True,
        text=True,
        timeout=30,
    )

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


# ---------------------------------------------------------------- client faults and the container


def temp_files_held(process: subprocess.Popen[bytes], directory: Path) -> list[str]:
    """Files under `directory` the process still has open (spooled uploads are unlinked at once)."""
    fd_dir = Path(f"/proc/{process.pid}/fd")
    return [target for fd in fd_dir.iterdir() if (target := os.readlink(fd)).startswith(str(directory))]


@pytest.mark.parametrize("store", ["local", "s3"])
def test_client_leaving_mid_upload_leaves_nothing(
    start_server: StartServer,
    http: httpx.Client,
    tmp_path: Path,
    data_dir: Path,
    s3: Any,
    bucket: str,
    s3_env: dict[str, str | None],
    store: str,
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    settings = s3_env if store == "s3" else {"LOCAL_STORAGE_DIR": str(data_dir)}
    server = start_server({**settings, "TMPDIR": str(spool)})
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
    # More than the 1 MiB that Starlette keeps in memory, so the part is spooled to TMPDIR.
    sent = head + os.urandom(3 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1]))) as connection:
        connection.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {len(sent) + 1024 * 1024}\r\n\r\n".encode()
            + sent
        )
    deadline = time.monotonic() + 10
    while "client disconnected" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)

    assert "client disconnected before sending the whole body of POST /upload" in server.log()
    assert temp_files_held(server.process, spool) == []
    assert list(spool.iterdir()) == []
    assert keys_in(s3, bucket, "") == []
    assert not (data_dir / "uploads").exists() or list((data_dir / "uploads").iterdir()) == []
    assert upload(http, server, b"next one")["url"]
    assert "Traceback" not in server.log()


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
