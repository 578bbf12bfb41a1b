"""How each provider's refusals, throttling, outages, slowness and bad images reach the caller: the status
and detail of the error contract, retries only where they can help, nothing stored, and no key shown."""

from __future__ import annotations

import base64
import email.utils
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import httpx
import pytest

from conftest import MakeSettings, free_port, generated_images, serving
from fake_providers import (
    API_KEY,
    GIF,
    PNG,
    Answer,
    FakeProviders,
    bomb_png,
    data_url,
    noise_png,
    openai_error,
    openai_image,
    openai_link,
    problem,
)
from settings import Settings

pytestmark = pytest.mark.anyio

MAX_IMAGE_BYTES = 200_000
GENERATION_PATHS = {"openai": "/v1/images/generations", "cog": "/predictions", "replicate": "/acme/painter/predictions"}


class Failure(NamedTuple):
    backend: str
    answers: list[Answer]  # what the provider's generation requests get, in turn
    status: int
    detail: str
    attempts: int = 1
    retry_after: str | None = None


def openai(status: int, code: str | None, message: str = "", **more: Any) -> Answer:
    return Answer(status, openai_error(code, message or f"{code} happened", **more))


def prediction_failed(error: str, status: str = "failed") -> Answer:
    return Answer(json={"id": "pred_9", "status": status, "output": None, "error": error})


def replicate(status: int, title: str, **headers: str) -> Answer:
    return Answer(status, problem(status, title, f"{title}: details"), headers=headers)


def azure_filtered(results: object) -> Answer:
    """Azure's refusal, with its content filter's results per category."""
    inner = {"code": "ResponsibleAIPolicyViolation", "content_filter_results": results}
    return openai(400, "content_policy_violation", innererror=inner)


def misconfigured(backend: str, answer: Answer, code: str, attempts: int = 1) -> Failure:
    """An answer only the operator can fix, `attempts` times: 502 naming the provider's code or title."""
    return Failure(backend, [answer] * attempts, 502, f"image generator refused the request ({code})", attempts)


