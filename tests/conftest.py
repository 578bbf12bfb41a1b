"""Fixtures: a clean AWS environment, moto (in-process mock and real HTTP server), s3rver, the app, a client."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

import boto3
import httpx
import pytest
import trustme
from moto import mock_aws
from moto.server import ThreadedMotoServer
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import gen_service
import providers.cog
from fake_providers import API_KEY, FakeProviders, InternalService, Served
from settings import Settings
from storage import LocalStorage

Download = Callable[[str], Awaitable[httpx.Response]]


class Certificate(NamedTuple):
    server: Path  # key and certificate chain, in one PEM file
    authority: Path


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials, and nothing of the real machine's AWS setup, so no test can reach AWS."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real S3 endpoint on loopback; presigned URLs against it download the object."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


S3RVER_DIR = Path(__file__).resolve().parent / "s3rver"
S3RVER_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER"}  # its one account
S3RVER_LISTENING = re.compile(r"S3rver listening on 127\.0\.0\.1:(\d+)")


def installed_s3rver() -> Path:
    """s3rver's script, installed with `npm ci` from tests/s3rver's lock file when it is missing or another version."""
    installed = S3RVER_DIR / "node_modules" / "s3rver"
    locked = json.loads((S3RVER_DIR / "package-lock.json").read_text())["packages"]["node_modules/s3rver"]["version"]
    if (
        not (installed / "package.json").exists()
        or json.loads((installed / "package.json").read_text())["version"] != locked
    ):
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(
                "the tests run s3rver, a Node S3 server: install Node.js with npm (npm ci then installs s3rver)"
            )
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=S3RVER_DIR, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"npm ci in {S3RVER_DIR} failed:\n{done.stdout}{done.stderr}")
    return installed / "bin" / "s3rver.js"


@pytest.fixture(scope="session")
def s3rver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """s3rver (npm `s3rver`), a second S3 implementation, on a free loopback port: its endpoint URL."""
    script, node = installed_s3rver(), shutil.which("node")
    if node is None:
        pytest.fail("the tests run s3rver, a Node S3 server: install Node.js")
    directory = tmp_path_factory.mktemp("s3rver")
    log_path = directory / "s3rver.log"
    with log_path.open("wb") as log:
        command = [node, str(script), "-d", str(directory / "data"), "-a", "127.0.0.1", "-p", "0"]
        process = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        wait_until(lambda: process.poll() is not None or S3RVER_LISTENING.search(log_path.read_text()) is not None, 30)
        if (listening := S3RVER_LISTENING.search(log_path.read_text())) is None:
            pytest.fail(f"s3rver did not start (exit status {process.poll()}):\n{log_path.read_text()}")
        yield f"http://127.0.0.1:{listening[1]}"
    finally:
        stop(process)


@pytest.fixture
def s3(moto_server: str) -> object:
    """A boto3 client for the moto server, to look at what landed in the bucket."""
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


@pytest.fixture
def bucket(s3: object) -> str:
    name = f"test-{uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)  # type: ignore[attr-defined]
    return name


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    return Settings(local_storage_dir=tmp_path / "data", public_base_url="http://testserver")


@pytest.fixture
def s3_settings(moto_server: str, bucket: str) -> Settings:
    return Settings(s3_bucket=bucket, s3_endpoint_url=moto_server)


@pytest.fixture
def mocked_s3() -> Iterator[object]:
    """moto's in-process mock with an empty bucket named `assets`; the app is built inside it."""
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="assets")
        yield client


@pytest.fixture
def mocked_settings(mocked_s3: object) -> Settings:
    return Settings(s3_bucket="assets")


@pytest.fixture(params=["local", "s3"])
def backend_settings(request: pytest.FixtureRequest) -> Settings:
    """The same tests run against both stores."""
    return request.getfixturevalue(f"{request.param}_settings")


@pytest.fixture
def app_factory() -> Callable[..., Starlette]:
    def make(settings: Settings, **overrides: object) -> Starlette:
        return gen_service.create_app(replace(settings, **overrides))

    return make


