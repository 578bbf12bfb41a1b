"""Waiting on a provider, as the real server does it: a caller who leaves cancels the provider's request,
the queue bound answers at once, waiting generations hold no thread and leave /health answering, and a
backend configured wrong stops the process at start."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import anyio
import httpx
import pytest

import gen_service
from conftest import MakeSettings, StartServer, asgi_client, exit_of, generated_images, remote_server
from fake_providers import API_KEY, PNG, Answer, FakeProviders, openai_link
from raw_http import connect, read_answer, request_head

pytestmark = pytest.mark.anyio

# ---------------------------------------------------------------- the caller leaves


@pytest.mark.parametrize("backend", ["openai", "cog", "replicate"])
def test_a_caller_who_leaves_closes_the_providers_connection_and_nothing_is_stored(
    start_server: StartServer, fake: FakeProviders, data_dir: Path, backend: str
) -> None:
    fake.plan("generate", Answer(hold=True))
    server = remote_server(start_server, fake, data_dir, backend, LOG_LEVEL="DEBUG")
    body = json.dumps({"prompt": "a fox"}).encode()

    with connect(server) as caller:
        caller.sendall(request_head("/generate", {"Content-Length": str(len(body))}) + body)
        assert fake.wait_until(lambda: fake.holding == 1)
    # The caller has gone; the service closes its own request to the provider.

    assert fake.wait_until(lambda: fake.callers_left == 1)
    assert fake.wait_until(lambda: "outcome=cancelled" in server.log())
    assert "POST /generate 499" in server.log()
    assert generated_images(data_dir) == []
    assert "Traceback" not in server.log()


def test_a_replicate_prediction_is_cancelled_when_its_caller_leaves(
    start_server: StartServer, fake: FakeProviders, data_dir: Path
) -> None:
    running = fake.prediction("processing")
    fake.plan("generate", Answer(201, running))
    fake.plan("poll", Answer(json=running, hold=True))
    server = remote_server(start_server, fake, data_dir, "replicate")

    with httpx.Client(trust_env=False, timeout=1) as client, pytest.raises(httpx.ReadTimeout):
        client.post(f"{server.base_url}/generate", json={"prompt": "a fox"})  # gives up after 1 s and leaves

    assert fake.wait_until(lambda: len(fake.requests("/cancel", "POST")) == 1)
    [cancel] = fake.requests("/cancel", "POST")
    assert cancel.path == f"/v1/predictions/{running['id']}/cancel"
    assert generated_images(data_dir) == []


# ---------------------------------------------------------------- bounds


async def test_a_full_queue_answers_503_at_once(remote: MakeSettings, fake: FakeProviders) -> None:
    """Two generating and three waiting fill the bounds: the sixth is refused while all five still wait."""
    fake.plan("generate", *[Answer(hold=True)] * 5)
    app = gen_service.create_app(remote("openai", generate_concurrency=2, generate_queue=3))
    generations = app.state.generations
    async with app.router.lifespan_context(app), await asgi_client(app) as client:
        calls = [asyncio.create_task(client.post("/generate", json={"prompt": f"fox {n}"})) for n in range(5)]
        await asyncio.to_thread(fake.wait_until, lambda: fake.holding == 2 and generations.admitted == 5)

        with anyio.fail_after(10):  # not waiting for a place: without the bound it would wait for the others
            refused = await client.post("/generate", json={"prompt": "one too many"})
        still_waiting = fake.holding == 2 and not any(call.done() for call in calls)
        fake.release()
        answers = await asyncio.gather(*calls)

    assert (refused.status_code, refused.json()) == (503, {"detail": "image generator is busy"})
    assert int(refused.headers["retry-after"]) >= 1
    assert still_waiting
    assert [answer.status_code for answer in answers] == [200] * 5
    assert len(fake.requests("/v1/images/generations")) == 5  # the refused one never reached the provider


async def test_health_answers_while_50_generations_wait_on_the_provider(
    start_server: StartServer, fake: FakeProviders, data_dir: Path
) -> None:
    fake.plan("generate", *[Answer(hold=True)] * 50)
    server = remote_server(start_server, fake, data_dir, "openai", GENERATE_CONCURRENCY="50")
    limits = httpx.Limits(max_connections=60)
    async with httpx.AsyncClient(base_url=server.base_url, trust_env=False, timeout=60, limits=limits) as client:
        await client.get("/health")
        threads_idle = server.threads()
        calls = [asyncio.create_task(client.post("/generate", json={"prompt": f"fox {n}"})) for n in range(50)]
        assert await asyncio.to_thread(fake.wait_until, lambda: fake.holding == 50)

        health = await client.get("/health", timeout=4)  # the container's HEALTHCHECK gives up after 4 s
        threads_waiting = server.threads()
        fake.release()
        answers = await asyncio.gather(*calls)

    assert health.status_code == 200
    # Waiting holds no thread: one per waiting generation would be 50 more.
    assert threads_waiting <= threads_idle + 2
    assert [answer.status_code for answer in answers] == [200] * 50
    assert len([path for path in generated_images(data_dir) if path.suffix == ".png"]) == 50


def test_idle_connections_are_kept_for_keep_alive_seconds(start_server: StartServer, data_dir: Path) -> None:
    """Raising the ALB's idle timeout for long generations needs the service's keep-alive raised above it."""
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "KEEP_ALIVE_SECONDS": "2"})
    with connect(server) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status_line, body = read_answer(connection)  # head and body, which may come in separate reads
        assert (status_line, body) == ("HTTP/1.1 200 OK", b'{"status":"ok"}')
        started = time.monotonic()
        assert connection.recv(4096) == b""  # the server closed the idle connection...
        assert 1.5 <= time.monotonic() - started < 10  # ...after about KEEP_ALIVE_SECONDS


# ---------------------------------------------------------------- credentials and configuration


def test_the_key_never_reaches_the_log(start_server: StartServer, fake: FakeProviders, data_dir: Path) -> None:
    fake.plan("generate", Answer(400, {"error": {"message": f"{API_KEY} may not use this model", "code": "denied"}}))
    fake.plan("generate", Answer(403, {"error": {"message": f"{API_KEY} is not verified", "code": "unverified"}}))
    fake.plan("generate", *[Answer(429, {"error": {"message": f"key {API_KEY}", "code": "rate_limit_exceeded"}})] * 3)
    server = remote_server(start_server, fake, data_dir, "openai", LOG_LEVEL="DEBUG", LOG_FORMAT="json")
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=30) as client:
        answers = [client.post("/generate", json={"prompt": "a fox"}) for _ in range(3)]
        wrong = remote_server(start_server, fake, data_dir, "openai", OPENAI_API_KEY="sk-wrong-secret-42")
        refused = client.post(f"{wrong.base_url}/generate", json={"prompt": "a fox"})

    assert [answer.status_code for answer in answers] == [502, 502, 503]
    assert refused.status_code == 502
    # The provider's message carried the key, and was logged without it...
    assert "[redacted] may not use this model" in server.log()
    # ...and what a 401 or 403 says, which may be what was sent to authenticate, is not logged at all.
    assert "is not verified" not in server.log() and "HTTP 403 unverified (x-request-id req_" in server.log()
    assert "Incorrect API key" not in wrong.log() and "HTTP 401 invalid_api_key (x-request-id req_" in wrong.log()
    for log, key in ((server.log(), API_KEY), (wrong.log(), "sk-wrong-secret-42")):
        assert key not in log
    assert all(key not in answer.text for answer in [*answers, refused] for key in (API_KEY, "sk-wrong-secret-42"))


@pytest.mark.parametrize("backend", ["openai", "cog"])
def test_credentialed_urls_never_reach_the_log(
    start_server: StartServer, fake: FakeProviders, data_dir: Path, backend: str
) -> None:
    """A signed link to the image, as Azure's were."""
    signed = fake.file_url(PNG, "signed.png") + "?sv=2026-01-01&sig=s3cr3t-signature"
    output = {"openai": openai_link(signed), "cog": {"id": "pred_1", "status": "succeeded", "output": signed}}
    fake.plan("generate", Answer(json=output[backend]))
    server = remote_server(start_server, fake, data_dir, backend, LOG_LEVEL="DEBUG")

    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=30) as client:
        assert client.post("/generate", json={"prompt": "a fox"}).status_code == 200

    assert fake.requests("/files/signed.png")  # the link was fetched...
    assert "s3cr3t-signature" not in server.log()  # ...and never logged
    assert (
        f"image generator: {'OpenAI-compatible images API' if backend == 'openai' else 'Cog container'} at http://127.0.0.1:"
        in server.log()
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"IMAGE_BACKEND": "openai"}, "OPENAI_API_KEY"),
        ({"IMAGE_BACKEND": "openai", "OPENAI_API_KEY": ""}, "OPENAI_API_KEY"),
        ({"IMAGE_BACKEND": "cog"}, "COG_URL"),
        ({"IMAGE_BACKEND": "cog", "COG_URL": "sdxl:5000"}, "COG_URL"),
        ({"IMAGE_BACKEND": "cog", "COG_URL": "http://sdxl:5000", "COG_INPUT": "{width: 1024}"}, "COG_INPUT"),
        ({"IMAGE_BACKEND": "cog", "COG_URL": "http://sdxl:5000", "COG_INPUT": "[1024]"}, "COG_INPUT"),
        ({"IMAGE_BACKEND": "replicate", "REPLICATE_MODEL": "acme/painter"}, "REPLICATE_API_TOKEN"),
        ({"IMAGE_BACKEND": "replicate", "REPLICATE_API_TOKEN": "r8_x"}, "REPLICATE_MODEL"),
        (
            {"IMAGE_BACKEND": "replicate", "REPLICATE_API_TOKEN": "r8_x", "REPLICATE_MODEL": "painter"},
            "REPLICATE_MODEL",
        ),
        ({"IMAGE_BACKEND": "cog", "COG_URL": "http://user:r8_x@sdxl:5000"}, "COG_URL"),
        (
            {"IMAGE_BACKEND": "openai", "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "https://u:r8_x@ai/v1"},
            "OPENAI_BASE_URL",
        ),
        ({"REPLICATE_BASE_URL": "https://r8_x@api.replicate.com/v1"}, "REPLICATE_BASE_URL"),
        ({"IMAGE_BACKEND": "dall-e"}, "IMAGE_BACKEND"),
        ({"GENERATE_CONCURRENCY": "0"}, "GENERATE_CONCURRENCY"),
        ({"GENERATE_TIMEOUT_SECONDS": "soon"}, "GENERATE_TIMEOUT_SECONDS"),
    ],
)
def test_a_backend_configured_wrong_stops_the_process_naming_the_variable(
    workdir: Path, overrides: dict[str, str], named: str
) -> None:
    result = exit_of(workdir, overrides)
    assert result.returncode != 0
    [line] = result.stderr.splitlines()
    assert line.startswith("gen_service: invalid setting: ") and f"{named}:" in line
    assert "r8_x" not in line  # a token, or the password in a URL
