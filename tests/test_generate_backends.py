"""Each image backend against its fake provider over real HTTP: the request we send is the documented one,
every documented form of answer is stored with its real type, and /ready reports the generator."""

from __future__ import annotations

import hashlib
import io
import logging
import re

import pytest
from PIL import Image

import gen_service
from conftest import MODEL, MakeSettings, free_port, serving
from fake_providers import API_KEY, JPEG, PNG, WEBP, Answer, FakeProviders, data_url, openai_link
from providers.links import allowed_host
from settings import Settings

pytestmark = pytest.mark.anyio

BACKENDS = ["openai", "cog", "replicate"]
KEY = re.compile(r"generated/[0-9a-f]{32}\.(png|jpg|webp)")
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


async def generated(settings: Settings, body: dict[str, object] | None = None) -> tuple[dict[str, object], bytes]:
    """POST /generate; the answer and the stored bytes it links to."""
    async with serving(settings) as client:
        response = await client.post("/generate", json=body or {"prompt": "a lighthouse at dusk"})
        assert response.status_code == 200, response.text
        answer = response.json()
        stored = await client.get(answer["url"])
    assert stored.status_code == 200
    assert stored.headers["content-type"] == answer["content_type"]
    return answer, stored.content


def assert_describes(answer: dict[str, object], data: bytes, media_type: str) -> None:
    assert (answer["content_type"], answer["size"]) == (media_type, len(data))
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()
    assert KEY.fullmatch(str(answer["key"])) and str(answer["key"]).endswith("." + EXTENSIONS[media_type])


# ---------------------------------------------------------------- OpenAI's images API


async def test_openai_gets_the_documented_request_and_its_image_is_stored(
    remote: MakeSettings, fake: FakeProviders
) -> None:
    answer, stored = await generated(remote("openai"), {"prompt": "a fox", "ignored": 1})

    [request] = fake.requests("/v1/images/generations")
    # GPT image models refuse `response_format`: it is not sent.
    assert request.json == {"model": "gpt-image-2", "prompt": "a fox", "n": 1}
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert stored == PNG
    assert_describes(answer, PNG, "image/png")


async def test_openai_gets_the_size_and_the_configured_model(remote: MakeSettings, fake: FakeProviders) -> None:
    await generated(remote("openai", image_model="my-deployment"), {"prompt": "a fox", "size": "1536x1024"})
    [request] = fake.requests("/v1/images/generations")
    assert request.json == {"model": "my-deployment", "prompt": "a fox", "n": 1, "size": "1536x1024"}


async def test_openai_url_answer_is_fetched_without_the_key(remote: MakeSettings, fake: FakeProviders) -> None:
    fake.plan("generate", Answer(json=openai_link(fake.file_url(JPEG, "image.jpg"))))

    answer, stored = await generated(remote("openai"))

    assert stored == JPEG
    assert_describes(answer, JPEG, "image/jpeg")
    [fetch] = fake.requests("/files/image.jpg")
    assert "authorization" not in fetch.headers


# ---------------------------------------------------------------- Cog containers


async def test_cog_gets_the_prompt_with_the_configured_inputs(remote: MakeSettings, fake: FakeProviders) -> None:
    settings = remote("cog", cog_input={"width": 1024, "num_outputs": 1, "prompt": "not this one"})
    await generated(settings, {"prompt": "a fox"})
    await generated(settings, {"prompt": "a fox", "size": "640x480"})

    inputs = [request.json for request in fake.requests("/predictions", "POST")]
    assert inputs == [
        {"input": {"width": 1024, "num_outputs": 1, "prompt": "a fox"}},
        {"input": {"width": 640, "num_outputs": 1, "height": 480, "prompt": "a fox"}},
    ]


def cog_outputs(fake: FakeProviders) -> dict[str, tuple[object, bytes]]:
    """Every documented form of a Cog model's output, and the image each stands for."""
    return {
        "data-url": (data_url(WEBP, "image/webp"), WEBP),
        "list-of-data-urls": ([data_url(JPEG, "image/jpeg"), data_url(PNG)], JPEG),
        "https-url": (fake.file_url(WEBP, "out.webp", fake.https_url), WEBP),
        "list-of-urls": ([fake.file_url(JPEG, "a.jpg"), fake.file_url(PNG, "b.png")], JPEG),
    }


