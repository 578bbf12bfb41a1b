"""Fuzzing: schemathesis holds the app to its OpenAPI document; hypothesis throws any filename and any
prompt at the upload and generate paths."""

from __future__ import annotations

import io
import json
import re
import sys
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import replace
from hashlib import sha256
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette
from starlette.routing import Route

import gen_service
import upload_parser
from conftest import Download, asgi_client
from settings import Settings

DOCUMENT = json.loads(gen_service.OPENAPI_DOCUMENT)
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Each example is a request (a PNG render or a store for the POSTs): bounded to keep the file fast.
FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
UPLOADED_KEY = re.compile(r"uploads/[0-9a-f]{32}")
DISPOSITION = re.compile(r"attachment; filename=\"[ -~]*\"; filename\*=UTF-8''([A-Za-z0-9%._~-]*)")
PROMPT_LIMIT = Settings.max_prompt_chars

# Every character, with the ones that attack names drawn far more often than chance would.
HOSTILE = ["/", "\\", ".", "..", "%", "%22", "%0D%0A", '"', "\r", "\n", "\x00", "\u202e", "\u2066", " ", ";", ":"]
FILENAME_TEXT = st.lists(st.one_of(st.sampled_from(HOSTILE), st.characters()), max_size=1000).map("".join)
# Multipart carries text: a lone surrogate is not text, so names on the wire leave them out.
SENDABLE_FILENAME_TEXT = FILENAME_TEXT.map(lambda name: "".join(c for c in name if unicodedata.category(c) != "Cs"))
TEXT = st.characters(exclude_categories=["Cs"])
# Media types with what breaks a header value drawn far more often than chance would: a bare LF, VT or FF
# (which the multipart parser keeps), NUL, DEL, NEL, non-ASCII. No CR LF, which would end the part's headers.
MEDIA_TYPES = ["text/plain", "application/pdf", "image/svg+xml", "application/vnd.ms-excel", ""]
TYPE_PIECES = [";", " ", "\t", "\n", "\x0b", "\x0c", "\r", "\x00", "\x7f", "\x85", "=", '"', "charset=utf-8", "é"]
CONTENT_TYPES = (
    st.tuples(
        st.sampled_from(MEDIA_TYPES),
        st.lists(st.one_of(st.sampled_from(TYPE_PIECES), st.characters(codec="ascii"), TEXT), max_size=8),
    )
    .map(lambda pieces: pieces[0] + "".join(pieces[1]))
    .filter(lambda content_type: "\r\n" not in content_type)
)
# What str.strip() removes, so what makes a prompt blank.
WHITESPACE = "".join(filter(str.isspace, map(chr, range(sys.maxunicode + 1))))


@pytest.fixture(params=["local_settings", "mocked_settings"])
def app(request: pytest.FixtureRequest) -> Starlette:
    """The app on the local store, then on moto's in-process S3 mock."""
    return gen_service.create_app(request.getfixturevalue(request.param))


@pytest.fixture
def local_app(local_settings: Settings) -> Starlette:
    """The app on the local store."""
    return gen_service.create_app(local_settings)


# ---------------------------------------------------------------- the document


