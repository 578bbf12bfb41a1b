"""The links a provider gives (an image's URL, a redirect, Replicate's prediction URLs) reach only the
provider's own origin, hosts the operator allowed, or public addresses, at the address checked: never
the private network the service runs in. The private network is `internal`, another port of 127.0.0.1."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from environs import EnvError

import settings as settings_module
from conftest import MakeSettings, free_port, generated_images, serving
from fake_providers import API_KEY, PNG, Answer, FakeProviders, InternalService, openai_link
from providers.exchange import ProviderHTTP
from providers.links import AllowedHost, Links, allowed_host, is_public
from settings import Settings

pytestmark = pytest.mark.anyio

BACKENDS = ["openai", "cog", "replicate"]
LINK_REFUSED = {"detail": "image generator sent a link the service will not fetch"}


def image_answer(backend: str, fake: FakeProviders, url: str) -> Answer:
    """The provider's success, its image at `url`."""
    if backend == "openai":
        return Answer(json=openai_link(url))
    if backend == "cog":
        return Answer(json={"id": "pred_1", "status": "succeeded", "output": url})
    return Answer(201, fake.prediction("succeeded", [url]))


async def generate(settings: Settings) -> httpx.Response:
    async with serving(settings) as client:
        return await client.post("/generate", json={"prompt": "a fox"})


def assert_refused(response: httpx.Response, settings: Settings, internal: InternalService) -> None:
    assert (response.status_code, response.json()) == (502, LINK_REFUSED)
    assert internal.seen == []  # no request reached it
    assert generated_images(settings.local_storage_dir) == []


# ---------------------------------------------------------------- refused


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["direct", "redirected"])
async def test_a_link_into_the_private_network_is_refused_and_nothing_is_sent_to_it(
    remote: MakeSettings,
    fake: FakeProviders,
    internal: InternalService,
    caplog: pytest.LogCaptureFixture,
    backend: str,
    how: str,
) -> None:
    target = f"{internal.base_url}/image.png?signature=s3cr3t"
    url = target if how == "direct" else fake.file_url(PNG, "moved.png")
    fake.plan("file", Answer(302, {"detail": "moved"}, headers={"location": target}))
    fake.plan("generate", image_answer(backend, fake, url))
    settings = remote(backend)

    assert_refused(await generate(settings), settings, internal)
    [warning] = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert f"a link to {internal.base_url}, which the service will not fetch" in warning
    assert "s3cr3t" not in caplog.text and "/image.png" not in caplog.text


