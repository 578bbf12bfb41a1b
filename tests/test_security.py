"""Security: the bearer token, local-store links that try to leave the store, and what error answers
must never carry (tracebacks, credentials, bucket policies, internal paths)."""

from __future__ import annotations

import hmac
import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from uuid import uuid4

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.types import Message

import gen_service
import generators
from conftest import asgi_client
from settings import Settings

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-Token-42"
ACCESS_KEY_ID = "AKIAIOSFODNN7LEAKCHK"
SECRET_ACCESS_KEY = "testing"  # conftest's aws_environment
SECRET = f"TOP-SECRET-{uuid4().hex}"
FAR_FUTURE = 99_999_999_999
METADATA = json.dumps({"content_type": "text/plain", "content_disposition": "attachment"})
# Metadata outside the store carries the secret too, so that following it would show in a header.
SECRET_METADATA = json.dumps({"content_type": "text/plain", "content_disposition": f'attachment; filename="{SECRET}"'})
ROUTE_CALLS: dict[str, dict[str, Any]] = {
    "/generate": {"json": {"prompt": "a fox"}},
    "/upload": {"files": {"file": ("a.txt", b"data", "text/plain")}},
}
KEY_DIRECTORIES = {"/generate": "generated", "/upload": "uploads"}
Call = tuple[str, str, dict[str, Any]]


def stored_files(app: Starlette) -> list[Path]:
    root = app.state.storage.root
    return [path for path in root.rglob("*") if path.is_file() and path.name != ".signing-key"]


def expect_json_error(response: httpx.Response, statuses: tuple[int, ...]) -> None:
    assert response.status_code in statuses, response.text
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["detail"], str)


# ---------------------------------------------------------------- bearer token


@pytest.fixture
def guarded(local_settings: Settings) -> Starlette:
    """The app on the local store with API_TOKEN set."""
    return gen_service.create_app(replace(local_settings, api_token=TOKEN))


# tests/test_bad_input.py covers no token, a longer or shorter token, Basic, a bare token and ?token=.
@pytest.mark.parametrize("path", ROUTE_CALLS)
@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({"authorization": f"Bearer {TOKEN.swapcase()}"}, {}),
        ({"authorization": f"Bearer {TOKEN.upper()}"}, {}),
        ({"authorization": "Bearer"}, {}),
        ({"authorization": "Bearer "}, {}),
        ({"authorization": "Bearer    "}, {}),
        ({"authorization": ""}, {}),
        ({"authorization": f"Bearer{TOKEN}"}, {}),
        ({"authorization": f"Bearer\t{TOKEN}"}, {}),
        ({"authorization": f"Bearer {TOKEN} {TOKEN}"}, {}),
        ({"authorization": f"Token {TOKEN}"}, {}),
        ({"authorization": f"Digest {TOKEN}"}, {}),
        ({"proxy-authorization": f"Bearer {TOKEN}"}, {}),
        ({"x-api-key": TOKEN}, {}),
        ({"cookie": f"token={TOKEN}; access_token={TOKEN}"}, {}),
        ({}, {"authorization": f"Bearer {TOKEN}", "api_key": TOKEN, "bearer": TOKEN}),
    ],
    ids=[
        "swapped-case",
        "upper-case",
        "bearer-alone",
        "bearer-space",
        "bearer-spaces",
        "empty-header",
        "no-separator",
        "tab-separator",
        "token-twice",
        "token-scheme",
        "digest-scheme",
        "proxy-authorization",
        "x-api-key",
        "cookie",
        "query-string",
    ],
)
async def test_anything_but_the_bearer_token_is_401(
    guarded: Starlette, path: str, headers: dict[str, str], params: dict[str, str]
) -> None:
    async with await asgi_client(guarded, raise_app_exceptions=False) as client:
        response = await client.post(path, headers=headers, params=params, **ROUTE_CALLS[path])

    assert response.status_code == 401
    assert response.json() == {"detail": "missing or wrong bearer token"}
    assert response.headers["www-authenticate"] == "Bearer"
    assert stored_files(guarded) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(list(ROUTE_CALLS)),
    # What a header can carry: visible Latin-1, space and tab.
    value=st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]) | st.just("\t"), max_size=80),
)
async def test_any_other_authorization_value_is_401(guarded: Starlette, path: str, value: str) -> None:
    scheme, _, given_token = value.partition(" ")
    assume(not (scheme.lower() == "bearer" and given_token.strip() == TOKEN))
    async with await asgi_client(guarded, raise_app_exceptions=False) as client:
        response = await client.post(path, headers={b"authorization": value.encode("latin-1")}, **ROUTE_CALLS[path])
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ROUTE_CALLS)
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_scheme_is_case_insensitive(guarded: Starlette, path: str, scheme: str) -> None:
    # RFC 9110 section 11.1: authentication schemes are case-insensitive; the token itself is not.
    async with await asgi_client(guarded, raise_app_exceptions=False) as client:
        response = await client.post(path, headers={"authorization": f"{scheme} {TOKEN}"}, **ROUTE_CALLS[path])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/", "/health", "/ready", "/openapi.json"])
