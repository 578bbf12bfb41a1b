"""Bad requests get their status and a JSON `detail`, and nothing is stored (moto's in-process mock)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import httpx
import pytest

import gen_service
from conftest import asgi_client
from settings import Settings

pytestmark = pytest.mark.anyio

MAX_UPLOAD_BYTES = 1000
TOKEN = "s3cret-token"


@pytest.fixture
async def client(mocked_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app on moto's mock, with a small upload limit."""
    app = gen_service.create_app(replace(mocked_settings, max_upload_bytes=MAX_UPLOAD_BYTES))
    async with await asgi_client(app) as client:
        yield client


@pytest.fixture(autouse=True)
def bucket_stays_empty(mocked_s3: object) -> Iterator[None]:
    """Every test here ends with nothing stored."""
    yield
    assert mocked_s3.list_objects_v2(Bucket="assets").get("KeyCount") == 0  # type: ignore[attr-defined]


def multipart(*parts: str, boundary: str = "b") -> dict[str, object]:
    body = "".join(f"--{boundary}\r\n{part}\r\n" for part in parts) + f"--{boundary}--\r\n"
    return {"content": body.encode(), "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


async def chunks(size: int) -> AsyncIterator[bytes]:
    """A body with no Content-Length (chunked), so only counting while streaming can catch it."""
    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    for _ in range(size // 100):
        yield b"x" * 100
    yield b"\r\n--b--\r\n"


def expect(response: httpx.Response, status: int, detail: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": detail}


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"{", "body must be valid JSON"),
        (b"", "body must be valid JSON"),
        (b'{"prompt": "caf\xe9"}', "body must be valid JSON"),
        (b"[]", "body must be a JSON object"),
        (b'"a prompt"', "body must be a JSON object"),
        (b"null", "body must be a JSON object"),
        (b"{}", "prompt is required"),
        (b'{"text": "a fox"}', "prompt is required"),
        (b'{"prompt": 5}', "prompt must be a string"),
        (b'{"prompt": null}', "prompt must be a string"),
        (b'{"prompt": ["a fox"]}', "prompt must be a string"),
        (b'{"prompt": ""}', "prompt must not be empty"),
        (b'{"prompt": " \\n\\t "}', "prompt must not be empty"),
        (b'{"prompt": "' + b"x" * 2001 + b'"}', "prompt must be at most 2000 characters"),
        (b'{"prompt": "\\ud800"}', "prompt must be valid Unicode text"),
    ],
)
async def test_generate_rejects_bad_json(client: httpx.AsyncClient, body: bytes, detail: str) -> None:
    response = await client.post("/generate", content=body, headers={"content-type": "application/json"})
    expect(response, 422, detail)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
async def test_generate_rejects_other_content_types(client: httpx.AsyncClient, content_type: str) -> None:
    response = await client.post("/generate", content=b'{"prompt": "x"}', headers={"content-type": content_type})
    expect(response, 415, "expected Content-Type: application/json")


async def test_generate_refuses_a_large_body_before_reading_it(client: httpx.AsyncClient) -> None:
    response = await client.post("/generate", json={"prompt": "x" * 70_000})
    expect(response, 413, "request body is larger than 65536 bytes")


async def test_generate_counts_a_chunked_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/generate", content=chunks(70_000), headers={"content-type": "application/json"})
    expect(response, 413, "request body is larger than 65536 bytes")


async def test_upload_rejects_other_content_types(client: httpx.AsyncClient) -> None:
    response = await client.post("/upload", json={"file": "x"})
    expect(response, 415, "expected Content-Type: multipart/form-data")