def route_operations(app: Starlette) -> set[tuple[str, str]]:
    """(path template, method) for every route of the app, in OpenAPI's spelling."""
    return {
        (re.sub(r":\w+\}", "}", route.path), method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"  # Starlette adds HEAD to every GET route
    }


def test_every_route_is_documented_and_every_operation_routed(local_app: Starlette) -> None:
    documented = {
        (path, method) for path, item in DOCUMENT["paths"].items() for method in item if method in HTTP_METHODS
    }
    assert route_operations(local_app) == documented


@pytest.mark.anyio
async def test_the_served_document_is_valid_openapi_3_1(local_app: Starlette) -> None:
    validator = pytest.importorskip("openapi_spec_validator")  # installed with moto[server]
    async with await asgi_client(local_app) as client:
        served = (await client.get("/openapi.json")).json()
    validator.validate(served)
    assert served["openapi"].startswith("3.1.")


# The document the app serves; each case is sent to the app of the `app` fixture.
schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.hook
def filter_path_parameters(context: schemathesis.HookContext, path_parameters: dict[str, Any] | None) -> bool:
    # requests resolves `.` and `..` segments before sending (/files/a/../.. becomes /), which would test
    # another route; test_security sends such keys to the app as written.
    segments = str((path_parameters or {}).get("key", "")).split("/")
    return not {".", ".."} & set(segments)


@schema.parametrize()
@FUZZ_SETTINGS
def test_the_app_does_what_its_document_says(case: schemathesis.Case, app: Starlette) -> None:
    if not any(path == case.operation.path for path, _ in route_operations(app)):
        # /files/{key} exists only with the local store: on S3 it is an unknown path.
        response = case.call(app=app)
        assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
        return
    case.call_and_validate(app=app, checks=CHECKS)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "content_type"), [("/generate", "application/json"), ("/upload", "multipart/form-data; boundary=b")]
)
async def test_a_body_that_stops_arriving_gets_the_documented_408(
    local_settings: Settings, path: str, content_type: str
) -> None:
    async def stalled() -> AsyncIterator[bytes]:
        yield b"{" if path == "/generate" else b"--b\r\n"
        await anyio.sleep(60)

    app = gen_service.create_app(replace(local_settings, client_body_timeout_seconds=0.2))
    async with await asgi_client(app) as client:
        response = await client.post(path, content=stalled(), headers={"content-type": content_type})

    assert (response.status_code, response.json()) == (408, {"detail": "request body timed out"})
    # The same answer to a request whose body was read, which schemathesis looks at too.
    answered = httpx.Response(
        408, headers=response.headers, content=response.content, request=httpx.Request("POST", response.url)
    )
    answered.elapsed = response.elapsed
    schema[path]["POST"].Case(media_type=content_type.partition(";")[0]).validate_response(answered, checks=CHECKS)


RANGE_ERRORS = {400: "Range header is malformed", 416: "requested range is not satisfiable"}


def header(response: Any, name: str) -> str | None:
    """A header of a response schemathesis made, which holds each as a list."""
    [value] = response.headers.get(name, [None])
    return value


@pytest.mark.parametrize(
    ("range_header", "if_range", "status", "content", "content_range"),
    [
        (None, None, 200, b"data", None),
        ("bytes=0-1", None, 206, b"da", "bytes 0-1/4"),
        ("bytes=2-", None, 206, b"ta", "bytes 2-3/4"),
        ("bytes=-3", None, 206, b"ata", "bytes 1-3/4"),
        ("bytes=100-200", None, 416, None, "bytes */4"),
        ("bytes=abc", None, 400, None, None),
        # RFC 9110: a Range in a unit the server does not know is ignored.
        ("items=0-1", None, 200, b"data", None),
        ("Bytes=0-1", None, 206, b"da", "bytes 0-1/4"),
        # RFC 9110: the Range is served only while the file is the one If-Range names (a strong validator);
        # otherwise it is ignored, even when it is malformed or unsatisfiable, and the whole file is sent.
        ("bytes=0-1", "{etag}", 206, b"da", "bytes 0-1/4"),
        ("bytes=0-1", "{last-modified}", 206, b"da", "bytes 0-1/4"),
        ("bytes=0-1", '"another"', 200, b"data", None),
        ("bytes=0-1", "W/{etag}", 200, b"data", None),
        ("bytes=100-200", '"another"', 200, b"data", None),
        ("bytes=abc", '"another"', 200, b"data", None),
        ("bytes=100-200", "{etag}", 416, None, "bytes */4"),
        (None, '"another"', 200, b"data", None),
    ],
)
def test_a_real_download_matches_the_document(
    local_app: Starlette,
    range_header: str | None,
    if_range: str | None,
    status: int,
    content: bytes | None,
    content_range: str | None,
) -> None:
    # Random links only ever reach the 403, so this follows a link the service made.
    upload = schema["/upload"]["POST"].Case(body={"file": b"data"}, media_type="multipart/form-data")  # type: ignore[dict-item]
    url = urlsplit(upload.call_and_validate(app=local_app, checks=CHECKS).json()["url"])
    query = {name: value for name, value in (pair.split("=") for pair in url.query.split("&"))}

    def download(headers: dict[str, str]) -> Any:
        case = schema["/files/{key}"]["GET"].Case(
            path_parameters={"key": url.path.removeprefix("/files/")}, query=query, headers=headers
        )
        return case.call_and_validate(app=local_app, checks=CHECKS)

    whole = download({})
    validators = {name: header(whole, name) for name in ("etag", "last-modified")}
    headers = {"Range": range_header} if range_header else {}
    if if_range:
        headers["If-Range"] = if_range.format_map(validators)

    response = download(headers)

    assert response.status_code == status
    assert header(response, "content-range") == content_range
    if content is None:
        assert response.json() == {"detail": RANGE_ERRORS[status]}
    else:
        assert response.content == content


