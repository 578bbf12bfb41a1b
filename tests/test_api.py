"""The wire contract, run against both stores: what a caller sends, gets back and can download."""

from __future__ import annotations

import io
import os
import re
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from PIL import Image

from conftest import Download, in_chunks

pytestmark = pytest.mark.anyio

KEY = re.compile(r"/(uploads/[0-9a-f]{32}|generated/[0-9a-f]{32}\.png)$")


def key_of(url: str) -> str:
    match = KEY.search(urlsplit(url).path)
    assert match, url
    return match.group(1)


@pytest.mark.parametrize("path", ["/", "/health"])
async def test_health_is_ok(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_upload_downloads_the_same_bytes_type_and_name(client: httpx.AsyncClient, download: Download) -> None:
    content = os.urandom(300_000)
    files = {"file": ("résumé 2024.pdf", content, "application/pdf")}
    response = await client.post("/upload", files=files)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == "résumé 2024.pdf"
    assert key_of(body["url"]).startswith("uploads/")
    fetched = await download(body["url"])
    assert fetched.status_code == 200
    assert fetched.content == content
    assert fetched.headers["content-type"] == "application/pdf"
    disposition = fetched.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert unquote(disposition.split("filename*=UTF-8''")[1]) == "résumé 2024.pdf"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_upload_larger_than_the_multipart_threshold_round_trips(
    client: httpx.AsyncClient, download: Download, chunked: bool
) -> None:
    content = os.urandom(9 * 1024 * 1024)
    form = client.build_request("POST", "/upload", files={"file": ("big.bin", content)})
    body, headers = form.read(), {"content-type": form.headers["content-type"]}
    response = await client.post("/upload", content=in_chunks(body) if chunked else body, headers=headers)
    assert response.status_code == 200, response.text
    assert (await download(response.json()["url"])).content == content


async def post_raw_part(client: httpx.AsyncClient, filename: str) -> httpx.Response:
    """One file part with no Content-Type of its own, which httpx's `files=` cannot send."""
    body = f'--b\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\nxyz\r\n--b--\r\n'
    return await client.post(
        "/upload", content=body.encode(), headers={"content-type": "multipart/form-data; boundary=b"}
    )


async def test_upload_without_a_part_type_is_stored_as_octet_stream(
    client: httpx.AsyncClient, download: Download
) -> None:
    response = await post_raw_part(client, "a.bin")
    assert response.status_code == 200, response.text
    fetched = await download(response.json()["url"])
    assert fetched.content == b"xyz"
    assert fetched.headers["content-type"] == "application/octet-stream"


async def test_upload_with_an_empty_filename_answers_null(client: httpx.AsyncClient, download: Download) -> None:
    response = await post_raw_part(client, "")
    assert response.status_code == 200, response.text
    assert response.json()["filename"] is None
    fetched = await download(response.json()["url"])
    assert fetched.headers["content-disposition"] == "attachment"


async def test_empty_file_is_stored(client: httpx.AsyncClient, download: Download) -> None:
    response = await client.post("/upload", files={"file": ("empty.txt", b"", "text/plain")})
    assert response.status_code == 200, response.text
    assert (await download(response.json()["url"])).content == b""


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("evil\u202egnp.exe", "evilgnp.exe"),
        ("uploads/other-key", "other-key"),
    ],
)
async def test_client_filename_never_picks_the_key(
    client: httpx.AsyncClient, download: Download, sent: str, kept: str | None
) -> None:
    response = await client.post("/upload", files={"file": (sent, b"data", "text/plain")})

    assert response.status_code == 200, response.text
    assert response.json()["filename"] == kept
    assert re.fullmatch(r"uploads/[0-9a-f]{32}", key_of(response.json()["url"]))
    assert (await download(response.json()["url"])).content == b"data"


async def test_same_filename_twice_makes_two_objects(client: httpx.AsyncClient, download: Download) -> None:
    first = await client.post("/upload", files={"file": ("same.txt", b"first", "text/plain")})
    second = await client.post("/upload", files={"file": ("same.txt", b"second", "text/plain")})

    assert key_of(first.json()["url"]) != key_of(second.json()["url"])
    assert (await download(first.json()["url"])).content == b"first"
    assert (await download(second.json()["url"])).content == b"second"


async def test_generate_returns_a_link_to_a_png(client: httpx.AsyncClient, download: Download) -> None:
    response = await client.post("/generate", json={"prompt": "a lighthouse at dusk"})

    assert response.status_code == 200, response.text
    assert key_of(response.json()["url"]).startswith("generated/")
    fetched = await download(response.json()["url"])
    assert fetched.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(fetched.content))
    assert (image.format, image.size) == ("PNG", (512, 512))


async def test_generate_image_depends_on_the_prompt(client: httpx.AsyncClient, download: Download) -> None:
    images = []
    for prompt in ("a red fox", "a blue whale"):
        response = await client.post("/generate", json={"prompt": prompt, "extra": "ignored"})
        images.append((await download(response.json()["url"])).content)
    assert images[0] != images[1]


async def test_generate_accepts_json_without_a_content_type(client: httpx.AsyncClient) -> None:
    # The service we replace read a body with no Content-Type as JSON; callers may rely on it.
    response = await client.post("/generate", content=b'{"prompt": "x"}')
    assert response.status_code == 200, response.text
