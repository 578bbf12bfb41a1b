"""Faults between the service and S3 (injected by tests/fault_proxy.py) and faults of clients of the real server:
each ends in a JSON answer within a known time, with nothing stored, nothing left behind, and the service working."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from botocore.credentials import RefreshableCredentials
from botocore.exceptions import CredentialRetrievalError
from starlette.applications import Starlette

import gen_service
import storage
from conftest import (
    HOLD_SECONDS,
    Server,
    StartServer,
    asgi_client,
    keys_in,
    multipart_uploads,
    temp_files_held,
    upload,
    wait_until,
)
from fault_proxy import Cut, Fail, FaultProxy, Hold, Lose, Mode, PassThrough, Refuse, Stall
from raw_http import CHUNK, FORM_HEADERS, connect, form, read_answer, request_head
from settings import Settings

MiB = 1024 * 1024
CONNECT_TIMEOUT = 0.5
READ_TIMEOUT = 0.5
# The service's boto3 client: standard retry mode, 3 attempts in all, jittered backoff of at most 1 s then 2 s
# (throttling errors; 0.05 s then 0.1 s for the others).
ATTEMPTS = 3
BACKOFF_SECONDS = 1 + 2
# botocore sends a PUT's body only after `100 Continue`, or after waiting 1 s for it.
CONTINUE_WAIT_SECONDS = 1
# Room for rendering, multipart parsing and a machine busy with other tests.
SLACK_SECONDS = 1
REFUSED_BOUND_SECONDS = ATTEMPTS * CONNECT_TIMEOUT + BACKOFF_SECONDS + SLACK_SECONDS  # 5.5 s
STALLED_BOUND_SECONDS = (
    ATTEMPTS * (CONNECT_TIMEOUT + CONTINUE_WAIT_SECONDS + READ_TIMEOUT) + BACKOFF_SECONDS + SLACK_SECONDS
)  # 10 s
# The S3 store switches to a multipart upload at 5 MiB.
MULTIPART_FILE_BYTES = 9 * MiB
# Request lines of CompleteMultipartUpload (`POST /<bucket>/<key>?uploadId=...`) and of PutObjectTagging.
COMPLETION = r"^POST /[^ ?]+\?uploadId="
TAGGING = r"^PUT /[^ ?]+\?tagging"
CALLS: dict[str, dict[str, Any]] = {
    "/generate": {"json": {"prompt": "a fox in the snow"}},
    "/upload": {"files": {"file": ("notes.txt", b"a file that S3 may or may not take", "text/plain")}},
}

pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------- S3 faults, through the app


@pytest.fixture
def proxy(moto_server: str) -> Iterator[FaultProxy]:
    """The moto server behind a fault-injecting proxy, passing traffic until a test switches it."""
    endpoint = urlsplit(moto_server)
    proxy = FaultProxy((endpoint.hostname or "127.0.0.1", endpoint.port or 80))
    yield proxy
    proxy.close()


@pytest.fixture
def proxied_settings(proxy: FaultProxy, bucket: str) -> Settings:
    """The S3 store on the proxy, with short timeouts so that faults end quickly."""
    return Settings(
        s3_bucket=bucket,
        s3_endpoint_url=proxy.url,
        s3_connect_timeout_seconds=CONNECT_TIMEOUT,
        s3_read_timeout_seconds=READ_TIMEOUT,
    )


@pytest.fixture
def app(proxied_settings: Settings) -> Starlette:
    """The app on the proxied S3 store."""
    return gen_service.create_app(proxied_settings)


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app on the proxied S3 store (this file's, not conftest's)."""
    async with await asgi_client(app) as client:
        yield client


@pytest.fixture
def s3_calls(app: Starlette) -> list[tuple[str, int | str]]:
    """The S3 operations the app's boto3 client finishes: (name, HTTP status), or (name, error) after retries."""
    calls: list[tuple[str, int | str]] = []

    def record(event_name: str, http_response: Any = None, exception: Exception | None = None, **_: Any) -> None:
        outcome = type(exception).__name__ if exception else http_response.status_code
        calls.append((event_name.rpartition(".")[2], outcome))

    events = app.state.storage.client.meta.events
    events.register("after-call.s3", record)
    events.register("after-call-error.s3", record)
    return calls