@pytest.mark.parametrize("form", ["data-url", "list-of-data-urls", "https-url", "list-of-urls"])
async def test_cog_output_in_each_documented_form_is_stored(
    remote: MakeSettings, fake: FakeProviders, form: str
) -> None:
    output, image = cog_outputs(fake)[form]
    fake.plan("generate", Answer(json={"id": "pred_1", "status": "succeeded", "output": output, "error": None}))

    # The https fake is another origin on a loopback address: fetched only because the operator allowed its host.
    answer, stored = await generated(remote("cog", image_fetch_allowed_hosts=(allowed_host("127.0.0.1"),)))

    assert stored == image
    assert_describes(answer, image, Image.open(io.BytesIO(image)).get_format_mimetype())


# ---------------------------------------------------------------- Replicate


async def test_replicate_gets_the_model_path_and_token(remote: MakeSettings, fake: FakeProviders) -> None:
    answer, stored = await generated(remote("replicate"), {"prompt": "a fox"})

    [create] = fake.requests(f"/v1/models/{MODEL}/predictions")
    assert create.json == {"input": {"prompt": "a fox"}}
    assert create.headers["authorization"] == f"Bearer {API_KEY}"
    assert stored == PNG
    assert_describes(answer, PNG, "image/png")


@pytest.mark.parametrize(
    ("timeout_seconds", "prefer"), [(120, "wait=60"), (30, r"wait=2[34]"), (10, r"wait=[45]"), (6, None)]
)
async def test_replicate_is_asked_to_wait_until_a_few_seconds_before_the_deadline(
    remote: MakeSettings, fake: FakeProviders, timeout_seconds: float, prefer: str | None
) -> None:
    """Replicate holds the request for `Prefer: wait` (at most 60 s), then answers with the prediction and its
    cancel link: that answer must come before the deadline. With little time left, it is asked not to wait."""
    _, stored = await generated(remote("replicate", generate_timeout_seconds=timeout_seconds))

    [create] = fake.requests(f"/v1/models/{MODEL}/predictions")
    assert re.fullmatch(prefer, create.headers["prefer"]) if prefer else "prefer" not in create.headers
    assert stored == PNG


async def test_replicate_output_is_taken_while_the_prediction_is_still_processing(
    remote: MakeSettings, fake: FakeProviders
) -> None:
    """Replicate documents that with `Prefer: wait` a model's output files come as soon as they are all there,
    the prediction possibly still `processing`: they are the image, and the prediction is left to end."""
    fake.plan("generate", Answer(201, fake.prediction("processing", [fake.file_url(JPEG, "early.jpg")])))

    answer, stored = await generated(remote("replicate"))

    assert stored == JPEG
    assert_describes(answer, JPEG, "image/jpeg")
    assert fake.requests("/v1/predictions/") == []  # neither polled nor cancelled


async def test_replicate_is_polled_until_the_prediction_ends(remote: MakeSettings, fake: FakeProviders) -> None:
    fake.plan("generate", Answer(201, fake.prediction("starting")))
    fake.plan("poll", Answer(json=fake.prediction("processing")), Answer(json=fake.prediction("processing")))

    _, stored = await generated(remote("replicate"))

    polls = fake.requests("/v1/predictions/", "GET")
    assert len(polls) == 3
    assert all(poll.headers["authorization"] == f"Bearer {API_KEY}" for poll in polls)
    assert stored == PNG


@pytest.mark.parametrize(
    ("api", "files", "sent"),
    [
        ("http", "the-api", True),
        ("https", "the-api", True),  # as api.replicate.com, whose /v1/files need the token
        ("http", "https-elsewhere", False),
        ("https", "https-elsewhere", False),  # a model's output may link to its author's own HTTPS host
        ("http", "http-elsewhere", False),
    ],
)
async def test_replicate_output_gets_the_token_only_from_the_apis_own_origin(
    remote: MakeSettings, fake: FakeProviders, api: str, files: str, sent: bool
) -> None:
    api_url = fake.https_url if api == "https" else fake.base_url
    files_url = {
        "the-api": api_url,
        "https-elsewhere": fake.https_url.replace("127.0.0.1", "localhost") if api == "https" else fake.https_url,
        "http-elsewhere": fake.base_url.replace("127.0.0.1", "localhost"),
    }[files]
    fake.plan("generate", Answer(201, fake.prediction("succeeded", fake.file_url(PNG, "o.png", files_url))))

    elsewhere = (allowed_host("127.0.0.1"), allowed_host("localhost"))  # loopback: only when allowed
    _, stored = await generated(
        remote("replicate", replicate_base_url=f"{api_url}/v1", image_fetch_allowed_hosts=elsewhere)
    )

    [fetch] = fake.requests("/files/o.png")
    assert stored == PNG
    assert (fetch.headers.get("authorization") == f"Bearer {API_KEY}") is sent


