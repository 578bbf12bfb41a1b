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
from providers.answers import Problem, Reply, error_for, http_url, origin, refused, same_origin, unusable
from providers.exchange import exchange
from providers.images import ImageReader

log = logging.getLogger(__name__)

REPLICATE_WAIT_SECONDS = 60  # the longest `Prefer: wait` Replicate honours
# Replicate answers a held request when its wait is over, with the prediction and its cancel link: that answer
# must be here before the deadline, or a prediction still running then could not be cancelled.
WAIT_MARGIN_SECONDS = 5
POLL_SECONDS = 1.0
HEALTH_CHECK_SECONDS = 2.0
CANCEL_SECONDS = 2.0
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
        client: httpx.AsyncClient,
        *,
        base_url: str,
        inputs: Mapping[str, Any],
        max_image_bytes: int,
        replicate: ReplicateModel | None = None,
    ) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.inputs = dict(inputs)
        self.replicate = replicate
        self.images = ImageReader(client, max_image_bytes)
        if replicate is None:
            self.backend, self.model = "cog", None
            self.predictions_url = f"{self.base_url}/predictions"
        else:
            self.backend, self.model = "replicate", replicate.name
            self.predictions_url = f"{self.base_url}/models/{replicate.name}/predictions"
        # Taken out of any provider's message that is logged.
        self.secret = None if replicate is None else replicate.token

    def authorization(self, url: str) -> dict[str, str]:
        """Replicate's token, for a URL of its API's own origin (scheme, host and port of REPLICATE_BASE_URL,
        where its files under /v1/files need it too), and for nothing else: a model's output may link to any
        host its author likes. A container gets no token."""
        if self.replicate is None or not same_origin(url, self.base_url):
            return {}
        return {"Authorization": f"Bearer {self.replicate.token}"}

    async def generate(self, prompt: str, size: Size | None, generation: Generation) -> GeneratedImage:
        dimensions = {"width": size.width, "height": size.height} if size else {}
        body = {"input": {**self.inputs, **dimensions, "prompt": prompt}}
        headers = self.authorization(self.predictions_url)
        request = self.client.build_request("POST", self.predictions_url, json=body, headers=headers)
        before_each_try = ask_to_wait if self.replicate is not None else None
        reply = await exchange(
            self.client, request, self.images.json_limit, generation, before_each_try=before_each_try
        )
        generation.provider_id = reply.headers.get("x-request-id")  # until there is a prediction id
        if not reply.ok:
            raise error_for(reply, cog_problem(reply), secret=self.secret)
        prediction = await self.images.parsed(reply)
        if not isinstance(prediction, dict):
            raise unusable("prediction")
        generation.provider_id = prediction.get("id") or generation.provider_id
        if self.replicate is not None:
            prediction = await self.until_output(prediction)
        if prediction.get("status") in ("failed", "canceled"):
            raise failed(prediction)
        output = prediction.get("output")
        first = output[0] if isinstance(output, list) and output else output
        if not isinstance(first, str):
            raise unusable("image output")
        return await self.images.from_url(first, self.authorization(first))

    async def until_output(self, prediction: dict[str, Any]) -> dict[str, Any]:
        """The prediction once it has output or has ended, polling `urls.get` meanwhile. Output may come while
        it is still `processing`: Replicate answers a `Prefer: wait` with a model's output files as soon as
        they are all there, and they are what is wanted."""
        urls = prediction.get("urls") if isinstance(prediction.get("urls"), dict) else {}
        try:
            while prediction.get("status") in ("starting", "processing") and not prediction.get("output"):
                poll_url = http_url(urls.get("get"), "prediction URL")
                await anyio.sleep(POLL_SECONDS)
                poll = self.client.build_request("GET", poll_url, headers=self.authorization(urls["get"]))
                reply = await exchange(self.client, poll, self.images.json_limit, None)
                if not reply.ok:
                    raise error_for(reply, cog_problem(reply), secret=self.secret)
                prediction = await self.images.parsed(reply)
                if not isinstance(prediction, dict):
                    raise unusable("prediction")
        except BaseException:
            if isinstance(urls.get("cancel"), str):
                await self.cancel(urls["cancel"])
            raise
        return prediction

    async def cancel(self, url: str) -> None:
        """Best effort, shielded from the cancellation that brought us here: a prediction left running costs."""
        with anyio.move_on_after(CANCEL_SECONDS, shield=True):
            try:
                await self.client.post(url, headers=self.authorization(url))
            except (httpx.HTTPError, httpx.InvalidURL) as error:
                log.warning("could not cancel the prediction: %s", type(error).__name__)

    async def check(self) -> None:
        """A container's `GET /health-check`: HTTP 200 (or 503 in newer Cog versions) whatever its state,
        which `status` says. Replicate: configured is ready (the only check that proves the token would be
        a paid call)."""
        if self.replicate is not None:
            return
        try:
            with anyio.fail_after(HEALTH_CHECK_SECONDS):
                response = await self.client.get(f"{self.base_url}/health-check")
        except (httpx.HTTPError, TimeoutError):
            raise GenerationError(503, "image generator is unreachable", "unavailable") from None
        try:
            status = response.json().get("status")
        except (ValueError, AttributeError):
            status = None
        if status not in ("READY", "BUSY"):
            raise GenerationError(
                503, f"image generator is not ready ({status or f'HTTP {response.status_code}'})", "unavailable"
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
        return Problem(f"HTTP {reply.status}", reply.body[:500].decode(errors="replace"))
    detail = answer.get("detail")
    return Problem(
        str(answer.get("title") or f"HTTP {reply.status}"), detail if isinstance(detail, str) else json.dumps(detail)
    )


def failed(prediction: dict[str, Any]) -> GenerationError:
    """A prediction that ended without output: refused when the model says so, else the model failed."""
    error = str(prediction.get("error") or "")
    if MODEL_REFUSAL.search(error):
        return refused(error)
    log.warning("the model's prediction %s ended %s: %s", prediction.get("id", "-"), prediction.get("status"), error)
    return GenerationError(502, "image generator failed", "failed")