async def post(client: httpx.AsyncClient, path: str) -> httpx.Response:
    return await client.post(path, **CALLS[path])


async def timed_post(client: httpx.AsyncClient, path: str, **kwargs: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.post(path, **(kwargs or CALLS[path]))
    return response, time.monotonic() - started


def assert_stored(s3: Any, bucket: str, *answers: dict[str, Any]) -> None:
    """The bucket holds exactly the objects the answers describe, each whole."""
    assert sorted(keys_in(s3, bucket, "")) == sorted(answer["key"] for answer in answers)
    for answer in answers:
        stored = s3.get_object(Bucket=bucket, Key=answer["key"])["Body"].read()
        assert (len(stored), hashlib.sha256(stored).hexdigest()) == (answer["size"], answer["sha256"])


OUTAGES = [
    pytest.param(Refuse(), 503, "storage is unreachable", REFUSED_BOUND_SECONDS, id="refused"),
    pytest.param(Stall(), 504, "storage did not answer in time", STALLED_BOUND_SECONDS, id="stalled"),
]


@pytest.mark.parametrize("path", CALLS)
@pytest.mark.parametrize(("outage", "status", "detail", "bound"), OUTAGES)
async def test_s3_down_answers_within_the_retries(
    client: httpx.AsyncClient,
    proxy: FaultProxy,
    s3: Any,
    bucket: str,
    outage: Mode,
    status: int,
    detail: str,
    bound: float,
    path: str,
) -> None:
    proxy.mode = outage

    response, elapsed = await timed_post(client, path)

    assert response.status_code == status
    assert response.json() == {"detail": detail}
    assert elapsed < bound
    assert keys_in(s3, bucket, "") == []


@pytest.mark.parametrize(("outage", "status"), [(Refuse(), 503), (Stall(), 504)], ids=["refused", "stalled"])
async def test_health_answers_while_an_upload_is_stuck_on_s3(
    app: Starlette, client: httpx.AsyncClient, proxy: FaultProxy, outage: Mode, status: int
) -> None:
    proxy.mode = outage
    failed, answered = threading.Event(), threading.Event()

    def hold_between_attempts(**_: Any) -> None:
        # In the upload's thread, inside its S3 call: an attempt has failed and the next waits for /health.
        failed.set()
        answered.wait(HOLD_SECONDS)

    app.state.storage.client.meta.events.register("needs-retry.s3", hold_between_attempts)
    uploading = asyncio.create_task(post(client, "/upload"))
    assert await asyncio.to_thread(failed.wait, HOLD_SECONDS)

    response = await client.get("/health")
    still_uploading = not uploading.done()
    answered.set()

    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert still_uploading
    assert (await uploading).status_code == status


@pytest.mark.parametrize("path", CALLS)
@pytest.mark.parametrize(("outage", "status"), [(Refuse(), 503), (Stall(), 504)], ids=["refused", "stalled"])
async def test_first_request_after_s3_returns_succeeds(
    client: httpx.AsyncClient, proxy: FaultProxy, s3: Any, bucket: str, outage: Mode, status: int, path: str
) -> None:
    proxy.mode = outage
    assert (await post(client, path)).status_code == status
    proxy.mode = PassThrough()

    response = await post(client, path)

    assert response.status_code == 200, response.text
    assert_stored(s3, bucket, response.json())


async def test_s3_stalling_mid_multipart_upload_is_504_and_aborted(
    client: httpx.AsyncClient, proxy: FaultProxy, s3_calls: list[tuple[str, int | str]], s3: Any, bucket: str
) -> None:
    # CreateMultipartUpload and AbortMultipartUpload fit in 1 MiB of a connection; every UploadPart stalls.
    proxy.mode = Stall(after_bytes=MiB)

    response, elapsed = await timed_post(
        client, "/upload", files={"file": ("big.bin", os.urandom(MULTIPART_FILE_BYTES), "application/octet-stream")}
    )

    assert response.status_code == 504
    assert response.json() == {"detail": "storage did not answer in time"}
    assert elapsed < STALLED_BOUND_SECONDS
    assert proxy.faults_injected >= ATTEMPTS
    assert ("CreateMultipartUpload", 200) in s3_calls
    assert ("UploadPart", "ReadTimeoutError") in s3_calls
    assert ("AbortMultipartUpload", 204) in s3_calls
    assert multipart_uploads(s3, bucket) == []
    assert keys_in(s3, bucket, "") == []


class CountedFile:
    """A file of `size` random bytes that counts how much of it has been read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        size = self.size - self.read_bytes if size < 0 else min(size, self.size - self.read_bytes)
        self.read_bytes += size
        return os.urandom(size)


async def test_s3_failing_mid_upload_stops_reading_the_body(
    client: httpx.AsyncClient, proxy: FaultProxy, s3: Any, bucket: str
) -> None:
    proxy.mode = Stall(after_bytes=MiB)
    body = CountedFile(64 * MiB)

    response = await client.post("/upload", files={"file": ("big.bin", body, "application/octet-stream")})

    assert response.status_code == 504
    # Read: the part being sent, the next one gathered, and the buffers on the way; not the rest of the body.
    assert body.read_bytes < 16 * MiB
    assert multipart_uploads(s3, bucket) == []


async def test_s3_cutting_a_put_body_is_503_and_stores_nothing(
    client: httpx.AsyncClient, proxy: FaultProxy, s3: Any, bucket: str
) -> None:
    proxy.mode = Cut(after_bytes=64 * 1024)

    response, elapsed = await timed_post(
        client, "/upload", files={"file": ("half.bin", os.urandom(MiB), "application/octet-stream")}
    )

    assert response.status_code == 503
    assert response.json() == {"detail": "storage closed the connection"}
    assert elapsed < STALLED_BOUND_SECONDS
    assert proxy.faults_injected == ATTEMPTS
    assert keys_in(s3, bucket, "") == []


@pytest.mark.parametrize("path", CALLS)
async def test_s3_throttling_once_is_retried_unseen(
    client: httpx.AsyncClient, proxy: FaultProxy, s3: Any, bucket: str, path: str
) -> None:
    proxy.mode = Fail(503, "SlowDown", times=1)

    response = await post(client, path)

    assert response.status_code == 200, response.text
    assert proxy.faults_injected == 1
    assert_stored(s3, bucket, response.json())


@pytest.mark.parametrize("path", CALLS)
async def test_s3_failing_every_attempt_is_503(
    client: httpx.AsyncClient, proxy: FaultProxy, s3: Any, bucket: str, path: str
) -> None:
    proxy.mode = Fail(500, "InternalError", times=100)

    response, elapsed = await timed_post(client, path)

    assert response.status_code == 503
    assert response.json() == {"detail": "storage is unavailable (InternalError)"}
    assert elapsed < STALLED_BOUND_SECONDS
    assert proxy.faults_injected == ATTEMPTS
    assert keys_in(s3, bucket, "") == []


def multipart_file() -> dict[str, Any]:
    return {"files": {"file": ("big.bin", os.urandom(MULTIPART_FILE_BYTES), "application/octet-stream")}}


async def test_completion_retried_after_s3_finished_it_is_a_success(
    client: httpx.AsyncClient, proxy: FaultProxy, s3: Any, bucket: str
) -> None:
    # S3 assembles the object but its answer is lost; the retry hears NoSuchUpload, as S3's own may (moto's would
    # complete the upload again), and the object is there.
    no_such_upload = Fail(404, "NoSuchUpload", only=COMPLETION)
    proxy.mode = Fail(500, "InternalError", only=COMPLETION, forward=True, then=no_such_upload)

    response = await client.post("/upload", **multipart_file())

    assert response.status_code == 200, response.text
    assert proxy.faults_injected == 2  # the completion, and its retry
    assert_stored(s3, bucket, response.json())


async def test_completion_that_s3_never_finished_is_the_failure_it_was(
    client: httpx.AsyncClient, proxy: FaultProxy, s3: Any, bucket: str
) -> None:
    proxy.mode = Fail(500, "InternalError", only=COMPLETION, then=Fail(404, "NoSuchUpload", times=100, only=COMPLETION))

    response = await client.post("/upload", **multipart_file())

    assert response.status_code == 502
    assert response.json() == {"detail": "storage refused the request (NoSuchUpload)"}
    assert proxy.faults_injected == 2  # the completion, and its retry
    assert keys_in(s3, bucket, "") == []
    assert multipart_uploads(s3, bucket) == []


# S3's real 403 bodies name the caller (and, for a bad key, its access key id): none of it may reach a client.
ACCESS_DENIED = Fail(
    403, "AccessDenied", times=100, message="User: arn:aws:iam::123456789012:user/testing is not authorized"
)


@pytest.mark.parametrize("path", CALLS)
@pytest.mark.parametrize(
    ("mode", "bucket_name", "code"),
    [(PassThrough(), "no-such-bucket", "NoSuchBucket"), (ACCESS_DENIED, None, "AccessDenied")],
    ids=["missing-bucket", "access-denied"],
)
async def test_s3_refusal_is_502_naming_only_the_code(
    proxied_settings: Settings, proxy: FaultProxy, mode: Mode, bucket_name: str | None, code: str, path: str
) -> None:
    settings = replace(proxied_settings, s3_bucket=bucket_name or proxied_settings.s3_bucket)
    proxy.mode = mode
    async with await asgi_client(gen_service.create_app(settings)) as client:
        response = await post(client, path)

    assert response.status_code == 502
    assert response.json() == {"detail": f"storage refused the request ({code})"}
    for secret in ("testing", "arn:", "http", "127.0.0.1"):
        assert secret not in response.text


# ---------------------------------------------------------------- S3 faults, against the real server

# Longer than every attempt of a call with the short read timeout, and their backoff, together.
COMPLETION_HELD_SECONDS = 4


@pytest.fixture
def proxied_server(start_server: StartServer, proxy: FaultProxy, bucket: str) -> Server:
    """The real server on the proxied S3 store, with short timeouts."""
    timeouts = {"S3_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT), "S3_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT)}
    return start_server({"S3_BUCKET": bucket, "S3_ENDPOINT_URL": proxy.url, **timeouts})


def test_completion_slower_than_the_read_timeout_is_waited_for(
    proxied_server: Server, proxy: FaultProxy, http: httpx.Client, s3: Any, bucket: str
) -> None:
    proxy.mode = Hold(COMPLETION_HELD_SECONDS, only=COMPLETION)

    answer = upload(http, proxied_server, os.urandom(MULTIPART_FILE_BYTES))

    assert proxy.faults_injected == 1  # one completion, waited for, never sent again
    assert_stored(s3, bucket, answer)


def test_completion_whose_answer_is_lost_is_not_sent_again(
    proxied_server: Server, proxy: FaultProxy, http: httpx.Client, s3: Any, bucket: str
) -> None:
    # S3 may still be assembling the object when the connection drops: a second completion could fail both.
    proxy.mode = Lose(only=COMPLETION)

    answer = upload(http, proxied_server, os.urandom(MULTIPART_FILE_BYTES))

    assert proxy.faults_injected == 1
    assert_stored(s3, bucket, answer)


def test_store_without_tagging_takes_uploads_and_warns_once(
    proxied_server: Server, proxy: FaultProxy, http: httpx.Client, s3: Any, bucket: str
) -> None:
    proxy.mode = Fail(501, "NotImplemented", times=100, only=TAGGING)
    contents = [os.urandom(MULTIPART_FILE_BYTES) for _ in range(3)]

    answers = [upload(http, proxied_server, content) for content in contents]

    assert [answer["sha256"] for answer in answers] == [hashlib.sha256(content).hexdigest() for content in contents]
    assert proxy.faults_injected == len(contents)
    assert_stored(s3, bucket, *answers)
    [warning] = [line for line in proxied_server.log().splitlines() if "WARNING" in line]
    assert "no sha256 tag" in warning and "NotImplemented" in warning


# ---------------------------------------------------------------- client faults, against the real server

# Past the multipart threshold: when such a client leaves, S3 has an upload in progress.
LEFT_BYTES = 7 * MiB
MAX_UPLOAD_BYTES = 12 * MiB


def overstated_length(connection: socket.socket) -> str:
    """Sends a whole form under a Content-Length 1 KiB larger, then leaves."""
    body = form(os.urandom(LEFT_BYTES))
    connection.sendall(request_head("/upload", {**FORM_HEADERS, "Content-Length": str(len(body) + 1024)}) + body)
    return "/upload"


def short_json(connection: socket.socket) -> str:
    """Sends part of a JSON body, then leaves."""
    headers = {"Content-Type": "application/json", "Content-Length": "200"}
    connection.sendall(request_head("/generate", headers) + b'{"prompt": "a fox in')
    return "/generate"


def half_closed(connection: socket.socket) -> str:
    """Sends a form without its last KiB, then shuts its sending side and waits for an answer that cannot come."""
    body = form(os.urandom(LEFT_BYTES))
    connection.sendall(request_head("/upload", {**FORM_HEADERS, "Content-Length": str(len(body))}) + body[:-1024])
    connection.shutdown(socket.SHUT_WR)
    assert connection.recv(CHUNK) == b"", "the server answered a request it never received whole"
    return "/upload"


def chunked_over_limit(connection: socket.socket) -> tuple[str, bytes]:
    """Streams a form twice MAX_UPLOAD_BYTES in chunks, stopping once the server answers."""
    body = form(os.urandom(2 * MAX_UPLOAD_BYTES))
    connection.sendall(request_head("/upload", {**FORM_HEADERS, "Transfer-Encoding": "chunked"}))
    for start in range(0, len(body), CHUNK):
        if select.select([connection], [], [], 0)[0]:
            break
        piece = body[start : start + CHUNK]
        connection.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    else:
        connection.sendall(b"0\r\n\r\n")
    return read_answer(connection)


def continue_over_limit(connection: socket.socket) -> tuple[str, bytes]:
    """Announces a body twice MAX_UPLOAD_BYTES with `Expect: 100-continue` and sends only the head."""
    headers = {**FORM_HEADERS, "Content-Length": str(2 * MAX_UPLOAD_BYTES), "Expect": "100-continue"}
    connection.sendall(request_head("/upload", headers))
    return read_answer(connection)


@pytest.fixture
def server_env() -> dict[str, str]:
    """A small MAX_UPLOAD_BYTES for the client-fault tests' server."""
    return {"MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES)}


@pytest.mark.parametrize("fault", [overstated_length, short_json, half_closed])
def test_client_leaving_early_leaves_nothing(
    server: Server, http: httpx.Client, assert_nothing_left: Callable[[], None], fault: Callable[[socket.socket], str]
) -> None:
    with connect(server) as connection:
        path = fault(connection)
    logged = f"client disconnected before sending the whole body of POST {path}"
    wait_until(lambda: logged in server.log())

    assert logged in server.log()
    assert_nothing_left()
    assert upload(http, server, b"the next one")["url"]


@pytest.mark.parametrize("fault", [chunked_over_limit, continue_over_limit])
def test_body_over_the_limit_is_413(
    server: Server,
    http: httpx.Client,
    assert_nothing_left: Callable[[], None],
    fault: Callable[[socket.socket], tuple[str, bytes]],
) -> None:
    with connect(server) as connection:
        status_line, body = fault(connection)

    # The first thing the server sends: with `Expect: 100-continue`, no `100 Continue` came before it.
    assert status_line == "HTTP/1.1 413 Request Entity Too Large"
    assert json.loads(body) == {"detail": f"file is larger than {MAX_UPLOAD_BYTES} bytes"}
    assert_nothing_left()
    assert upload(http, server, b"the next one")["url"]


def stored_so_far(s3: Any, bucket: str, data_dir: Path) -> int:
    """Bytes of a file not yet complete that have reached the store: S3's parts, or the local partial file."""
    parts = [
        part["Size"]
        for upload in multipart_uploads(s3, bucket)
        for part in s3.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]).get("Parts", [])
    ]
    partial_files = [path.stat().st_size for path in (data_dir / "uploads").glob(".partial-*")]
    return sum(parts) + sum(partial_files)