@pytest.mark.anyio
@pytest.mark.parametrize("body", [b"[" * 5000, b'{"prompt": ' + b"[" * 5000], ids=["array", "in-object"])
async def test_deeply_nested_json_is_422(local_app: Starlette, body: bytes) -> None:
    async with await asgi_client(local_app, raise_app_exceptions=False) as client:
        response = await client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"]


# ---------------------------------------------------------------- filenames


def browser_part(name: str, content: bytes, content_type: str = "text/plain") -> bytes:
    """A multipart body with one file part named as browsers name it: `"`, CR and LF as %22, %0D, %0A
    (which the service decodes), and a backslash escaped, as a quoted string must escape it."""
    quoted = name.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    head = f'--b\r\nContent-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
    return f"{head}Content-Type: {content_type}\r\n\r\n".encode() + content + b"\r\n--b--\r\n"


def assert_is_a_clean_name(name: str | None) -> None:
    if name is None:
        return
    assert name not in ("", ".", "..")
    assert "/" not in name and "\\" not in name
    assert not any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in name)
    assert all(char in "\u200c\u200d" for char in name if unicodedata.category(char) == "Cf")
    assert len(name) <= upload_parser.MAX_FILENAME_CHARS


def assert_disposition_carries(header: str, name: str | None) -> None:
    """One printable ASCII line whose `filename*` decodes to exactly `name`."""
    assert header.isascii() and header.isprintable()
    if name is None:
        assert header == "attachment"
        return
    match = DISPOSITION.fullmatch(header)
    assert match, header
    assert unquote(match[1], errors="strict") == name


@PROPERTY_SETTINGS
@given(FILENAME_TEXT)
@example("../../../etc/passwd")
@example("..\\..\\windows\\win.ini")
@example("x\"; filename*=UTF-8''evil.exe")
@example("a\r\nSet-Cookie: x=y")
@example("invoice\u202efdp.exe")
@example("\ufeffhidden\u200b\u00adname\u2028.txt")
@example("é" * 1000)
def test_any_name_is_cleaned_into_a_single_safe_header(name: str) -> None:
    cleaned = upload_parser.clean_filename(name)
    assert_is_a_clean_name(cleaned)
    assert_disposition_carries(upload_parser.content_disposition(cleaned), cleaned)


def test_a_name_cut_to_the_limit_does_not_end_in_whitespace() -> None:
    cleaned = upload_parser.clean_filename("a" * 254 + " b.txt")
    assert cleaned == cleaned.strip()  # type: ignore[union-attr]


