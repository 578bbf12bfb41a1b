"""OpenAI's images API, and the servers that speak it (Azure OpenAI's v1 API, LocalAI)."""

from __future__ import annotations

import re
from typing import Any

from generators import GeneratedImage, Generation, Size
from providers.answers import Problem, Reply, body_problem, error_for, origin, request_id, unusable
from providers.exchange import ProviderHTTP
from providers.images import ImageReader, is_text

# OpenAI's refusal codes, and Azure's.
OPENAI_REFUSALS = frozenset({"moderation_blocked", "content_policy_violation", "contentFilter", "content_filter"})
SAFETY_VIOLATIONS = re.compile(r"safety_violations=\[([^\]]*)\]")


class OpenAIImages:
    """`POST {base_url}/images/generations`: OpenAI, Azure OpenAI's v1 API, and servers that speak the
    same API (LocalAI). GPT image models answer `b64_json` (and refuse `response_format`, so it is not
    sent); others may answer a `url`, which is fetched."""

    backend = "openai"

    def __init__(self, http: ProviderHTTP, *, base_url: str, api_key: str, model: str, max_image_bytes: int) -> None:
        self.http = http
        self.url = base_url.rstrip("/") + "/images/generations"
        self.api_key = api_key
        self.model = model
        self.images = ImageReader(http, max_image_bytes)

    async def generate(self, prompt: str, size: Size | None, generation: Generation) -> GeneratedImage:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "n": 1}
        if size is not None:
            body["size"] = str(size)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        request = self.http.request("POST", self.url, json=body, headers=headers)
        reply = await self.http.exchange(request, self.images.json_limit, generation, problem_of=openai_problem)
        generation.provider_id = request_id(reply, self.http.secrets)
        if not reply.ok:
            raise error_for(reply, openai_problem(reply), self.http.secrets)
        data = (await self.images.parsed(reply)).get("data")
        image = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        if is_text(image.get("b64_json")):
            return await self.images.from_base64(image["b64_json"])
        if is_text(image.get("url")):
            # The link is the provider's own; the API key is not sent to it.
            return await self.images.from_url(image["url"])
        raise unusable("image")

    async def check(self) -> None:
        return None  # configured is ready: the only check that proves the key would be a paid call

    def describe(self) -> str:
        return f"OpenAI-compatible images API at {origin(self.url)}, model {self.model}"


def openai_problem(reply: Reply) -> Problem:
    """`{"error": {"message", "type", "param", "code"}}`, with a refusal's categories where given: OpenAI
    puts them in `moderation_details` or in the message (`safety_violations=[...]`), Azure in
    `innererror.content_filter_results`."""
    answer = reply.json()
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        return body_problem(reply)
    code = str(error.get("code") or error.get("type") or f"HTTP {reply.status}")
    message = str(error.get("message") or "")
    inner = error.get("innererror") if isinstance(error.get("innererror"), dict) else {}
    if code not in OPENAI_REFUSALS and inner.get("code") != "ResponsibleAIPolicyViolation":
        return Problem(code, message)
    details = error.get("moderation_details")
    categories = details.get("categories") if isinstance(details, dict) else None
    if not isinstance(categories, list):
        categories = []
    if not categories and (listed := SAFETY_VIOLATIONS.search(message)):
        categories = listed[1].split(",")
    filtered = inner.get("content_filter_results")
    if not categories and isinstance(filtered, dict):
        categories = [name for name, result in filtered.items() if isinstance(result, dict) and result.get("filtered")]
    return Problem(code, message, refusal=", ".join(str(category).strip() for category in categories))