REFUSED = "the image generator refused the prompt"
FAILURES = {
    # Refusals of the prompt: 422, never retried.
    "openai-moderation-blocked": Failure(
        "openai",
        [openai(400, "moderation_blocked", "Your request was rejected. safety_violations=[sexual].")],
        422,
        f"{REFUSED}: sexual",
    ),
    "openai-moderation-details": Failure(
        "openai",
        [openai(400, "moderation_blocked", moderation_details={"categories": ["violence", "self-harm"]})],
        422,
        f"{REFUSED}: violence, self-harm",
    ),
    "openai-content-policy": Failure("openai", [openai(400, "content_policy_violation")], 422, REFUSED),
    "azure-content-filter": Failure(
        "openai", [openai(400, "contentFilter", "Your task failed as a result of our safety system.")], 422, REFUSED
    ),
    "azure-filter-results": Failure(
        "openai",
        [
            azure_filtered(
                {"sexual": {"filtered": False, "severity": "safe"}, "violence": {"filtered": True, "severity": "high"}}
            )
        ],
        422,
        f"{REFUSED}: violence",
    ),
    # Refusals whose details are not of the documented shape: refusals still, without the categories.
    "openai-moderation-details-not-an-object": Failure(
        "openai", [openai(400, "moderation_blocked", moderation_details="violence")], 422, REFUSED
    ),
    "openai-moderation-categories-not-a-list": Failure(
        "openai", [openai(400, "moderation_blocked", moderation_details={"categories": "violence"})], 422, REFUSED
    ),
    "azure-filter-results-not-an-object": Failure("openai", [azure_filtered(["violence"])], 422, REFUSED),
    "azure-filter-result-not-an-object": Failure("openai", [azure_filtered({"violence": True})], 422, REFUSED),
    "cog-nsfw": Failure(
        "cog",
        [prediction_failed("NSFW content detected. Try a different prompt.")],
        422,
        f"{REFUSED}: NSFW content detected. Try a different prompt.",
    ),
    "replicate-nsfw": Failure(
        "replicate",
        [Answer(201, {"id": "p9", "status": "failed", "output": None, "error": "All images contained NSFW content."})],
        422,
        f"{REFUSED}: All images contained NSFW content.",
    ),
    # What the caller cannot fix: 502 naming the provider's code or title, never retried.
    "openai-bad-key": misconfigured("openai", openai(401, "invalid_api_key"), "invalid_api_key"),
    "openai-unverified": misconfigured(
        "openai", openai(403, None, "Your organization must be verified"), "invalid_request_error"
    ),
    "openai-unknown-model": misconfigured("openai", openai(404, "model_not_found"), "model_not_found"),
    "openai-billing": misconfigured("openai", openai(402, "billing_not_active"), "billing_not_active"),
    # A 429 that says the money is spent: waiting will not help, so it is not retried.
    "openai-quota": misconfigured(
        "openai", openai(429, "insufficient_quota", kind="insufficient_quota"), "insufficient_quota"
    ),
    "openai-hard-limit": misconfigured(
        "openai", openai(429, "billing_hard_limit_reached"), "billing_hard_limit_reached"
    ),
    "openai-bad-size": misconfigured("openai", openai(400, "invalid_value"), "invalid_value"),
    "openai-not-json": misconfigured("openai", Answer(400, body=b"<html>bad gateway</html>"), "HTTP 400"),
    "cog-bad-input": misconfigured(
        "cog", Answer(422, {"detail": [{"loc": ["body", "input", "steps"], "msg": "not an int"}]}), "HTTP 422"
    ),
    "replicate-bad-token": misconfigured("replicate", replicate(401, "Unauthenticated"), "Unauthenticated"),
    # A title that is not a short identifier is not shown: the status is.
    "replicate-unknown-model": misconfigured("replicate", replicate(404, "Not found"), "HTTP 404"),
    "replicate-bad-input": misconfigured("replicate", replicate(422, "Input validation failed"), "HTTP 422"),
    "replicate-identifier-title": misconfigured("replicate", replicate(422, "input_invalid"), "input_invalid"),
    "cog-model-failed": Failure("cog", [prediction_failed("CUDA out of memory")], 502, "image generator failed"),
    "replicate-canceled": Failure(
        "replicate",
        [Answer(201, {"id": "p9", "status": "canceled", "output": None, "error": None})],
        502,
        "image generator failed",
    ),
    # Throttled or busy after retries: 503 with the provider's Retry-After, if it gave one.
    "openai-throttled": Failure("openai", [openai(429, "rate_limit_exceeded")] * 3, 503, "image generator is busy", 3),
    "cog-busy": Failure(
        "cog", [Answer(409, {"detail": "Already running a prediction"})] * 3, 503, "image generator is busy", 3
    ),
    "cog-starting": Failure("cog", [Answer(503, {"detail": "not ready"})] * 3, 503, "image generator is busy", 3),
    "replicate-throttled": Failure(
        "replicate",
        [replicate(429, "Request was throttled.", **{"retry-after": "0"})] * 3,
        503,
        "image generator is busy",
        3,
        "0",
    ),
    # Failing: 503 after retries.
    "openai-500": Failure(
        "openai", [openai(500, "server_error")] * 3, 503, "image generator is unavailable (HTTP 500)", 3
    ),
    "cog-502": Failure(
        "cog", [Answer(502, body=b"bad gateway")] * 3, 503, "image generator is unavailable (HTTP 502)", 3
    ),
    "replicate-500": Failure(
        "replicate", [replicate(500, "Internal server error")] * 3, 503, "image generator is unavailable (HTTP 500)", 3
    ),
}


@asynccontextmanager
async def answered(settings: Settings, body: dict[str, Any] | None = None) -> AsyncIterator[httpx.Response]:
    async with serving(settings) as client:
        yield await client.post("/generate", json=body or {"prompt": "a fox"})


def assert_contract(response: httpx.Response, status: int, detail: str, settings: Settings, logged: str) -> None:
    """The status and detail, JSON; nothing stored; the key neither answered nor logged."""
    assert (response.status_code, response.json()) == (status, {"detail": detail})
    assert generated_images(settings.local_storage_dir) == []
    assert API_KEY not in response.text + str(response.headers) + logged