# ---------------------------------------------------------------- size, log line, client lifetime


async def test_the_placeholder_draws_the_requested_size(local_settings: Settings) -> None:
    _, stored = await generated(local_settings, {"prompt": "a fox", "size": "300x200"})
    assert Image.open(io.BytesIO(stored)).size == (300, 200)


@pytest.mark.parametrize(
    "size",
    [
        "1024",
        "1024x",
        "63x512",
        "512x4097",
        "0x0",
        "1024X1024",
        " 512x512",
        "512x512 ",
        "+512x512",
        "٥١٢x512",
        512,
        [512, 512],
    ],
)
async def test_a_size_that_is_not_width_x_height_in_range_is_422(local_settings: Settings, size: object) -> None:
    async with serving(local_settings) as client:
        response = await client.post("/generate", json={"prompt": "a fox", "size": size})
    assert response.status_code == 422
    assert response.json() == {"detail": "size must be WIDTHxHEIGHT, each from 64 to 4096 pixels"}


@pytest.mark.parametrize(
    ("backend", "provider_id"), [("openai", r"req_\d+"), ("cog", r"pred_\d+"), ("replicate", r"p\d+")]
)
async def test_each_generation_logs_one_line(
    remote: MakeSettings, caplog: pytest.LogCaptureFixture, backend: str, provider_id: str
) -> None:
    caplog.set_level(logging.INFO, logger="gen_service.generate")
    await generated(remote(backend))

    [line] = [record for record in caplog.records if record.name == "gen_service.generate"]
    fields = line.fields  # type: ignore[attr-defined]
    model = {"openai": "gpt-image-2", "cog": "-", "replicate": MODEL}[backend]
    assert (fields["backend"], fields["model"], fields["outcome"], fields["attempts"]) == (backend, model, "ok", 1)
    assert re.fullmatch(provider_id, fields["provider_id"]) and fields["duration_ms"] > 0


async def test_the_providers_client_is_closed_at_shutdown(remote: MakeSettings) -> None:
    app = gen_service.create_app(remote("openai"))
    async with app.router.lifespan_context(app):
        assert not app.state.http_client.is_closed
    assert app.state.http_client.is_closed


def test_the_placeholder_opens_no_client(local_settings: Settings) -> None:
    assert gen_service.create_app(local_settings).state.http_client is None


# ---------------------------------------------------------------- readiness


@pytest.mark.parametrize("status", ["READY", "BUSY"])
async def test_ready_when_the_cog_container_says_so(remote: MakeSettings, fake: FakeProviders, status: str) -> None:
    fake.health = status
    async with serving(remote("cog")) as client:
        responses = [await client.get("/ready") for _ in range(3)]
    assert [response.json() for response in responses] == [{"status": "ready"}] * 3
    assert len(fake.requests("/health-check")) == 1  # cached, like the storage check


@pytest.mark.parametrize("status", ["STARTING", "SETUP_FAILED", "DEFUNCT", "UNHEALTHY"])
async def test_not_ready_while_the_cog_container_is_not(remote: MakeSettings, fake: FakeProviders, status: str) -> None:
    fake.health = status
    async with serving(remote("cog")) as client:
        response = await client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "detail": f"image generator is not ready ({status})"}


async def test_not_ready_when_the_cog_container_is_unreachable(remote: MakeSettings) -> None:
    nothing_listens = f"http://127.0.0.1:{free_port()}"
    async with serving(remote("cog", cog_url=nothing_listens)) as client:
        response = await client.get("/ready")
    assert (response.status_code, response.json()["detail"]) == (503, "image generator is unreachable")


@pytest.mark.parametrize("backend", ["openai", "replicate"])
async def test_hosted_apis_are_ready_without_a_paid_call(
    remote: MakeSettings, fake: FakeProviders, backend: str
) -> None:
    async with serving(remote(backend)) as client:
        response = await client.get("/ready")
    assert response.json() == {"status": "ready"}
    assert fake.seen == []
