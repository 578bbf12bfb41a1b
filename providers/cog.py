"""Cog models: in a container of our own, or hosted on Replicate."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from generators import GeneratedImage, Generation, GenerationError, Size
from providers.answers import (
    Problem,
    Reply,
    Secrets,
    body_problem,
    error_for,
    http_url,
    identifier,
    origin,
    provider_id,
    refused,
    request_id,
    shown,
    text,
    unusable,
)
from providers.exchange import ProviderHTTP
from providers.images import ImageReader, is_data_url, is_text
from providers.links import refused_link

log = logging.getLogger(__name__)

REPLICATE_WAIT_SECONDS = 60  # the longest `Prefer: wait` Replicate honours
# Replicate answers a held request when its wait is over, with the prediction and its cancel link: that answer
# must be here before the deadline, or a prediction still running then could not be cancelled.
WAIT_MARGIN_SECONDS = 5
POLL_SECONDS = 1.0
HEALTH_CHECK_SECONDS = 2.0
CANCEL_SECONDS = 2.0
SMALL_ANSWER = 64 * 1024  # the most read of a health check's or a cancel's answer
# How a model's own failure says that it refused the prompt (SDXL: "NSFW content detected...").
MODEL_REFUSAL = re.compile(r"nsfw|not safe for work|safety|content polic|moderation|flagged|inappropriate", re.I)


@dataclass(frozen=True)
class ReplicateModel:
    """What Replicate's hosted API adds to a Cog model's predictions: which model, and the token to ask with."""

    name: str  # owner/name
    token: str = field(repr=False)


class CogPredictions:
    """A Cog model's predictions API. In a container of our own (`replicate` None): `POST {COG_URL}/predictions`,
    answered when the prediction ends (and cancelled by the container when the connection drops). Hosted on
    Replicate: `POST {base_url}/models/{owner}/{name}/predictions` with `Prefer: wait`, then `urls.get`
    polled until it has output (and `urls.cancel` called if the caller leaves or time runs out)."""

    def __init__(
        self,
        http: ProviderHTTP,
        *,
        base_url: str,
        inputs: Mapping[str, Any],
        max_image_bytes: int,
        replicate: ReplicateModel | None = None,
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.inputs = dict(inputs)
        self.replicate = replicate
        self.images = ImageReader(http, max_image_bytes)
        if replicate is None:
            self.backend, self.model = "cog", None
            self.predictions_url = f"{self.base_url}/predictions"
        else:
            self.backend, self.model = "replicate", replicate.name
            self.predictions_url = f"{self.base_url}/models/{replicate.name}/predictions"

    def authorization(self, url: httpx.URL) -> dict[str, str]:
        """Replicate's token, for a URL of its API's own origin (scheme, host and port of REPLICATE_BASE_URL,
        where its files under /v1/files need it too), and for nothing else: a model's output may link to any
        host its author likes. A container gets no token."""
        if self.replicate is None or not self.http.links.is_own(url):
            return {}
        return {"Authorization": f"Bearer {self.replicate.token}"}

    def own_link(self, url: object, what: str) -> httpx.URL:
        """A link of Replicate's API (to poll or cancel a prediction): only ever on the API's own origin."""
        link = http_url(url, what)
        if not self.http.links.is_own(link):
            raise refused_link(link, f"a {what} not on the API's own origin")
        return link

    async def generate(self, prompt: str, size: Size | None, generation: Generation) -> GeneratedImage:
        dimensions = {"width": size.width, "height": size.height} if size else {}
        body = {"input": {**self.inputs, **dimensions, "prompt": prompt}}
        url = httpx.URL(self.predictions_url)
        request = self.http.request("POST", url, json=body, headers=self.authorization(url))
        before_each_try = ask_to_wait if self.replicate is not None else None
        reply = await self.http.exchange(request, self.images.json_limit, generation, before_each_try=before_each_try)
        generation.provider_id = request_id(reply, self.http.secrets)  # until there is a prediction id
        if not reply.ok:
            raise error_for(reply, cog_problem(reply), self.http.secrets)
        prediction = await self.images.parsed(reply, "prediction")
        generation.provider_id = self.prediction_id(prediction) or generation.provider_id
        if self.replicate is not None:
            prediction = await self.until_output(prediction)
        if prediction.get("status") in ("failed", "canceled"):
            raise failed(prediction, self.http.secrets)
        output = prediction.get("output")
        first = output[0] if isinstance(output, list) and output else output
        if not is_text(first):
            raise unusable("image output")
        if is_data_url(first):
            return await self.images.from_url(first)
        link = http_url(first, "image output")
        return await self.images.from_url(first, self.authorization(link))

    def prediction_id(self, prediction: dict[str, Any]) -> str | None:
        return provider_id(prediction.get("id"), "prediction id", self.http.secrets)

    async def until_output(self, prediction: dict[str, Any]) -> dict[str, Any]:
        """The prediction once it has output or has ended, polling `urls.get` meanwhile. Output may come while
        it is still `processing`: Replicate answers a `Prefer: wait` with a model's output files as soon as
        they are all there, and they are what is wanted."""
        urls = prediction.get("urls") if isinstance(prediction.get("urls"), dict) else {}
        try:
            while prediction.get("status") in ("starting", "processing") and not prediction.get("output"):
                poll_url = self.own_link(urls.get("get"), "prediction URL")
                await anyio.sleep(POLL_SECONDS)
                poll = self.http.request("GET", poll_url, headers=self.authorization(poll_url))
                reply = await self.http.exchange(poll, self.images.json_limit, None)
                if not reply.ok:
                    raise error_for(reply, cog_problem(reply), self.http.secrets)
                prediction = await self.images.parsed(reply, "prediction")
                self.prediction_id(prediction)
        except BaseException:
            if urls.get("cancel") is not None:
                await self.cancel(urls["cancel"])
            raise
        return prediction

    async def cancel(self, url: object) -> None:
        """Best effort, shielded from the cancellation that brought us here: a prediction left running costs."""
        with anyio.move_on_after(CANCEL_SECONDS, shield=True):
            try:
                link = self.own_link(url, "cancel URL")
                await self.http.send(self.http.request("POST", link, headers=self.authorization(link)), SMALL_ANSWER)
            except (httpx.HTTPError, GenerationError) as error:
                log.warning(
                    "could not cancel the prediction: %s", shown(getattr(error, "detail", type(error).__name__))
                )

    async def check(self) -> None:
        """A container's `GET /health-check`: HTTP 200 (or 503 in newer Cog versions) whatever its state,
        which `status` says. Replicate: configured is ready (the only check that proves the token would be
        a paid call)."""
        if self.replicate is not None:
            return
        try:
            with anyio.fail_after(HEALTH_CHECK_SECONDS):
                reply = await self.http.send(self.http.request("GET", f"{self.base_url}/health-check"), SMALL_ANSWER)
        except (httpx.HTTPError, TimeoutError, GenerationError):
            raise GenerationError(503, "image generator is unreachable", "unavailable") from None
        answer = reply.json()
        status = identifier(answer.get("status")) if isinstance(answer, dict) else None
        if status not in ("READY", "BUSY"):
            raise GenerationError(
                503, f"image generator is not ready ({status or f'HTTP {reply.status}'})", "unavailable"
            )

    def describe(self) -> str:
        if self.replicate is None:
            return f"Cog container at {origin(self.base_url)}"
        return f"Replicate at {origin(self.base_url)}, model {self.model}"


def ask_to_wait(request: httpx.Request) -> None:
    """Asks Replicate to hold `request` until the prediction ends, but at most until WAIT_MARGIN_SECONDS before
    the deadline (it then answers with the prediction still running); with less time left than that, not at
    all (it answers at once). Set before each try: retries use up the time."""
    remaining = anyio.current_effective_deadline() - anyio.current_time()
    wait = int(min(REPLICATE_WAIT_SECONDS, remaining - WAIT_MARGIN_SECONDS))
    if wait >= 1:
        request.headers["Prefer"] = f"wait={wait}"
    else:
        request.headers.pop("Prefer", None)


def cog_problem(reply: Reply) -> Problem:
    """Replicate's problem+json (`{"title", "detail", "status"}`), or Cog's own `{"detail": ...}`."""
    answer = reply.json()
    if not isinstance(answer, dict):
        return body_problem(reply)
    detail = answer.get("detail")
    return Problem(
        str(answer.get("title") or f"HTTP {reply.status}"), detail if isinstance(detail, str) else json.dumps(detail)
    )


def failed(prediction: dict[str, Any], secrets: Secrets) -> GenerationError:
    """A prediction that ended without output: refused when the model says so, else the model failed."""
    error = text(prediction.get("error"))
    if MODEL_REFUSAL.search(error):
        return refused(error, secrets)
    log.warning(
        "the model's prediction %s ended %s: %s",
        shown(prediction.get("id", "-"), secrets),
        shown(prediction.get("status"), secrets),
        shown(error, secrets),
    )
    return GenerationError(502, "image generator failed", "failed")