@pytest.mark.parametrize("case", FAILURES.values(), ids=FAILURES.keys())
async def test_each_failure_gets_its_status_and_detail(
    remote: MakeSettings, fake: FakeProviders, caplog: pytest.LogCaptureFixture, case: Failure
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.plan("generate", *case.answers)
    settings = remote(case.backend)

    async with answered(settings) as response:
        pass

    assert_contract(response, case.status, case.detail, settings, caplog.text)
    assert response.headers.get("retry-after") == case.retry_after
    assert len(fake.requests(GENERATION_PATHS[case.backend], "POST")) == case.attempts
    [line] = [record for record in caplog.records if record.name == "gen_service.generate"]
    assert line.fields["attempts"] == case.attempts  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", ["openai", "replicate"])
async def test_a_wrong_key_is_logged_once_with_its_status_and_request_id_only(
    remote: MakeSettings, fake: FakeProviders, caplog: pytest.LogCaptureFixture, backend: str
) -> None:
    """The fake echoes the wrong key in its 401's message: what a 401 or 403 says is not logged at all."""
    caplog.set_level(logging.INFO)
    settings = remote(backend, openai_api_key="sk-wrong-0123456789", replicate_api_token="sk-wrong-0123456789")

    async with answered(settings) as response:
        pass

    assert response.status_code == 502
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1
    code = "invalid_api_key" if backend == "openai" else "Unauthenticated"
    assert re.fullmatch(rf"image generator refused the request: HTTP 401 {code} \(x-request-id req_\d+\)", warnings[0])
    assert "sk-wrong-0123456789" not in caplog.text + response.text


@pytest.mark.parametrize("backend", ["openai", "replicate"])
async def test_a_providers_message_is_logged_redacted_and_bounded(
    remote: MakeSettings, fake: FakeProviders, caplog: pytest.LogCaptureFixture, backend: str
) -> None:
    message = f"model {'x' * 5000} is not for {API_KEY}"
    answer = openai(404, "model_not_found", message) if backend == "openai" else replicate(404, "not_found")
    if backend == "replicate":
        answer.json["detail"] = message
    fake.plan("generate", answer)

    async with answered(remote(backend)) as response:
        pass

    assert response.status_code == 502
    [warning] = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert "HTTP 404" in warning and "more]" in warning and len(warning) < 400
    assert API_KEY not in caplog.text + response.text


# ---------------------------------------------------------------- retries


async def test_retry_after_in_seconds_is_waited_then_the_retry_succeeds(
    remote: MakeSettings, fake: FakeProviders
) -> None:
    fake.plan("generate", Answer(429, openai_error("rate_limit_exceeded", "slow down"), headers={"retry-after": "1"}))

    async with answered(remote("openai")) as response:
        assert response.status_code == 200, response.text

    first, second = fake.requests("/v1/images/generations")
    assert second.at - first.at >= 0.95


async def test_retry_after_as_an_http_date_is_waited(remote: MakeSettings, fake: FakeProviders) -> None:
    later = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1 to 2 s from now
    fake.plan("generate", Answer(503, {"detail": "warming up"}, headers={"retry-after": later}))

    async with answered(remote("cog")) as response:
        assert response.status_code == 200, response.text

    first, second = fake.requests("/predictions")
    assert second.at - first.at >= 0.9


@pytest.mark.parametrize("status", [409, 500, 502, 503, 504, 408])
async def test_a_passing_failure_is_retried_with_backoff(
    remote: MakeSettings, fake: FakeProviders, status: int
) -> None:
    fake.plan("generate", Answer(status, {"detail": "try again"}))

    async with answered(remote("cog")) as response:
        assert response.status_code == 200, response.text

    first, second = fake.requests("/predictions")
    assert second.at - first.at >= 0.5 * 0.75  # the first backoff, less its jitter


async def test_retry_after_beyond_the_deadline_is_answered_at_once(remote: MakeSettings, fake: FakeProviders) -> None:
    fake.plan("generate", Answer(429, openai_error("rate_limit_exceeded", "slow down"), headers={"retry-after": "30"}))

    async with answered(remote("openai", generate_timeout_seconds=10)) as response:
        pass

    assert (response.status_code, response.headers["retry-after"]) == (503, "30")
    assert len(fake.requests("/v1/images/generations")) == 1


async def test_a_retried_replicate_request_is_asked_to_wait_only_for_what_is_left(
    remote: MakeSettings, fake: FakeProviders
) -> None:
    fake.plan("generate", replicate(429, "Request was throttled.", **{"retry-after": "2"}))

    async with answered(remote("replicate", generate_timeout_seconds=10)) as response:
        assert response.status_code == 200, response.text

    first, second = (
        int(seen.headers["prefer"].removeprefix("wait=")) for seen in fake.requests("/predictions", "POST")
    )
    assert second <= first - 2


async def test_an_unreachable_provider_is_503_after_retries(
    remote: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = remote("cog", cog_url=f"http://127.0.0.1:{free_port()}")

    async with answered(settings) as response:
        pass

    assert_contract(response, 503, "image generator is unreachable", settings, caplog.text)
    [line] = [record for record in caplog.records if record.name == "gen_service.generate"]
    assert line.fields["attempts"] == 3  # type: ignore[attr-defined]


# ---------------------------------------------------------------- time


@pytest.mark.parametrize("backend", ["openai", "cog", "replicate"])
async def test_past_the_deadline_the_caller_gets_504_and_the_provider_is_left(
    remote: MakeSettings, fake: FakeProviders, caplog: pytest.LogCaptureFixture, backend: str
) -> None:
    fake.plan("generate", Answer(hold=True))
    settings = remote(backend, generate_timeout_seconds=1)

    async with answered(settings) as response:
        pass

    assert_contract(response, 504, "image generator did not answer in time", settings, caplog.text)
    assert fake.wait_until(lambda: fake.callers_left == 1)  # the connection was closed, not left waiting


async def test_a_replicate_prediction_still_running_at_the_deadline_is_cancelled(
    remote: MakeSettings, fake: FakeProviders, caplog: pytest.LogCaptureFixture
) -> None:
    running = fake.prediction("processing")
    fake.plan("generate", Answer(201, running))
    fake.plan("poll", *[Answer(json=running)] * 1000)
    settings = remote("replicate", generate_timeout_seconds=1)

    async with answered(settings) as response:
        pass

    assert_contract(response, 504, "image generator did not answer in time", settings, caplog.text)
    [cancel] = fake.requests("/cancel", "POST")
    assert cancel.path == f"/v1/predictions/{running['id']}/cancel"
    assert cancel.headers["authorization"] == f"Bearer {API_KEY}"


async def test_a_replicate_prediction_held_past_its_wait_is_still_cancelled_at_the_deadline(
    remote: MakeSettings, fake: FakeProviders, caplog: pytest.LogCaptureFixture
) -> None:
    """Replicate holds the request that creates the prediction for as long as `Prefer: wait` asks: its answer,
    the first to carry the cancel link, comes seconds before the deadline, and the prediction is cancelled."""
    running = fake.prediction("processing")
    fake.plan("generate", Answer(201, running, wait=True))
    fake.plan("poll", *[Answer(json=running)] * 1000)
    settings = remote("replicate", generate_timeout_seconds=7)

    async with answered(settings) as response:
        pass

    assert_contract(response, 504, "image generator did not answer in time", settings, caplog.text)
    [create] = fake.requests(GENERATION_PATHS["replicate"], "POST")
    [polled, *_] = fake.requests("/v1/predictions/", "GET")
    assert polled.at - create.at < 7 - 3  # the answer came at least 3 s before the deadline
    [cancel] = fake.requests("/cancel", "POST")
    assert cancel.path == f"/v1/predictions/{running['id']}/cancel"


# ---------------------------------------------------------------- what comes back


def b64(data: bytes) -> Answer:
    return Answer(json=openai_image(data))


BAD_IMAGES = {
    "garbage": (
        b64(b"\x89PNG but not really" * 50),
        "image generator sent something that is not a PNG, JPEG or WebP image",
    ),
    "gif": (b64(GIF), "image generator sent something that is not a PNG, JPEG or WebP image"),
    "truncated-png": (
        b64(PNG[: len(PNG) // 2]),
        "image generator sent something that is not a PNG, JPEG or WebP image",
    ),
    "over-max-image-bytes": (b64(noise_png(270)), f"image generator sent an image over {MAX_IMAGE_BYTES} bytes"),
    "decompression-bomb": (b64(bomb_png()), "image generator sent an image of more than 16777216 pixels"),
    # Under Pillow's own bound (89 M pixels) but over ours: 25 M pixels, 75 MB decoded, in 5 KB.
    "bomb-under-pillows-bound": (b64(bomb_png(5000)), "image generator sent an image of more than 16777216 pixels"),
    "answer-over-the-bound": (
        Answer(json=openai_image(b"x" * 2 * MAX_IMAGE_BYTES)),
        f"image generator sent an answer over {MAX_IMAGE_BYTES * 4 // 3 + 64 * 1024} bytes",
    ),
    "invalid-base64": (
        Answer(json={"data": [{"b64_json": "not base64!"}]}),
        "image generator sent an image in invalid base64",
    ),
    "no-image": (Answer(json={"created": 1, "data": []}), "image generator sent no image"),
    "not-json": (Answer(body=b"<html>"), "image generator sent no JSON"),
    "undecodable-content-encoding": (
        Answer(body=b"not gzip at all", headers={"content-encoding": "gzip"}),
        "image generator sent an answer that could not be read",
    ),
}


@pytest.mark.parametrize(("answer", "detail"), BAD_IMAGES.values(), ids=BAD_IMAGES.keys())
async def test_what_is_not_a_bounded_png_jpeg_or_webp_is_502(
    remote: MakeSettings, fake: FakeProviders, caplog: pytest.LogCaptureFixture, answer: Answer, detail: str
) -> None:
    fake.plan("generate", answer)
    settings = remote("openai", max_image_bytes=MAX_IMAGE_BYTES)

    async with answered(settings) as response:
        pass

    assert_contract(response, 502, detail, settings, caplog.text)


async def test_an_image_url_over_the_bound_is_not_read_past_it(remote: MakeSettings, fake: FakeProviders) -> None:
    fake.plan("generate", Answer(json=openai_link(fake.file_url(noise_png(300), "big.png"))))
    settings = remote("openai", max_image_bytes=MAX_IMAGE_BYTES)

    async with answered(settings) as response:
        pass

    assert (response.status_code, response.json()["detail"]) == (
        502,
        f"image generator sent an answer over {MAX_IMAGE_BYTES} bytes",
    )
    assert generated_images(settings.local_storage_dir) == []


@pytest.mark.parametrize(
    "output", ["ftp://example.com/a.png", "data:image/png,not-base64", 42, "http://[::1", "http:///a"]
)
async def test_an_unusable_cog_output_is_502(remote: MakeSettings, fake: FakeProviders, output: object) -> None:
    fake.plan("generate", Answer(json={"id": "pred_1", "status": "succeeded", "output": output}))
    settings = remote("cog")

    async with answered(settings) as response:
        pass

    assert response.status_code == 502
    assert response.json()["detail"].startswith("image generator sent no ")
    assert generated_images(settings.local_storage_dir) == []


async def test_an_image_url_that_redirects_without_end_is_502(remote: MakeSettings, fake: FakeProviders) -> None:
    looping = fake.file_url(PNG, "loop.png")
    fake.plan("generate", Answer(json=openai_link(looping)))
    fake.plan("file", *[Answer(302, {"detail": "moved"}, headers={"location": looping})] * 30)
    settings = remote("openai")

    async with answered(settings) as response:
        pass

    assert (response.status_code, response.json()) == (502, {"detail": "image generator sent too many redirects"})
    assert len(fake.requests("/files/loop.png")) == 6  # the first, then the 5 redirects followed
    assert generated_images(settings.local_storage_dir) == []


@pytest.mark.parametrize(
    "urls",
    [{"get": "http://[::1", "cancel": "http://[::1"}, {"get": "ftp://x/p1"}, {"get": 42}, None],
    ids=["invalid", "not-http", "not-a-string", "none"],
)
async def test_a_replicate_prediction_without_a_usable_url_to_poll_is_502(
    remote: MakeSettings, fake: FakeProviders, urls: object
) -> None:
    fake.plan("generate", Answer(201, {**fake.prediction("starting"), "urls": urls}))
    settings = remote("replicate")

    async with answered(settings) as response:
        pass

    assert (response.status_code, response.json()) == (502, {"detail": "image generator sent no prediction URL"})
    assert generated_images(settings.local_storage_dir) == []


async def test_an_image_url_that_fails_is_502(remote: MakeSettings, fake: FakeProviders) -> None:
    fake.plan(
        "generate", Answer(json={"id": "pred_1", "status": "succeeded", "output": f"{fake.base_url}/files/gone.png"})
    )
    settings = remote("cog")

    async with answered(settings) as response:
        pass

    assert response.json() == {"detail": "image generator's image URL answered HTTP 404"}
    assert generated_images(settings.local_storage_dir) == []


def test_fixtures_are_images_of_the_kinds_named() -> None:
    """The bomb really is small on the wire and huge in pixels; the noise PNG really is over the bound."""
    assert len(bomb_png()) < 100_000 and len(noise_png(300)) > MAX_IMAGE_BYTES
    assert data_url(PNG).startswith("data:image/png;base64,") and base64.b64decode(data_url(PNG)[22:]) == PNG