async def test_probes_and_the_document_need_no_token(guarded: Starlette, path: str) -> None:
    async with await asgi_client(guarded, raise_app_exceptions=False) as client:
        assert (await client.get(path)).status_code == 200


async def test_a_link_needs_no_token(guarded: Starlette) -> None:
    # The signed link is the capability: whoever the caller hands it to can download without the token.
    async with await asgi_client(guarded, raise_app_exceptions=False) as client:
        upload = await client.post("/upload", headers={"authorization": f"Bearer {TOKEN}"}, **ROUTE_CALLS["/upload"])
        response = await client.get(upload.json()["url"])
    assert response.status_code == 200
    assert response.content == b"data"


@pytest.fixture
def compare_digest_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """Every call of hmac.compare_digest (which still does the comparing) while the test runs."""
    calls: list[tuple[Any, Any]] = []
    compare_digest = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(gen_service.hmac, "compare_digest", spy)
    return calls


@pytest.mark.parametrize("path", ROUTE_CALLS)
@pytest.mark.parametrize(("given", "status"), [("wrong", 401), (TOKEN[:-1], 401), (TOKEN, 200)])
async def test_the_token_is_compared_in_constant_time(
    guarded: Starlette, compare_digest_calls: list[tuple[Any, Any]], path: str, given: str, status: int
) -> None:
    async with await asgi_client(guarded, raise_app_exceptions=False) as client:
        response = await client.post(path, headers={"authorization": f"Bearer {given}"}, **ROUTE_CALLS[path])
    assert response.status_code == status
    assert (given.encode(), TOKEN.encode()) in compare_digest_calls


def test_settings_never_show_a_secret() -> None:
    """Settings end up in tracebacks and debuggers: no key or token in their repr."""
    secrets = {"api_token": TOKEN, "openai_api_key": "sk-secret-1", "replicate_api_token": "r8_secret-2"}
    shown = repr(Settings(**secrets))
    assert not [name for name, secret in secrets.items() if secret in shown]


async def test_a_link_signature_is_compared_in_constant_time(
    local_settings: Settings, compare_digest_calls: list[tuple[Any, Any]]
) -> None:
    app = gen_service.create_app(local_settings)
    key = f"uploads/{uuid4().hex}"
    async with await asgi_client(app, raise_app_exceptions=False) as client:
        response = await client.get(f"/files/{key}", params={"expires": FAR_FUTURE, "signature": "0" * 64})
    assert response.status_code == 403
    assert (b"0" * 64, app.state.storage.signature(key, FAR_FUTURE).encode()) in compare_digest_calls


# ---------------------------------------------------------------- local-store links


