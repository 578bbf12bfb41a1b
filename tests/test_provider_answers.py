"""What a provider answers, read as hostile input: odd JSON is a bad answer and not a crash, ids must be
identifiers, no secret reaches the caller or the log through any field, every provider string in the
log is bounded, and no body (a redirect's, a gzip bomb's) is read past the byte bound."""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import MakeSettings, StartServer, generated_images, remote_server, serving
from fake_providers import API_KEY, PNG, Answer, FakeProviders, openai_error, openai_image, openai_link, problem
from settings import Settings

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
BACKENDS = ["openai", "cog", "replicate"]
DEEP = b"[" * 30_000 + b"]" * 30_000


async def generate(settings: Settings) -> httpx.Response:
    async with serving(settings) as client:
        return await client.post("/generate", json={"prompt": "a fox"})


def success(backend: str, body: bytes) -> Answer:
    return Answer(201 if backend == "replicate" else 200, body=body)


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def assert_bad_answer(
    response: httpx.Response, detail: str, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """502 with `detail`, nothing stored, one warning, no traceback, and every log line bounded."""
    assert (response.status_code, response.json()) == (502, {"detail": detail})
    assert generated_images(settings.local_storage_dir) == []
    assert len(warnings_in(caplog)) == 1
    assert "Traceback" not in caplog.text and all(record.exc_info is None for record in caplog.records)
    assert all(len(record.getMessage()) < 1000 for record in caplog.records)


# ---------------------------------------------------------------- odd JSON


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (DEEP, "JSON"),
        (b'{"data": [' + b"1" * 5000 + b"]}", "JSON"),  # more digits than Python converts
        (b"[" * 30_000 + b'"' + b"A" * (2 * MiB) + b'"' + b"]" * 30_000, "JSON"),  # deep, and large
        (b"[]", None),
        (b'"a string"', None),
        (b"42", None),
        (b"null", None),
    ],
    ids=["deep", "huge-number", "deep-and-large", "list", "string", "number", "null"],
)
async def test_odd_json_in_a_success_is_a_bad_answer_not_a_crash(
    remote: MakeSettings,
    fake: FakeProviders,
    caplog: pytest.LogCaptureFixture,
    backend: str,
    body: bytes,
    detail: str | None,
) -> None:
    fake.plan("generate", success(backend, body))
    settings = remote(backend)

    response = await generate(settings)

    expected = detail or ("JSON object" if backend == "openai" else "prediction")
    assert_bad_answer(response, f"image generator sent no {expected}", settings, caplog)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_odd_json_in_an_error_is_the_errors_status(
    remote: MakeSettings, fake: FakeProviders, caplog: pytest.LogCaptureFixture, backend: str
) -> None:
    fake.plan("generate", Answer(400, body=DEEP))
    settings = remote(backend)

    response = await generate(settings)

    assert (response.status_code, response.json()) == (
        502,
        {"detail": "image generator refused the request (HTTP 400)"},
    )
    assert "Traceback" not in caplog.text


async def test_odd_json_in_a_poll_is_a_bad_answer(
    remote: MakeSettings, fake: FakeProviders, caplog: pytest.LogCaptureFixture
) -> None:
    fake.plan("generate", Answer(201, fake.prediction("starting")))
    fake.plan("poll", Answer(body=DEEP))
    settings = remote("replicate")

    assert_bad_answer(await generate(settings), "image generator sent no JSON", settings, caplog)


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize(
    ("backend", "answer", "what"),
    [
        ("cog", Answer(json={"id": "p" * (5 * MiB), "status": "succeeded", "output": None}), "prediction id"),
        ("cog", Answer(json={"id": "pred 1\n<b>", "status": "succeeded", "output": None}), "prediction id"),
        ("replicate", Answer(201, {"id": ["p1"], "status": "starting"}), "prediction id"),
        ("openai", Answer(json=openai_image(PNG), headers={"x-request-id": "req 1; injected"}), "request id"),
        ("openai", Answer(json=openai_image(PNG), headers={"x-request-id": "r" * 65}), "request id"),
    ],
    ids=["5-MB-id", "id-with-markup", "id-not-a-string", "request-id-with-spaces", "request-id-too-long"],
)
async def test_an_id_that_is_not_a_short_identifier_is_a_bad_answer(
    remote: MakeSettings,
    fake: FakeProviders,
    caplog: pytest.LogCaptureFixture,
    backend: str,
    answer: Answer,
    what: str,
) -> None:
    fake.plan("generate", answer)
    settings = remote(backend)

    response = await generate(settings)

    assert_bad_answer(response, f"image generator sent a {what} that is not a short identifier", settings, caplog)


async def test_a_huge_model_error_is_logged_bounded(
    remote: MakeSettings, fake: FakeProviders, caplog: pytest.LogCaptureFixture
) -> None:
    fake.plan("generate", Answer(json={"id": "p1", "status": "failed", "output": None, "error": "CUDA " * MiB}))

    response = await generate(remote("cog"))

    assert (response.status_code, response.json()) == (502, {"detail": "image generator failed"})
    [warning] = warnings_in(caplog)
    assert warning.startswith("the model's prediction p1 ended failed: CUDA CUDA") and len(warning) < 500
    assert warning.endswith("more]")


# ---------------------------------------------------------------- secrets in any field