def test_upload_is_stored_while_it_arrives_and_never_spooled(
    server: Server, spool: Path, data_dir: Path, s3: Any, bucket: str
) -> None:
    data = os.urandom(10 * MiB)
    body = form(data)
    with connect(server) as connection:
        connection.sendall(request_head("/upload", {**FORM_HEADERS, "Content-Length": str(len(body))}))
        connection.sendall(body[: 8 * MiB])
        # A first 5 MiB is in the store while the client has yet to send the last 2 MiB.
        wait_until(lambda: stored_so_far(s3, bucket, data_dir) >= 5 * MiB)
        assert stored_so_far(s3, bucket, data_dir) >= 5 * MiB
        assert temp_files_held(server.process, spool) == [] and list(spool.iterdir()) == []
        connection.sendall(body[8 * MiB :])
        status_line, answer = read_answer(connection)

    assert status_line == "HTTP/1.1 200 OK"
    assert json.loads(answer)["sha256"] == hashlib.sha256(data).hexdigest()
    assert list(spool.iterdir()) == []


# ---------------------------------------------------------------- failing after the file is stored


def stored_anything(app: Starlette, s3: Any) -> bool:
    store = app.state.storage
    if isinstance(store, storage.S3Storage):
        return bool(keys_in(s3, store.bucket, ""))
    return any(path.is_file() and path.name != ".signing-key" for path in store.root.rglob("*"))