@pytest.fixture
def store(local_settings: Settings) -> Starlette:
    """The app on the local store, with nothing stored yet."""
    return gen_service.create_app(local_settings)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the store, laid out like one, whose every file holds SECRET."""
    directory = tmp_path / "outside"
    for name in ("uploads", "generated"):
        (directory / name).mkdir(parents=True)
    plant(directory, "secret.txt")
    return directory


def plant(directory: Path, key: str) -> None:
    """A file at `key` in `directory`, with the metadata that would let the store serve it."""
    (directory / key).write_text(SECRET)
    (directory / f"{key}.json").write_text(SECRET_METADATA)


async def raw_get(app: Starlette, target: str) -> httpx.Response:
    """GET `target` exactly as written, path decoded as uvicorn decodes it (httpx would resolve `..`)."""
    raw_path, _, query = target.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    messages: list[Message] = []
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if requested:
            await anyio.sleep_forever()
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    try:
        await app(scope, receive, send)
    except Exception:
        pass  # the app has sent its 500; a server would log the exception
    start, *body = messages
    return httpx.Response(
        start["status"], headers=start["headers"], content=b"".join(part.get("body", b"") for part in body)
    )


# Keys as they appear after /files/ in a link: {outside} is the absolute path of the outside directory.
TRAVERSALS = [
    "../outside/secret.txt",
    "uploads/../../outside/secret.txt",
    "%2e%2e/outside/secret.txt",
    "%2e%2e%2foutside%2fsecret.txt",
    "uploads/%2e%2e/%2e%2e/outside/secret.txt",
    "..%2f..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/{outside}/secret.txt",
    "%2F{outside}%2Fsecret.txt",
    "uploads//..//..//outside/secret.txt",
    "..\\outside\\secret.txt",
    "..%5coutside%5csecret.txt",
    "../.signing-key",
    "uploads/%00/../../outside/secret.txt",
]


def link_param(key: str, signed: bool) -> Any:
    return pytest.param(key, signed, id=f"{'signed' if signed else 'unsigned'}:{key}")


LINKS = [link_param(key, signed) for key in TRAVERSALS for signed in (False, True)]


@pytest.mark.parametrize(("key", "signed"), LINKS)
async def test_a_traversing_link_never_leaves_the_store(
    store: Starlette, outside: Path, key: str, signed: bool
) -> None:
    raw_key = key.format(outside=str(outside).lstrip("/"))
    # Signed: as if the signing key had leaked, so that only the path checks stand in the way.
    signature = store.state.storage.signature(unquote(raw_key), FAR_FUTURE) if signed else "0" * 64

    response = await raw_get(store, f"/files/{raw_key}?expires={FAR_FUTURE}&signature={signature}")

    expect_json_error(response, (403, 404))
    assert SECRET not in response.text
    assert b"root:" not in response.content
    assert store.state.storage.signing_key not in response.content


def link_into_outside_file(root: Path, outside: Path, key: str) -> None:
    plant(outside, key)
    (root / key).parent.mkdir(exist_ok=True)
    (root / key).symlink_to(outside / key)
    (root / f"{key}.json").write_text(METADATA)


def link_into_outside_file_and_metadata(root: Path, outside: Path, key: str) -> None:
    plant(outside, key)
    (root / key).parent.mkdir(exist_ok=True)
    for suffix in ("", ".json"):
        (root / f"{key}{suffix}").symlink_to(outside / f"{key}{suffix}")


def link_metadata_outside(root: Path, outside: Path, key: str) -> None:
    plant(outside, key)
    (root / key).parent.mkdir(exist_ok=True)
    (root / key).write_text("inside")
    (root / f"{key}.json").symlink_to(outside / f"{key}.json")


def link_directory_outside(root: Path, outside: Path, key: str) -> None:
    plant(outside, key)
    (root / key).parent.symlink_to(outside / key.split("/")[0], target_is_directory=True)


@pytest.mark.parametrize(
    "place",
    [link_into_outside_file, link_into_outside_file_and_metadata, link_metadata_outside, link_directory_outside],
)
@pytest.mark.parametrize("key", [f"uploads/{'a1' * 16}", f"generated/{'b2' * 16}.png"])
async def test_a_symlink_in_the_store_is_not_followed_out_of_it(
    store: Starlette, outside: Path, place: Callable[[Path, Path, str], None], key: str
) -> None:
    storage = store.state.storage
    place(storage.root, outside, key)

    async with await asgi_client(store, raise_app_exceptions=False) as client:
        response = await client.get(
            f"/files/{key}", params={"expires": FAR_FUTURE, "signature": storage.signature(key, FAR_FUTURE)}
        )

    expect_json_error(response, (403, 404))
    assert SECRET not in response.text
    assert SECRET not in str(response.headers)


async def test_a_planted_file_inside_the_store_is_served(store: Starlette, outside: Path) -> None:
    # The control for the symlink tests: the same planted file, inside the store, is served.
    storage, key = store.state.storage, f"uploads/{uuid4().hex}"
    (storage.root / "uploads").mkdir()
    plant(storage.root, key)
    async with await asgi_client(store, raise_app_exceptions=False) as client:
        response = await client.get(
            f"/files/{key}", params={"expires": FAR_FUTURE, "signature": storage.signature(key, FAR_FUTURE)}
        )
    assert response.status_code == 200
    assert response.text == SECRET


@pytest.mark.parametrize("signature", ["%C3%A9", "%E2%80%AE" + "0" * 63, "%C2%80"])
async def test_a_non_ascii_signature_is_403(store: Starlette, signature: str) -> None:
    response = await raw_get(store, f"/files/uploads/{uuid4().hex}?expires={FAR_FUTURE}&signature={signature}")
    expect_json_error(response, (403,))


# ---------------------------------------------------------------- what answers never carry


BAD_INPUT: list[Call] = [
    ("POST", "/generate", {"content": b"{"}),
    ("POST", "/generate", {"json": {"prompt": " "}}),
    ("POST", "/generate", {"json": {"prompt": "x" * 2001}}),
    ("POST", "/generate", {"content": b"x", "headers": {"content-type": "text/plain"}}),
    ("POST", "/generate", {"json": {"prompt": "x" * 70_000}}),
    ("POST", "/generate", {"content": b"[" * 5000, "headers": {"content-type": "application/json"}}),
    ("POST", "/upload", {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=b"}}),
    ("POST", "/upload", {"content": b"x", "headers": {"content-type": "multipart/form-data"}}),
    ("POST", "/upload", {"json": {"file": "x"}}),
    ("GET", "/nowhere", {}),
    ("GET", "/files/../../etc/passwd", {}),
    ("DELETE", "/health", {}),
    ("PUT", "/upload", {}),
    ("GET", f"/files/uploads/{'0' * 32}?expires=1&signature=x", {}),
    ("GET", f"/files/uploads/{'0' * 32}?expires={FAR_FUTURE}&signature={'0' * 64}", {}),
    ("GET", f"/files/uploads/{'0' * 32}?expires={FAR_FUTURE}&signature=%C3%A9", {}),
]
STORING: list[Call] = [
    ("POST", "/generate", {"json": {"prompt": "a fox"}}),
    ("POST", "/upload", {"files": {"file": ("a.txt", b"data", "text/plain")}}),
    ("GET", "/ready", {}),
]
WRONG_TOKEN: list[Call] = [
    (method, path, {**kwargs, "headers": {"authorization": "Bearer wrong"}})
    for method, path, kwargs in STORING
    if method == "POST"
]


def missing_bucket(request: pytest.FixtureRequest, settings: Settings) -> tuple[Starlette, list[Call]]:
    request.getfixturevalue("mocked_s3")
    return gen_service.create_app(Settings(s3_bucket="no-such-bucket")), STORING


def store_replaced_by_a_file(request: pytest.FixtureRequest, settings: Settings) -> tuple[Starlette, list[Call]]:
    app = gen_service.create_app(settings)
    shutil.rmtree(app.state.storage.root)
    app.state.storage.root.write_text("not a directory")
    return app, STORING


def store_deleted(request: pytest.FixtureRequest, settings: Settings) -> tuple[Starlette, list[Call]]:
    app = gen_service.create_app(settings)
    shutil.rmtree(app.state.storage.root)
    return app, STORING


def bad_input(request: pytest.FixtureRequest, settings: Settings) -> tuple[Starlette, list[Call]]:
    return gen_service.create_app(settings), BAD_INPUT


def wrong_token(request: pytest.FixtureRequest, settings: Settings) -> tuple[Starlette, list[Call]]:
    return gen_service.create_app(replace(settings, api_token=TOKEN)), WRONG_TOKEN


@pytest.fixture(
    params=[missing_bucket, store_replaced_by_a_file, store_deleted, bad_input, wrong_token], ids=lambda f: f.__name__
)
def failing(
    request: pytest.FixtureRequest, local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> tuple[Starlette, list[Call]]:
    """An app in trouble, and requests it can only fail."""
    # An access key id of its own, so that a leak of it cannot hide behind the secret's value.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    return request.param(request, local_settings)


def forbidden_in(text: str) -> list[str]:
    words = ["Traceback", 'File "', SECRET_ACCESS_KEY, ACCESS_KEY_ID, "/work/", "/tmp/", "Statement", TOKEN]
    return [word for word in words if word in text]


async def test_no_failure_answer_carries_internals(failing: tuple[Starlette, list[Call]]) -> None:
    app, calls = failing
    async with await asgi_client(app, raise_app_exceptions=False) as client:
        for method, path, kwargs in calls:
            response = await client.request(method, path, **kwargs)

            assert response.status_code >= 400, (method, path, response.text)
            assert isinstance(response.json()["detail"], str)
            everything = (
                response.text + "\n" + "\n".join(f"{name}: {value}" for name, value in response.headers.items())
            )
            assert forbidden_in(everything) == [], (method, path, everything)


async def test_an_unexpected_error_is_a_bare_500(
    local_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def render_png(prompt: str) -> bytes:
        raise RuntimeError(f"Traceback: cannot read {tmp_path}/model with {ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}")

    monkeypatch.setattr(generators, "render_png", render_png)
    async with await asgi_client(gen_service.create_app(local_settings), raise_app_exceptions=False) as client:
        response = await client.post("/generate", json={"prompt": "a fox"})

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.content == b'{"detail":"internal server error"}'


@pytest.mark.parametrize("path", ROUTE_CALLS)
async def test_a_store_whose_directory_is_a_file_is_503(local_settings: Settings, path: str) -> None:
    app = gen_service.create_app(local_settings)
    (app.state.storage.root / KEY_DIRECTORIES[path]).write_text("")
    async with await asgi_client(app, raise_app_exceptions=False) as client:
        response = await client.post(path, **ROUTE_CALLS[path])
    assert response.status_code == 503
    assert response.json() == {"detail": "storage could not write the file"}