@pytest.mark.parametrize(
    ("backend", "answer"),
    [
        ("openai", Answer(400, openai_error(API_KEY, "bad request"))),
        ("openai", Answer(400, {"error": {"message": "bad request", "type": API_KEY, "code": None}})),
        ("replicate", Answer(422, problem(422, API_KEY, "bad input"))),
        ("replicate", Answer(422, problem(422, f"Token {API_KEY} invalid", "bad input"))),
        ("openai", Answer(400, body=b"x" * 490 + API_KEY.encode() + b"y" * 100)),  # straddling where a cut was
    ],
    ids=["openai-code", "openai-type", "replicate-title", "replicate-long-title", "body"],
)
async def test_a_key_echoed_in_any_field_reaches_neither_the_caller_nor_the_log(
    remote: MakeSettings, fake: FakeProviders, caplog: pytest.LogCaptureFixture, backend: str, answer: Answer
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.plan("generate", answer)

    response = await generate(remote(backend))

    assert response.status_code == 502
    seen = response.text + caplog.text
    # No piece of the key of 8 characters or more, anywhere.
    assert not any(API_KEY[start : start + 8] in seen for start in range(len(API_KEY) - 7))


async def test_a_code_that_is_not_an_identifier_is_not_shown(remote: MakeSettings, fake: FakeProviders) -> None:
    fake.plan("generate", Answer(400, openai_error("<script>alert(1)</script>", "bad")))

    response = await generate(remote("openai"))

    assert response.json() == {"detail": "image generator refused the request (HTTP 400)"}


async def test_a_refusal_reason_is_redacted(remote: MakeSettings, fake: FakeProviders) -> None:
    fake.plan("generate", Answer(400, openai_error("moderation_blocked", f"Rejected. safety_violations=[{API_KEY}].")))

    response = await generate(remote("openai"))

    assert response.json() == {"detail": "the image generator refused the prompt: [redacted]"}


# ---------------------------------------------------------------- bounded reads


def gzip_bomb(decoded_bytes: int) -> bytes:
    """gzip of `decoded_bytes` zeros: about a thousandth of that on the wire."""
    compressor, zeros = zlib.compressobj(9, wbits=31), bytes(MiB)
    return b"".join(compressor.compress(zeros) for _ in range(decoded_bytes // MiB)) + compressor.flush()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return gzip_bomb(1024 * MiB)


def big_body(size: int) -> Iterator[bytes]:
    chunk = b"x" * MiB
    for _ in range(size // MiB):
        yield chunk


def bombs(fake: FakeProviders, bomb: bytes) -> dict[str, tuple[list[tuple[str, Answer]], int, str | None]]:
    """What a hostile provider sends, as (route, answer) plans: the status and detail each gets."""
    image_url = fake.file_url(PNG, "image.png")
    moved = fake.file_url(PNG, "moved.png")
    gzip = {"content-encoding": "gzip"}
    over = "image generator sent an answer over {} bytes"
    return {
        "gzip-bomb-answer": ([("generate", Answer(body=bomb, headers=gzip))], 502, over),
        "gzip-bomb-image": (
            [("generate", Answer(json=openai_link(moved))), ("file", Answer(body=bomb, headers=gzip))],
            502,
            over,
        ),
        "gzip-bomb-redirect": (
            [
                ("generate", Answer(json=openai_link(moved))),
                ("file", Answer(302, body=bomb, headers={**gzip, "location": image_url})),
            ],
            200,
            None,
        ),
        "600-MiB-redirect": (
            [
                ("generate", Answer(json=openai_link(moved))),
                ("file", Answer(302, chunks=lambda: big_body(600 * MiB), headers={"location": image_url})),
            ],
            200,
            None,
        ),
    }


BOMBS = ["gzip-bomb-answer", "gzip-bomb-image", "gzip-bomb-redirect", "600-MiB-redirect"]


@pytest.mark.parametrize("case", BOMBS)
async def test_no_body_is_read_past_the_bound(
    remote: MakeSettings, fake: FakeProviders, bomb: bytes, case: str
) -> None:
    plans, status, detail = bombs(fake, bomb)[case]
    for route, answer in plans:
        fake.plan(route, answer)
    settings = remote("openai", max_image_bytes=MiB)

    response = await generate(settings)

    assert response.status_code == status, response.text
    limit = MiB if case == "gzip-bomb-image" else MiB * 4 // 3 + 64 * 1024
    if detail:
        assert response.json() == {"detail": detail.format(limit)}


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]


def test_the_servers_peak_memory_stays_within_its_sizing(
    start_server: StartServer, fake: FakeProviders, data_dir: Path, bomb: bytes
) -> None:
    """The real server, MAX_IMAGE_BYTES 4 MiB: each bomb may raise its peak RSS by at most the README's
    sizing for one generation (four times MAX_IMAGE_BYTES), whatever the bomb decodes or weighs to."""
    server = remote_server(start_server, fake, data_dir, "openai", MAX_IMAGE_BYTES=str(4 * MiB))
    growth: dict[str, float] = {}
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=60) as client:
        assert client.post("/generate", json={"prompt": "warm up"}).status_code == 200
        for case in BOMBS:
            plans, status, _ = bombs(fake, bomb)[case]
            for route, answer in plans:
                fake.plan(route, answer)
            before = peak_rss_mb(server.process.pid)
            assert client.post("/generate", json={"prompt": "a fox"}).status_code == status
            growth[case] = peak_rss_mb(server.process.pid) - before
    print(f"peak RSS growth, MB: {growth}")  # the README's figures come from here (pytest -s)
    assert all(mb <= 4 * 4 for mb in growth.values()), growth


def test_the_bomb_is_what_it_is_named(bomb: bytes) -> None:
    decompressor, decoded, data = zlib.decompressobj(wbits=31), 0, bomb
    while data or not decompressor.eof:
        decoded += len(decompressor.decompress(data, 64 * MiB))
        data = decompressor.unconsumed_tail
    assert len(bomb) < 2 * MiB and decoded == 1024 * MiB
