"""Fixtures: a clean AWS environment, moto (in-process mock and real HTTP server), the app, a client."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from uuid import uuid4

import boto3
import httpx
import pytest
from moto import mock_aws
from moto.server import ThreadedMotoServer
from starlette.applications import Starlette

import gen_service
from gen_service import Settings

Download = Callable[[str], Awaitable[httpx.Response]]


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


async def asgi_client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
