"""When S3 refuses, is down or stalls, callers get 502/503/504 in JSON, health stays up, and the
service works again as soon as S3 does."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

import gen_service
from conftest import asgi_client, free_port
from gen_service import Settings

pytestmark = pytest.mark.anyio

ROUTE_CALLS = {
    "/generate": {"json": {"prompt": "a fox"}},
    "/upload": {"files": {"file": ("a.txt", b"data", "text/plain")}},
}
FAST_TIMEOUTS = {"s3_connect_timeout_seconds": 0.5, "s3_read_timeout_seconds": 0.5}


async def client_for(settings: Settings) -> httpx.AsyncClient:
    return await asgi_client(gen_service.create_app(replace(settings, **FAST_TIMEOUTS)))


@pytest.fixture
def stalling_endpoint() -> Iterator[str]:
    """An endpoint that accepts connections and reads requests but never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for connection in held:
        connection.close()


async def post(client: httpx.AsyncClient, path: str) -> httpx.Response:
    return await client.post(path, **ROUTE_CALLS[path])  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ROUTE_CALLS)
async def test_missing_bucket_is_502(moto_server: str, path: str) -> None:
    async with await client_for(Settings(s3_bucket="no-such-bucket", s3_endpoint_url=moto_server)) as client:
        response = await post(client, path)
        assert response.status_code == 502
        assert response.json() == {"detail": "storage refused the request (NoSuchBucket)"}
        assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize("path", ROUTE_CALLS)
async def test_stalled_s3_is_504_within_the_timeouts(stalling_endpoint: str, path: str) -> None:
    async with await client_for(Settings(s3_bucket="assets", s3_endpoint_url=stalling_endpoint)) as client:
        started = time.monotonic()
        response = await post(client, path)
        assert response.status_code == 504
        assert response.json() == {"detail": "storage did not answer in time"}
        # Three attempts of up to 1.5 s each (100-continue wait plus read timeout) and up to 3 s of backoff.
        assert time.monotonic() - started < 10
        assert (await client.get("/health")).status_code == 200


@pytest.fixture
def absent_s3_port() -> Iterator[int]:
    """A loopback port where S3 is down now, and where a test can bring one up."""
    yield free_port()


@pytest.mark.parametrize("path", ROUTE_CALLS)
async def test_unreachable_s3_is_503_and_recovers_by_itself(absent_s3_port: int, path: str) -> None:
    endpoint = f"http://127.0.0.1:{absent_s3_port}"
    async with await client_for(Settings(s3_bucket="assets", s3_endpoint_url=endpoint)) as client:
        response = await post(client, path)
        assert response.status_code == 503
        assert response.json() == {"detail": "storage is unreachable"}
        assert (await client.get("/health")).status_code == 200

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=absent_s3_port, verbose=False)
        server.start()
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="assets")
            response = await post(client, path)
            assert response.status_code == 200, response.text
        finally:
            server.stop()
