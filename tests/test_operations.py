"""What operators rely on: readiness, request ids, access lines, integrity fields, honest expiry."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from botocore.credentials import RefreshableCredentials
from starlette.requests import ClientDisconnect, Request

import errors
import gen_service
import generators
import logs
import storage
from conftest import HOLD_SECONDS, Download, asgi_client, in_chunks, stored_before_types_were_checked
from settings import Settings

pytestmark = pytest.mark.anyio

ISO_UTC = "%Y-%m-%dT%H:%M:%SZ"


def expires_at(answer: dict[str, object]) -> datetime:
    return datetime.strptime(str(answer["expires_at"]), ISO_UTC).replace(tzinfo=UTC)


# ---------------------------------------------------------------- readiness


async def test_ready_when_storage_works(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


async def test_not_ready_when_the_bucket_is_gone(s3_settings: Settings, s3: object) -> None:
    async with await asgi_client(gen_service.create_app(s3_settings)) as client:
        s3.delete_bucket(Bucket=s3_settings.s3_bucket)  # type: ignore[attr-defined]
        response = await client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "detail": "storage refused the request (404)"}


async def test_not_ready_when_the_local_directory_is_gone(local_settings: Settings) -> None:
    async with await asgi_client(gen_service.create_app(local_settings)) as client:
        for path in sorted(local_settings.local_storage_dir.rglob("*"), reverse=True):
            path.unlink()
        local_settings.local_storage_dir.rmdir()
        response = await client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "detail": "storage directory is not writable"}


@pytest.fixture
def counted_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every storage check the app makes, by store."""
    calls: list[str] = []
    for store in (storage.LocalStorage, storage.S3Storage):
        original = store.check
        monkeypatch.setattr(store, "check", lambda self, original=original: calls.append("check") or original(self))
    return calls


async def test_ready_caches_the_storage_check(client: httpx.AsyncClient, counted_checks: list[str]) -> None:
    for _ in range(5):
        assert (await client.get("/ready")).status_code == 200
    assert counted_checks == ["check"]