def credentials_lost() -> dict[str, str]:
    raise CredentialRetrievalError(provider="container-role", error_msg="connection refused")


def expired_credentials() -> RefreshableCredentials:
    """A task role's credentials, expired, whose refresh fails: what links meet after the put went through."""
    expired = datetime.now(UTC) - timedelta(minutes=1)
    return RefreshableCredentials("ASIATEMPORARY", "secret", "token", expired, credentials_lost, "container-role")


@pytest.mark.parametrize("path", CALLS)
async def test_presigning_that_fails_after_the_put_leaves_nothing(
    s3_settings: Settings, s3: Any, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    app = gen_service.create_app(s3_settings)
    monkeypatch.setattr(app.state.storage, "credentials", expired_credentials())
    async with await asgi_client(app) as client:
        response = await post(client, path)

    assert response.status_code == 503
    assert response.json() == {"detail": "storage failed (CredentialRetrievalError)"}
    assert not stored_anything(app, s3)


@pytest.mark.parametrize("path", CALLS)
@pytest.mark.parametrize("removal", ["works", "fails"])
async def test_any_failure_to_link_a_stored_file_leaves_nothing_or_says_so(
    backend_settings: Settings,
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
    removal: str,
) -> None:
    app = gen_service.create_app(backend_settings)
    store = type(app.state.storage)

    def fails(self: storage.Storage, key: str) -> None:
        raise RuntimeError("an unexpected failure")

    monkeypatch.setattr(store, "link", fails)
    if removal == "fails":
        monkeypatch.setattr(store, "delete", fails)
    async with await asgi_client(app, raise_app_exceptions=False) as client:
        response = await post(client, path)

    assert (response.status_code, response.json()) == (500, {"detail": "internal server error"})
    removal_failed = [record for record in caplog.records if "could not remove" in record.getMessage()]
    if removal == "works":
        assert not stored_anything(app, s3) and removal_failed == []
    else:
        assert stored_anything(app, s3) and len(removal_failed) == 1