# What RFC 9110 allows in a header value; uvicorn refuses a response start with anything else.
FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def as_servers_send(app: ASGIApp) -> ASGIApp:
    """The app, its response headers checked as a real server checks them (httpx's ASGI transport does not)."""

    async def checked(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_checked(message: Message) -> None:
            if message["type"] == "http.response.start":
                for _, value in message.get("headers", []):
                    if not FIELD_VALUE.fullmatch(value):
                        raise RuntimeError(f"invalid HTTP header value {value!r}")
            await send(message)

        await app(scope, receive, send_checked)

    return checked


async def asgi_client(app: Starlette, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """A client of the app in process, whose response headers are checked as a server would; with
    `raise_app_exceptions=False`, an unexpected error comes back as the 500 a caller would get instead of
    as an exception in the test."""
    transport = httpx.ASGITransport(app=as_servers_send(app), raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.fixture
async def client(backend_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app on the current backend."""
    async with await asgi_client(gen_service.create_app(backend_settings)) as client:
        yield client


@pytest.fixture
async def download(client: httpx.AsyncClient) -> AsyncIterator[Download]:
    """GET a link the service handed out: local links through the app, S3 links from moto over HTTP."""
    async with httpx.AsyncClient() as network:

        async def get(url: str) -> httpx.Response:
            return await (client if url.startswith("http://testserver/") else network).get(url)

        yield get


# A thread a test holds gives up after this, so a service that waits on it fails the test instead of hanging it.
HOLD_SECONDS = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the real server process


SCRIPT = Path(__file__).resolve().parent.parent / "gen_service.py"
FILENAME = 'résumé "final".pdf'
STARTUP_SECONDS = 15
# The developer's shell may set any of these; each test runs with exactly the settings it names.
SERVICE_VARIABLES = re.compile(
    r"HOST|PORT|S3_\w+|s3_\w+|LOCAL_STORAGE_DIR|PUBLIC_BASE_URL|MAX_UPLOAD_BYTES|MAX_PROMPT_CHARS|API_TOKEN"
    r"|LOG_FORMAT|LOG_LEVEL|SHUTDOWN_GRACE_SECONDS|WORKERS|KEEP_ALIVE_SECONDS"
    r"|IMAGE_\w+|OPENAI_\w+|COG_\w+|REPLICATE_\w+|GENERATE_\w+|MAX_IMAGE_BYTES|SSL_CERT_FILE"
)


class Server(NamedTuple):
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def threads(self) -> int:
        """How many threads the server process has now."""
        return len(list(Path(f"/proc/{self.process.pid}/task").iterdir()))


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
        try:
            if http.get(f"{server.base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"server did not answer /health within {STARTUP_SECONDS} s:\n{server.log()}")


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Polls `condition` until it holds or `seconds` have passed; the caller then asserts it."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def exit_of(workdir: Path, overrides: Mapping[str, str | None]) -> subprocess.CompletedProcess[str]:
    """`python gen_service.py` with `overrides`, for settings that must stop it before it serves."""
    command = [sys.executable, str(SCRIPT)]
    return subprocess.run(command, cwd=workdir, env=service_env(overrides), capture_output=True, text=True, timeout=30)


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


def made(directory: Path) -> Path:
    directory.mkdir()
    return directory


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The server's working directory, where `./data` and `.env` resolve."""
    return made(tmp_path / "workdir")


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


def temp_files_held(process: subprocess.Popen[bytes], directory: Path) -> list[str]:
    """Files under `directory` the process has open (a spooled upload would be unlinked at once)."""
    held = []
    for fd in Path(f"/proc/{process.pid}/fd").iterdir():
        with suppress(FileNotFoundError):  # closed between the listing and the readlink
            if (target := os.readlink(fd)).startswith(str(directory)):
                held.append(target)
    return held


async def in_chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """The body with no Content-Length (chunked): the service cannot know its size ahead."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


# ---------------------------------------------------------------- the real server on either store


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """The server's TMPDIR, where Starlette would spool uploads (the service streams them instead)."""
    return made(tmp_path / "spool")


@pytest.fixture
def server_env() -> dict[str, str]:
    """Settings for `server`; a test module overrides this fixture to set its own."""
    return {}


@pytest.fixture(params=["local", "s3"])
def server(
    request: pytest.FixtureRequest,
    start_server: StartServer,
    spool: Path,
    data_dir: Path,
    s3_env: dict[str, str | None],
    server_env: dict[str, str],
) -> Server:
    """The real server on each store, with `server_env` and its TMPDIR in `spool`."""
    store = s3_env if request.param == "s3" else {"LOCAL_STORAGE_DIR": str(data_dir)}
    return start_server({**store, **server_env, "TMPDIR": str(spool)})


def multipart_uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def stored_files(data_dir: Path) -> list[Path]:
    return [path for path in data_dir.rglob("*") if path.is_file() and path.name != ".signing-key"]


def generated_images(data_dir: Path) -> list[Path]:
    """The images /generate stored in the local store at `data_dir`."""
    return [path for path in (data_dir / "generated").glob("*") if path.is_file()]


def spool_is_released(server: Server, spool: Path) -> bool:
    return not temp_files_held(server.process, spool) and not any(spool.iterdir())


@pytest.fixture
def assert_nothing_left(server: Server, spool: Path, data_dir: Path, s3: Any, bucket: str) -> Callable[[], None]:
    """Asserts, of `server`: no object or unfinished multipart upload, no file in the store, no temporary
    file on disk or held open, no traceback in the log."""

    def check() -> None:
        wait_until(lambda: spool_is_released(server, spool) and not multipart_uploads(s3, bucket))
        assert temp_files_held(server.process, spool) == []
        assert list(spool.iterdir()) == []
        assert keys_in(s3, bucket, "") == []
        assert multipart_uploads(s3, bucket) == []
        assert stored_files(data_dir) == []
        assert "Traceback" not in server.log()

    return check


def stored_before_types_were_checked(store: LocalStorage) -> str:
    """The link to a file whose Content-Type (a bare LF in it) no server will write in a header."""
    key = f"uploads/{'0' * 32}"
    store.put(key, io.BytesIO(b"old"), content_type="text/plain\n;x", content_disposition="attachment")
    return store.link(key).url


# ---------------------------------------------------------------- fake image providers


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A TLS certificate for 127.0.0.1 and localhost, and the CA that signed it (to trust with SSL_CERT_FILE)."""
    authority = trustme.CA()
    directory = tmp_path_factory.mktemp("tls")
    certificate = Certificate(directory / "server.pem", directory / "ca.pem")
    authority.cert_pem.write_to_path(str(certificate.authority))
    authority.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(certificate.server))
    return certificate


@pytest.fixture(scope="session")
def served_providers(certificate: Certificate) -> Iterator[FakeProviders]:
    """The fake image providers on 127.0.0.1, over HTTP and, at their `https_url`, over HTTPS."""
    providers = FakeProviders()
    http, https = Served(providers.app), Served(providers.app, certificate.server)
    providers.base_url, providers.https_url = http.url, https.url
    yield providers
    http.close()
    https.close()


@pytest.fixture
def fake(served_providers: FakeProviders, certificate: Certificate, monkeypatch: pytest.MonkeyPatch) -> FakeProviders:
    """The fake providers with no plan and nothing seen; their CA is trusted by HTTP clients made from now on."""
    served_providers.reset()
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate.authority))
    return served_providers


@pytest.fixture(scope="session")
def served_internal() -> Iterator[InternalService]:
    service = InternalService()
    served = Served(service.app)
    service.base_url = served.url
    yield service
    served.close()


@pytest.fixture
def internal(served_internal: InternalService) -> InternalService:
    """A private-network service on another port of 127.0.0.1, which no provider's link may reach; nothing seen."""
    served_internal.seen.clear()
    return served_internal


MODEL = "acme/painter"  # the Replicate model the fakes answer for
MakeSettings = Callable[..., Settings]


@pytest.fixture
def remote(local_settings: Settings, fake: FakeProviders, monkeypatch: pytest.MonkeyPatch) -> MakeSettings:
    """Settings of a remote backend pointed at the fakes, on the local store; Replicate is polled every 50 ms."""
    monkeypatch.setattr(providers.cog, "POLL_SECONDS", 0.05)

    def make(backend: str, **overrides: object) -> Settings:
        endpoints: dict[str, dict[str, object]] = {
            "openai": {"openai_base_url": f"{fake.base_url}/v1", "openai_api_key": API_KEY},
            "cog": {"cog_url": fake.base_url},
            "replicate": {
                "replicate_base_url": f"{fake.base_url}/v1",
                "replicate_api_token": API_KEY,
                "replicate_model": MODEL,
            },
        }
        return replace(local_settings, image_backend=backend, **{**endpoints[backend], **overrides})

    return make


BACKEND_ENV = {
    "openai": lambda fake: {"OPENAI_BASE_URL": f"{fake.base_url}/v1", "OPENAI_API_KEY": API_KEY},
    "cog": lambda fake: {"COG_URL": fake.base_url},
    "replicate": lambda fake: {
        "REPLICATE_BASE_URL": f"{fake.base_url}/v1",
        "REPLICATE_API_TOKEN": API_KEY,
        "REPLICATE_MODEL": MODEL,
    },
}


def remote_server(start_server: StartServer, fake: FakeProviders, data_dir: Path, backend: str, **env: str) -> Server:
    """The real server on the local store with `backend` pointed at the fakes."""
    return start_server(
        {"LOCAL_STORAGE_DIR": str(data_dir), "IMAGE_BACKEND": backend, **BACKEND_ENV[backend](fake), **env}
    )


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app, with its lifespan run (which opens and closes the providers' HTTP client)."""
    app = gen_service.create_app(settings)
    async with app.router.lifespan_context(app), await asgi_client(app) as client:
        yield client