async def test_probes_during_a_slow_check_wait_for_it_rather_than_start_their_own(
    client: httpx.AsyncClient, counted_checks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for store in (storage.LocalStorage, storage.S3Storage):
        check = store.check
        monkeypatch.setattr(store, "check", lambda self, check=check: time.sleep(0.5) or check(self))

    answers = await asyncio.gather(*(client.get("/ready") for _ in range(10)))

    assert [answer.status_code for answer in answers] == [200] * 10
    assert counted_checks == ["check"]


async def test_probes_are_logged_only_when_they_fail(
    local_settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="gen_service.access")
    async with await asgi_client(gen_service.create_app(local_settings)) as client:
        for path in ("/", "/health", "/ready"):
            assert (await client.get(path)).status_code == 200

    def broken(self: storage.LocalStorage) -> None:
        raise storage.StorageError(503, "storage directory is not writable")

    monkeypatch.setattr(storage.LocalStorage, "check", broken)
    async with await asgi_client(gen_service.create_app(local_settings)) as client:
        assert (await client.get("/ready")).status_code == 503
    lines = [record for record in caplog.records if record.name == "gen_service.access"]
    assert [(line.fields["path"], line.fields["status"]) for line in lines] == [("/ready", 503)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/", "/health"])
async def test_liveness_never_touches_storage(client: httpx.AsyncClient, counted_checks: list[str], path: str) -> None:
    assert (await client.get(path)).json() == {"status": "ok"}
    assert counted_checks == []


# ---------------------------------------------------------------- request ids and access lines


async def test_a_callers_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", headers={"X-Request-ID": "ws-session-42:call-7"})
    assert response.headers["x-request-id"] == "ws-session-42:call-7"


@pytest.mark.parametrize("given", [None, "", "a" * 129, "has space", "tab\there", "naïve".encode()])
async def test_a_missing_or_unsafe_request_id_is_replaced(client: httpx.AsyncClient, given: str | bytes | None) -> None:
    headers = {} if given is None else {"X-Request-ID": given}
    first = await client.get("/health", headers=headers)
    second = await client.get("/health", headers=headers)
    assert re.fullmatch(r"[0-9a-f]{32}", first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize(("path", "status"), [("/nowhere", 404), ("/ready", 200)])
async def test_errors_carry_a_request_id_too(client: httpx.AsyncClient, path: str, status: int) -> None:
    response = await client.get(path, headers={"X-Request-ID": "abc"})
    assert (response.status_code, response.headers["x-request-id"]) == (status, "abc")


async def test_an_unexpected_error_is_a_json_500_with_an_id(
    local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generators, "render_png", lambda prompt: 1 / 0)
    app = gen_service.create_app(local_settings)
    async with await asgi_client(app, raise_app_exceptions=False) as client:
        response = await client.post("/generate", json={"prompt": "x"}, headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert response.headers["x-request-id"] == "boom-1"


async def test_one_access_line_per_request_without_the_query(
    local_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gen_service.access")
    caplog.handler.addFilter(logs.LineFilter())
    async with await asgi_client(gen_service.create_app(local_settings)) as client:
        answer = (await client.post("/upload", files={"file": ("a.txt", b"abc", "text/plain")})).json()
        await client.get(answer["url"], headers={"X-Request-ID": "dl-1", "X-Amzn-Trace-Id": "Root=1-5e1b-abc"})

    lines = [record for record in caplog.records if record.name == "gen_service.access"]
    assert [line.fields["method"] for line in lines] == ["POST", "GET"]  # type: ignore[attr-defined]
    download = lines[1].fields  # type: ignore[attr-defined]
    assert download["path"] == urlsplit(answer["url"]).path
    assert (download["status"], download["bytes"], download["trace_id"]) == (200, 3, "Root=1-5e1b-abc")
    assert download["duration_ms"] >= 0
    assert lines[1].request_id == "dl-1"  # type: ignore[attr-defined]
    assert not any("signature" in record.getMessage() or "X-Amz" in record.getMessage() for record in caplog.records)


async def test_a_start_the_server_refuses_is_answered_json_500_and_logged_as_such(
    local_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gen_service.access")
    app = gen_service.create_app(local_settings)
    url = stored_before_types_were_checked(app.state.storage)
    # A server that refuses the start and then takes another, as the ASGI spec allows.
    async with await asgi_client(app, raise_app_exceptions=False) as client:
        response = await client.get(url, headers={"X-Request-ID": "refused-1"})

    assert (response.status_code, response.json()) == (500, {"detail": "internal server error"})
    assert response.headers["x-request-id"] == "refused-1"
    [line] = [record for record in caplog.records if record.name == "gen_service.access"]
    assert (line.fields["status"], line.fields["bytes"]) == (500, len(response.content))  # type: ignore[attr-defined]


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_a_message_with_a_callers_value_stays_one_line(log_format: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gen_service")
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.addFilter(logs.LineFilter())
    handler.setFormatter(logs.JSONFormatter() if log_format == "json" else logging.Formatter(logs.TEXT_FORMAT))
    # Starlette's URL drops a LF, CR or tab from the path; other breaks and controls stay.
    request = Request({"type": "http", "method": "POST", "path": "/upload\x0b2026-12-02 FORGED\u2028", "headers": []})
    logging.getLogger("gen_service").addHandler(handler)
    try:
        await errors.client_disconnected(request, ClientDisconnect())
    finally:
        logging.getLogger("gen_service").removeHandler(handler)

    [line] = written.getvalue().splitlines()
    message = json.loads(line)["message"] if log_format == "json" else line
    assert message.isprintable()
    assert message.endswith("POST /upload\\x0b2026-12-02 FORGED\\u2028")


# ---------------------------------------------------------------- integrity


async def test_upload_answer_describes_the_stored_bytes(client: httpx.AsyncClient, download: Download) -> None:
    content = os.urandom(200_000)
    before = datetime.now(UTC).replace(microsecond=0)
    answer = (await client.post("/upload", files={"file": ("a.bin", content, "application/x-thing")})).json()

    assert answer["size"] == len(content)
    assert answer["sha256"] == hashlib.sha256(content).hexdigest()
    assert answer["content_type"] == "application/x-thing"
    assert re.fullmatch(r"uploads/[0-9a-f]{32}", answer["key"]) and answer["key"] in answer["url"]
    assert before + timedelta(seconds=3600) <= expires_at(answer) <= before + timedelta(seconds=3602)
    assert hashlib.sha256((await download(answer["url"])).content).hexdigest() == answer["sha256"]


async def test_generate_answer_describes_the_stored_png(client: httpx.AsyncClient, download: Download) -> None:
    answer = (await client.post("/generate", json={"prompt": "a fox"})).json()
    png = (await download(answer["url"])).content
    assert (answer["size"], answer["sha256"]) == (len(png), hashlib.sha256(png).hexdigest())
    assert answer["content_type"] == "image/png"
    assert re.fullmatch(r"generated/[0-9a-f]{32}\.png", answer["key"])


async def test_uploads_are_hashed_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed_on: dict[bool, int] = {True: 0, False: 0}
    take = storage.Hasher.take

    def spy(self: storage.Hasher, chunks: list[bytes]) -> list[bytes]:
        hashed_on[threading.current_thread() is threading.main_thread()] += sum(map(len, chunks))
        return take(self, chunks)

    monkeypatch.setattr(storage.Hasher, "take", spy)
    content = os.urandom(3 * 1024 * 1024)
    answer = (await client.post("/upload", files={"file": ("a.bin", content)})).json()

    assert answer["sha256"] == hashlib.sha256(content).hexdigest()
    assert hashed_on == {True: 0, False: len(content)}  # the event loop only hands bytes on


async def test_health_answers_while_a_render_and_a_store_are_held(
    client: httpx.AsyncClient, download: Download, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendering and storing run in worker threads: while both are stuck, the event loop still answers."""
    release = threading.Event()
    entered = {"render": threading.Event(), "store": threading.Event()}

    def held(name: str, work: Callable[..., object]) -> Callable[..., object]:
        def wait_then_work(*args: object, **kwargs: object) -> object:
            entered[name].set()
            if not release.wait(HOLD_SECONDS):
                raise TimeoutError(f"{name} was held until it gave up")
            return work(*args, **kwargs)

        return wait_then_work

    monkeypatch.setattr(generators, "render_png", held("render", generators.render_png))
    for upload in (storage.LocalUpload, storage.S3Upload):
        for step in ("write", "commit"):
            monkeypatch.setattr(upload, step, held("store", getattr(upload, step)))
    # More than a local part, sent in pieces, so that a local upload is held mid-body storing a part.
    content = os.urandom(3 * 1024 * 1024)
    form = client.build_request("POST", "/upload", files={"file": ("a.bin", content)})
    headers = {"content-type": form.headers["content-type"]}

    async with asyncio.TaskGroup() as requests:
        generating = requests.create_task(client.post("/generate", json={"prompt": "a fox"}))
        uploading = requests.create_task(client.post("/upload", content=in_chunks(form.read()), headers=headers))
        try:
            for event in entered.values():
                assert await asyncio.to_thread(event.wait, HOLD_SECONDS)
            health = await client.get("/health")
        finally:
            release.set()

    assert health.status_code == 200
    assert generating.result().status_code == 200, generating.result().text
    assert uploading.result().status_code == 200, uploading.result().text
    assert (await download(uploading.result().json()["url"])).content == content


@pytest.mark.parametrize("size", [1000, 9 * 1024 * 1024], ids=["single-put", "multipart"])
async def test_s3_object_carries_sha256_and_a_checked_checksum(s3_settings: Settings, s3: object, size: int) -> None:
    content = os.urandom(size)
    async with await asgi_client(gen_service.create_app(s3_settings)) as client:
        answer = (await client.post("/upload", files={"file": ("a.bin", content)})).json()
    bucket, key = s3_settings.s3_bucket, answer["key"]
    head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")  # type: ignore[attr-defined]
    tags = s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]  # type: ignore[attr-defined]
    carried = head["Metadata"] | {tag["Key"]: tag["Value"] for tag in tags}
    assert carried == {"sha256": hashlib.sha256(content).hexdigest()}
    assert "ChecksumCRC32" in head  # S3 checked the bytes it received against it


async def test_s3_checksums_can_be_switched_off(s3_settings: Settings, s3: object) -> None:
    app = gen_service.create_app(replace(s3_settings, s3_checksums="when_required"))
    async with await asgi_client(app) as client:
        answer = (await client.post("/upload", files={"file": ("a.bin", b"abc")})).json()
    head = s3.head_object(Bucket=s3_settings.s3_bucket, Key=answer["key"], ChecksumMode="ENABLED")  # type: ignore[attr-defined]
    assert not any(name.startswith("Checksum") for name in head)
    assert head["Metadata"] == {"sha256": answer["sha256"]}


# ---------------------------------------------------------------- honest expiry


def temporary_credentials(expire_in: timedelta) -> RefreshableCredentials:
    """Credentials like a task role's, expiring in `expire_in` (more than botocore's 15 min refresh margin)."""
    metadata = {
        "access_key": "ASIATEMPORARY",
        "secret_key": "secret",
        "token": "session-token",
        "expiry_time": (datetime.now(UTC) + expire_in).isoformat(),
    }
    return RefreshableCredentials.create_from_metadata(metadata, refresh_using=lambda: metadata, method="test")


async def test_links_die_with_temporary_credentials(
    s3_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = gen_service.create_app(s3_settings)
    credentials_expire = datetime.now(UTC) + timedelta(minutes=20)
    monkeypatch.setattr(app.state.storage, "credentials", temporary_credentials(timedelta(minutes=20)))
    caplog.set_level(logging.WARNING, logger="storage")

    async with await asgi_client(app) as client:
        answers = [(await client.post("/generate", json={"prompt": "x"})).json() for _ in range(2)]

    assert abs(expires_at(answers[0]) - credentials_expire) < timedelta(seconds=2)
    assert 1190 <= int(parse_qs(urlsplit(answers[0]["url"]).query)["X-Amz-Expires"][0]) <= 1200
    assert [record.getMessage() for record in caplog.records if record.name == "storage"] == [
        "links live less than S3_PRESIGN_TTL_SECONDS: the signing credentials expire sooner"
    ]


async def test_long_lived_credentials_keep_the_ttl(s3_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    app = gen_service.create_app(replace(s3_settings, presign_ttl_seconds=600))
    monkeypatch.setattr(app.state.storage, "credentials", temporary_credentials(timedelta(hours=6)))
    async with await asgi_client(app) as client:
        answer = (await client.post("/generate", json={"prompt": "x"})).json()
    assert parse_qs(urlsplit(answer["url"]).query)["X-Amz-Expires"] == ["600"]


def test_botocore_still_says_when_refreshable_credentials_expire() -> None:
    """credentials_expiry reads a private name of botocore's: this fails if an upgrade takes it away."""
    expected = datetime.now(UTC) + timedelta(hours=1)
    expiry = storage.credentials_expiry(temporary_credentials(timedelta(hours=1)))
    assert expiry is not None and abs(expiry - expected) < timedelta(seconds=2)


async def test_credentials_that_do_not_say_when_they_expire_are_warned_of_once(
    s3_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = gen_service.create_app(replace(s3_settings, presign_ttl_seconds=600))
    unknown = RefreshableCredentials("ASIATEMPORARY", "secret", "token", None, refresh_using=dict, method="test")
    monkeypatch.setattr(app.state.storage, "credentials", unknown)
    caplog.set_level(logging.WARNING, logger="storage")

    async with await asgi_client(app) as client:
        answers = [(await client.post("/generate", json={"prompt": "x"})).json() for _ in range(2)]

    assert [parse_qs(urlsplit(answer["url"]).query)["X-Amz-Expires"] for answer in answers] == [["600"], ["600"]]
    [warning] = [record.getMessage() for record in caplog.records if record.name == "storage"]
    assert warning.startswith("cannot tell when the signing credentials expire")


def test_local_store_links_state_their_expiry(tmp_path: Path) -> None:
    link = storage.LocalStorage(tmp_path, "http://x", 60).link("uploads/" + "0" * 32)
    assert parse_qs(urlsplit(link.url).query)["expires"] == [str(int(link.expires_at.timestamp()))]