@pytest.mark.parametrize(
    "host",
    ["localhost", "127.1", "0x7f.0.0.1", "2130706433", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0"],
)
async def test_loopback_under_any_spelling_is_refused(
    remote: MakeSettings, fake: FakeProviders, internal: InternalService, host: str
) -> None:
    port = internal.base_url.rpartition(":")[2]
    fake.plan("generate", image_answer("openai", fake, f"http://{host}:{port}/image.png"))
    settings = remote("openai")

    assert_refused(await generate(settings), settings, internal)


async def test_an_open_and_a_closed_port_look_the_same(
    remote: MakeSettings, fake: FakeProviders, internal: InternalService
) -> None:
    """Refused before any connection: the answers cannot tell which ports of the network are open."""
    answers = []
    for url in (f"{internal.base_url}/forbidden", f"http://127.0.0.1:{free_port()}/forbidden"):
        fake.plan("generate", image_answer("cog", fake, url))
        response = await generate(remote("cog"))
        answers.append((response.status_code, response.json()))

    assert answers == [(502, LINK_REFUSED)] * 2
    assert internal.seen == []


@pytest.mark.parametrize("link", ["get", "cancel"])
async def test_replicates_prediction_urls_must_be_on_its_own_origin(
    remote: MakeSettings, fake: FakeProviders, internal: InternalService, link: str
) -> None:
    """`urls.get` elsewhere is a bad answer; `urls.cancel` elsewhere is never called, even at the deadline."""
    running = fake.prediction("processing")
    running["urls"][link] = f"{internal.base_url}/v1/predictions/p1/{link}"
    fake.plan("generate", Answer(201, running))
    fake.plan("poll", *[Answer(json=running)] * 1000)
    settings = remote("replicate", generate_timeout_seconds=1)

    response = await generate(settings)

    if link == "get":
        assert (response.status_code, response.json()) == (502, LINK_REFUSED)
    else:
        assert response.status_code == 504
        assert fake.requests("/cancel") == []
    assert internal.seen == []


async def test_a_redirect_from_the_providers_own_poll_url_is_checked_too(
    remote: MakeSettings, fake: FakeProviders, internal: InternalService
) -> None:
    fake.plan("generate", Answer(201, fake.prediction("starting")))
    fake.plan("poll", Answer(302, {}, headers={"location": f"{internal.base_url}/v1/predictions/p1"}))
    settings = remote("replicate")

    assert_refused(await generate(settings), settings, internal)


# ---------------------------------------------------------------- allowed


def allowing(*entries: str) -> dict[str, Any]:
    return {"image_fetch_allowed_hosts": tuple(allowed_host(entry) for entry in entries)}


@pytest.mark.parametrize("allowed", ["host", "host:port"])
async def test_an_allowed_host_is_fetched_without_the_key(
    remote: MakeSettings, fake: FakeProviders, internal: InternalService, allowed: str
) -> None:
    entry = {"host": "127.0.0.1", "host:port": internal.base_url.removeprefix("http://")}[allowed]
    fake.plan("generate", image_answer("replicate", fake, f"{internal.base_url}/image.png"))
    settings = remote("replicate", **allowing(entry))

    response = await generate(settings)

    assert response.status_code == 200, response.text
    [fetch] = internal.seen
    assert fetch.path == "/image.png" and "authorization" not in fetch.headers
    assert response.json()["sha256"] == hashlib.sha256(PNG).hexdigest()


async def test_a_host_allowed_on_another_port_is_not_allowed_on_this_one(
    remote: MakeSettings, fake: FakeProviders, internal: InternalService
) -> None:
    fake.plan("generate", image_answer("openai", fake, f"{internal.base_url}/image.png"))
    settings = remote("openai", **allowing(f"127.0.0.1:{free_port()}"))

    assert_refused(await generate(settings), settings, internal)


async def test_a_redirect_to_another_origin_never_carries_the_token(
    remote: MakeSettings, fake: FakeProviders, internal: InternalService
) -> None:
    """Replicate's own files get its token; where one of them redirects to, even an allowed host, does not."""
    fake.plan("generate", image_answer("replicate", fake, fake.file_url(PNG, "own.png")))
    fake.plan("file", Answer(302, {}, headers={"location": f"{internal.base_url}/image.png"}))

    response = await generate(remote("replicate", **allowing("127.0.0.1")))

    assert response.status_code == 200, response.text
    [own] = fake.requests("/files/own.png")
    assert own.headers["authorization"] == f"Bearer {API_KEY}"
    [elsewhere] = internal.seen
    assert "authorization" not in elsewhere.headers


async def test_an_allowed_hosts_error_body_reaches_neither_the_caller_nor_the_log(
    remote: MakeSettings, fake: FakeProviders, internal: InternalService, caplog: pytest.LogCaptureFixture
) -> None:
    fake.plan("generate", image_answer("cog", fake, f"{internal.base_url}/forbidden"))

    response = await generate(remote("cog", **allowing("127.0.0.1")))

    assert (response.status_code, response.json()) == (502, {"detail": "image generator's image URL answered HTTP 403"})
    assert InternalService.SECRET not in caplog.text


def test_allowed_hosts_are_read_from_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_FETCH_ALLOWED_HOSTS", " files.internal , Models.Internal.:8443,[fd00::7]:9000,")

    assert settings_module.read_settings().image_fetch_allowed_hosts == (
        AllowedHost("files.internal", None),
        AllowedHost("models.internal", 8443),
        AllowedHost("fd00::7", 9000),
    )


@pytest.mark.parametrize("value", ["http://files.internal", "files.internal/images", "user@files", "files:port"])
def test_an_allowed_host_that_is_not_one_stops_the_start(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("IMAGE_FETCH_ALLOWED_HOSTS", f"a.internal,{value}")

    with pytest.raises(EnvError) as raised:
        settings_module.read_settings()

    assert "IMAGE_FETCH_ALLOWED_HOSTS" in str(raised.value)


# ---------------------------------------------------------------- public addresses, at the address checked


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # EC2's instance metadata
        ("169.254.170.2", False),  # ECS's task metadata and credentials
        ("100.64.0.1", False),  # shared address space
        ("0.0.0.0", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fd00::1", False),
        ("fe80::1", False),
        ("ff02::1", False),
        ("::ffff:10.0.0.1", False),  # IPv4-mapped
        ("2002:a9fe:a9fe::", False),  # 6to4 of 169.254.169.254
        ("64:ff9b::a9fe:aa02", False),  # NAT64 of 169.254.170.2
        ("::ffff:93.184.216.34", True),
    ],
)
def test_which_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


class Lookups:
    """A resolver that answers each name from a script, one answer per lookup, and records the lookups."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.names: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.names.append(host)
        return self.answers.pop(0)


async def fetched(resolve: Lookups, url: str) -> list[httpx.Request]:
    """The requests that would go out for a GET of `url`, seen by a transport that sends nothing anywhere."""
    sent: list[httpx.Request] = []

    async def png() -> AsyncIterator[bytes]:
        yield PNG

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, content=png())  # a stream, as a real answer's

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        http = ProviderHTTP(client, Links("https://api.provider.example", resolve=resolve))
        await http.send(http.request("GET", url), 1_000_000)
    return sent


async def test_a_public_host_is_fetched_at_the_address_checked_under_its_own_name() -> None:
    """One lookup: a second one (DNS rebinding, answering 127.0.0.1 this time) is never made."""
    lookups = Lookups(["93.184.216.34"], ["127.0.0.1"])

    [request] = await fetched(lookups, "https://images.example/a.png?sig=1")

    assert lookups.names == ["images.example"]
    assert request.url == "https://93.184.216.34/a.png?sig=1"
    assert request.headers["host"] == "images.example"
    assert request.extensions["sni_hostname"] == "images.example"  # the certificate checked is the host's
    assert request.headers["connection"] == "close"  # no other host's request reuses the connection


@pytest.mark.parametrize("addresses", [["93.184.216.34", "10.0.0.7"], []], ids=["one-private", "none"])
async def test_a_host_that_resolves_to_any_private_address_is_refused(addresses: list[str]) -> None:
    with pytest.raises(Exception) as refused:
        await fetched(Lookups(addresses), "https://images.example/a.png")
    assert getattr(refused.value, "detail", None) == LINK_REFUSED["detail"]


async def test_the_providers_own_origin_is_fetched_by_name_without_a_lookup() -> None:
    lookups = Lookups()

    [request] = await fetched(lookups, "https://api.provider.example/v1/files/a.png")

    assert lookups.names == [] and request.url.host == "api.provider.example"