@pytest.mark.parametrize(
    ("request_args", "status", "detail"),
    [
        (multipart('Content-Disposition: form-data; name="other"\r\n\r\nx'), 422, "file is required"),
        (
            multipart('Content-Disposition: form-data; name="file"\r\n\r\nx'),
            422,
            "file must be a file part, not a text field",
        ),
        (
            multipart(*['Content-Disposition: form-data; name="file"; filename="a"\r\n\r\nx'] * 2),
            400,
            "Too many files. Maximum number of files is 1.",
        ),
        (multipart("no headers at all\r\n\r\nx"), 400, "Invalid multipart data."),
        # Each text field under the part bound (64 KiB), together over it: a stalled upload would hold them.
        (
            multipart(*[f'Content-Disposition: form-data; name="f{n}"\r\n\r\n{"x" * 22_000}' for n in range(3)]),
            400,
            "text fields are larger than 65536 bytes in all",
        ),
        ({"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400, "Missing boundary in multipart."),
        (
            {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=b"}},
            400,
            "Invalid multipart data.",
        ),
    ],
)
async def test_upload_rejects_malformed_forms(
    client: httpx.AsyncClient, request_args: dict[str, object], status: int, detail: str
) -> None:
    expect(await client.post("/upload", **request_args), status, detail)  # type: ignore[arg-type]


# A bare LF, VT or FF in a part header stays in its value; no HTTP response can carry it back.
@pytest.mark.parametrize("content_type", ["not a type", "text/plain\n;x", "text/plain\x0b;x", "text/plain\x0c;x"])
async def test_upload_refuses_a_content_type_no_download_could_carry(
    client: httpx.AsyncClient, content_type: str
) -> None:
    part = f'Content-Disposition: form-data; name="file"; filename="a"\r\nContent-Type: {content_type}\r\n\r\nx'
    expect(await client.post("/upload", **multipart(part)), 422, "file has an invalid Content-Type")  # type: ignore[arg-type]


async def test_upload_refuses_a_large_content_length_before_reading(client: httpx.AsyncClient) -> None:
    response = await client.post("/upload", files={"file": ("a", b"x" * (MAX_UPLOAD_BYTES + 70_000))})
    expect(response, 413, f"file is larger than {MAX_UPLOAD_BYTES} bytes")


async def test_upload_counts_a_chunked_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/upload",
        content=chunks(MAX_UPLOAD_BYTES + 70_000),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    expect(response, 413, f"file is larger than {MAX_UPLOAD_BYTES} bytes")


async def test_upload_refuses_a_file_just_over_the_limit(client: httpx.AsyncClient) -> None:
    response = await client.post("/upload", files={"file": ("a", b"x" * (MAX_UPLOAD_BYTES + 1))})
    expect(response, 413, f"file is larger than {MAX_UPLOAD_BYTES} bytes")


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/nowhere", 404), ("GET", "/upload", 405), ("DELETE", "/", 405)]
)
async def test_unknown_paths_and_methods_answer_json(
    client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    response = await client.request(method, path)
    expect(response, status, {404: "Not Found", 405: "Method Not Allowed"}[status])


async def test_s3_mode_serves_no_local_files(client: httpx.AsyncClient) -> None:
    expect(await client.get("/files/uploads/" + "0" * 32 + "?expires=1&signature=x"), 404, "Not Found")


# ---------------------------------------------------------------- bearer token


@pytest.fixture
async def guarded(mocked_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app with API_TOKEN set."""
    async with await asgi_client(gen_service.create_app(replace(mocked_settings, api_token=TOKEN))) as client:
        yield client


ROUTE_CALLS = {
    "/generate": {"json": {"prompt": "a fox"}},
    "/upload": {"files": {"file": ("a.txt", b"data", "text/plain")}},
}


@pytest.mark.parametrize("path", ROUTE_CALLS)
@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({}, {}),
        ({"authorization": f"Bearer {TOKEN}x"}, {}),
        ({"authorization": f"Bearer {TOKEN[:-1]}"}, {}),
        ({"authorization": f"Basic {TOKEN}"}, {}),
        ({"authorization": TOKEN}, {}),
        ({}, {"token": TOKEN, "access_token": TOKEN}),
    ],
)
async def test_posts_need_the_bearer_token(
    guarded: httpx.AsyncClient, path: str, headers: dict[str, str], params: dict[str, str]
) -> None:
    response = await guarded.post(path, headers=headers, params=params, **ROUTE_CALLS[path])  # type: ignore[arg-type]
    expect(response, 401, "missing or wrong bearer token")
    assert response.headers["www-authenticate"] == "Bearer"


async def test_oversized_request_without_token_still_answers_json(guarded: httpx.AsyncClient) -> None:
    response = await guarded.post("/generate", json={"prompt": "x" * 70_000})
    expect(response, 413, "request body is larger than 65536 bytes")


@pytest.mark.parametrize("path", ROUTE_CALLS)
async def test_the_right_token_is_let_through(guarded: httpx.AsyncClient, mocked_s3: object, path: str) -> None:
    response = await guarded.post(path, headers={"authorization": f"Bearer {TOKEN}"}, **ROUTE_CALLS[path])  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    # This test stores one object; empty the bucket for the autouse check.
    for item in mocked_s3.list_objects_v2(Bucket="assets")["Contents"]:  # type: ignore[attr-defined]
        mocked_s3.delete_object(Bucket="assets", Key=item["Key"])  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/", "/health"])
async def test_health_needs_no_token(guarded: httpx.AsyncClient, path: str) -> None:
    assert (await guarded.get(path)).status_code == 200