@pytest.mark.anyio
@PROPERTY_SETTINGS
@given(name=SENDABLE_FILENAME_TEXT)
@example(name="../../../etc/passwd")
@example(name="..\\..\\..\\etc\\passwd")
@example(name="C:\\Users\\x\\a.txt")
@example(name='say "hi".txt')
@example(name="two\r\nlines\x00.txt")
@example(name="invoice\u202efdp.exe")
@example(name="uploads/../.signing-key")
@example(name="\U0001f3a8" * 1000)
async def test_uploaded_name_never_picks_the_key_and_round_trips(local_app: Starlette, name: str) -> None:
    root = local_app.state.storage.root
    async with await asgi_client(local_app) as client:
        response = await client.post(
            "/upload", content=browser_part(name, b"data"), headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        url = urlsplit(body["url"])
        key = url.path.removeprefix("/files/")
        assert UPLOADED_KEY.fullmatch(key), body["url"]
        assert (body["key"], body["size"], body["sha256"]) == (key, 4, sha256(b"data").hexdigest())
        assert body["filename"] == upload_parser.clean_filename(name)
        assert_is_a_clean_name(body["filename"])

        download = await client.get(f"{url.path}?{url.query}")

    assert download.status_code == 200
    assert download.content == b"data"
    [disposition] = download.headers.get_list("content-disposition")
    assert_disposition_carries(disposition, body["filename"])
    assert (root / key).is_file()
    # Nothing is written anywhere but beside the other uploads.
    assert [path for path in root.parent.rglob("*") if path.is_file() and path.parent != root / "uploads"] == [
        root / ".signing-key"
    ]


@pytest.mark.anyio
@PROPERTY_SETTINGS
@given(name=SENDABLE_FILENAME_TEXT, content_type=CONTENT_TYPES)
@example(name="notes.txt", content_type="text/plain")
@example(name="notes.txt", content_type="text/plain\n;x")
@example(name="notes.txt", content_type="text/plain\x0b;x")
@example(name="notes.txt", content_type="text/plain\x0c;x")
@example(name="notes.txt", content_type="text/plain; charset=latin-1 ")
async def test_every_type_and_name_the_service_takes_round_trips_on_both_stores(
    client: httpx.AsyncClient, download: Download, name: str, content_type: str
) -> None:
    response = await client.post(
        "/upload",
        content=browser_part(name, b"data", content_type),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    if response.status_code != 200:
        refusals = ["file has an invalid Content-Type", "Invalid multipart data."]  # the latter for a bare CR
        assert (response.status_code, response.json()["detail"]) in [(422, refusals[0]), (400, refusals[1])]
        return
    body = response.json()

    fetched = await download(body["url"])

    assert fetched.status_code == 200
    assert fetched.content == b"data"
    assert fetched.headers["content-type"] == body["content_type"]
    [disposition] = fetched.headers.get_list("content-disposition")
    assert_disposition_carries(disposition, body["filename"])


# ---------------------------------------------------------------- prompts


def repeated_to(piece: str, length: int) -> str:
    return (piece * (length // len(piece) + 1))[:length]


def prompts(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    """Non-blank text of `min_size`..`max_size` characters: a random piece repeated to a random length,
    since hypothesis draws long strings slowly and a piece already mixes every kind of character."""
    pieces = st.text(TEXT, min_size=1, max_size=40)
    return st.builds(repeated_to, pieces, st.integers(min_size, max_size)).filter(str.strip)


async def post_prompt(client: httpx.AsyncClient, prompt: str) -> httpx.Response:
    # ensure_ascii, so that every character travels as a JSON escape and none as a raw byte.
    body = json.dumps({"prompt": prompt}).encode()
    return await client.post("/generate", content=body, headers={"content-type": "application/json"})


@pytest.mark.anyio
@settings(PROPERTY_SETTINGS, max_examples=20)
@given(prompt=st.one_of(st.text(TEXT, min_size=1, max_size=100).filter(str.strip), prompts(1, PROMPT_LIMIT)))
@example(prompt="x" * PROMPT_LIMIT)
@example(prompt="\U0001f3a8" * PROMPT_LIMIT)
@example(prompt="\x00\u202e\r\n\t\ufeffa")
async def test_any_prompt_within_the_limit_renders_a_png(local_app: Starlette, prompt: str) -> None:
    async with await asgi_client(local_app) as client:
        response = await post_prompt(client, prompt)
        assert response.status_code == 200, response.text
        url = urlsplit(response.json()["url"])
        download = await client.get(f"{url.path}?{url.query}")

    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(download.content))
    image.verify()
    assert image.format == "PNG"
    body = response.json()
    assert (body["size"], body["sha256"]) == (len(download.content), sha256(download.content).hexdigest())


@pytest.mark.anyio
@settings(PROPERTY_SETTINGS, max_examples=25)
@given(prompt=prompts(PROMPT_LIMIT + 1, 2 * PROMPT_LIMIT))
@example(prompt="x" * (PROMPT_LIMIT + 1))
async def test_any_prompt_over_the_limit_is_422(local_app: Starlette, prompt: str) -> None:
    async with await asgi_client(local_app) as client:
        response = await post_prompt(client, prompt)
    assert response.status_code == 422
    assert response.json() == {"detail": f"prompt must be at most {PROMPT_LIMIT} characters"}
    assert not (local_app.state.storage.root / "generated").exists()


@pytest.mark.anyio
@settings(PROPERTY_SETTINGS, max_examples=25)
@given(prompt=st.text(st.sampled_from(WHITESPACE), min_size=1, max_size=50))
async def test_any_blank_prompt_is_422(local_app: Starlette, prompt: str) -> None:
    async with await asgi_client(local_app) as client:
        response = await post_prompt(client, prompt)
    assert response.status_code == 422
    assert response.json() == {"detail": "prompt must not be empty"}


def test_the_documented_prompt_pattern_fails_exactly_on_what_the_service_calls_blank() -> None:
    pattern = re.compile(DOCUMENT["components"]["schemas"]["GenerateRequest"]["properties"]["prompt"]["pattern"])
    unmatched = "".join(char for char in map(chr, range(sys.maxunicode + 1)) if not pattern.search(char))
    assert unmatched == WHITESPACE
