"""Load on the real server process: concurrent uploads and renders, and a soak of mixed requests."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from conftest import Server, StartServer, in_chunks

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024

# ---------------------------------------------------------------- concurrency

UPLOADS = 32
GENERATES = 8
LOAD_DEADLINE_SECONDS = 60
# Probes from their own process, so that the test process's own stalls (it also runs moto and pushes
# ~80 MiB of uploads) are not charged to the service. A probe fails as the container's health check
# would: no answer within 4 s (the Dockerfile's HEALTHCHECK). How fast health answers under load is
# the benchmark's business; test_operations shows the event loop answering while the work is held.
PROBE_SCRIPT = """
import sys, time, httpx
with httpx.Client(trust_env=False, timeout=4) as client:
    for _ in range(int(60 / 0.05)):
        started = time.perf_counter()
        try:
            status = client.get(sys.argv[1]).status_code
        except httpx.TimeoutException:
            status = 0
        print(time.monotonic(), time.perf_counter() - started, status, flush=True)
        time.sleep(0.05)
"""


class Probe(NamedTuple):
    at: float  # time.monotonic(), comparable across processes on Linux
    seconds: float
    status: int


@pytest.fixture
async def load_client() -> AsyncIterator[httpx.AsyncClient]:
    """An async client with a connection for every concurrent request, ignoring proxy settings."""
    limits = httpx.Limits(max_connections=48, max_keepalive_connections=48)
    async with httpx.AsyncClient(trust_env=False, timeout=30, limits=limits) as client:
        yield client


def start_probes(server: Server) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PROBE_SCRIPT, f"{server.base_url}/health"], stdout=subprocess.PIPE, text=True
    )


def stop_probes(process: subprocess.Popen[str]) -> list[Probe]:
    process.terminate()
    output, _ = process.communicate(timeout=10)
    lines = map(str.split, output.splitlines())
    return [Probe(float(at), float(seconds), int(status)) for at, seconds, status in lines]


async def check_stored(client: httpx.AsyncClient, answer: dict[str, Any], sent: bytes | None) -> None:
    """The link downloads the bytes the answer describes, and the bytes sent when there were any."""
    download = await client.get(answer["url"])
    assert download.status_code == 200, download.text
    assert len(download.content) == answer["size"]
    assert hashlib.sha256(download.content).hexdigest() == answer["sha256"]
    if sent is not None:
        assert download.content == sent


async def test_concurrent_uploads_and_generates_are_all_stored_while_health_answers(
    start_server: StartServer, s3_env: dict[str, str | None], load_client: httpx.AsyncClient
) -> None:
    server = start_server(s3_env)
    rng = random.Random(4)
    files = [rng.randbytes(rng.randint(2 * MiB, 3 * MiB)) for _ in range(UPLOADS)]

    async def post_upload(data: bytes) -> dict[str, Any]:
        response = await load_client.post(f"{server.base_url}/upload", files={"file": ("blob.bin", data)})
        assert response.status_code == 200, response.text
        return response.json()

    async def post_generate(number: int) -> dict[str, Any]:
        response = await load_client.post(f"{server.base_url}/generate", json={"prompt": f"a lighthouse {number}"})
        assert response.status_code == 200, response.text
        return response.json()

    probes = start_probes(server)
    try:
        await asyncio.sleep(0.5)  # probes of the idle service, for comparison
        started = time.monotonic()
        async with asyncio.timeout(LOAD_DEADLINE_SECONDS):
            uploads, generates = await asyncio.gather(
                asyncio.gather(*map(post_upload, files)), asyncio.gather(*map(post_generate, range(GENERATES)))
            )
        ended = time.monotonic()
    finally:
        results = stop_probes(probes)

    await asyncio.gather(
        *(check_stored(load_client, answer, data) for answer, data in zip(uploads, files, strict=True)),
        *(check_stored(load_client, answer, None) for answer in generates),
    )
    idle = [probe.seconds for probe in results if probe.at < started]
    # A probe sent just before the load started still waited through its beginning.
    loaded = [probe.seconds for probe in results if started - 0.05 <= probe.at <= ended]
    print(
        f"\n{UPLOADS} uploads ({sum(map(len, files)) / MiB:.0f} MiB) + {GENERATES} generates"
        f" in {ended - started:.2f} s;"
        f" /health idle: median {statistics.median(idle) * 1000:.1f} ms;"
        f" under load: {len(loaded)} probes, median {statistics.median(loaded) * 1000:.1f} ms,"
        f" max {max(loaded) * 1000:.1f} ms"
    )
    assert [probe for probe in results if probe.status != 200] == []
    assert len(loaded) >= 5, "too few probes ran during the load to say anything"


# ---------------------------------------------------------------- soak

SOAK_MAX_UPLOAD_BYTES = MiB
# The service's limit on an upload's whole body: the file limit plus room for the multipart framing.
SOAK_BODY_LIMIT = SOAK_MAX_UPLOAD_BYTES + 64 * 1024
SOAK_CONCURRENCY = 4
SOAK_SAMPLES = 20
SOAK_WARMUP_REQUESTS = 150
BATCH_DEADLINE_SECONDS = 60
BOUNDARY = "soak-boundary"
# Growth allowed from the first fifth of the samples to the last fifth. Measured over 5,000 requests:
# fds 19 -> 19, threads 10 -> 10, RSS 66.5 -> 68.1 MB (samples wander by about 2 MB). A leak of one fd
# per thousand requests, or of 2.5 KB per request, would break these over the long soak.
MAX_FD_GROWTH = 3
MAX_THREAD_GROWTH = 4  # anyio's worker threads come and go with the load
MAX_RSS_GROWTH_MB = 10


class Usage(NamedTuple):
    fds: int
    threads: int
    rss_mb: float


def usage(pid: int) -> Usage:
    """The process's open file descriptors, threads and resident memory, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    rss_kb = int(status["VmRSS"].split()[0])
    return Usage(len(os.listdir(f"/proc/{pid}/fd")), int(status["Threads"]), rss_kb / 1024)


def peak(samples: list[Usage]) -> Usage:
    return Usage(*(max(values) for values in zip(*samples, strict=True)))


def multipart(data: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


@dataclass
class Soak:
    """One soak's client, the links it has been given, and what it got back."""

    client: httpx.AsyncClient
    base_url: str
    rng: random.Random
    # (url, sha256, bytes sent or None for a rendered image); bounded, so the test's memory is too.
    links: deque[tuple[str, str, bytes | None]] = field(default_factory=lambda: deque(maxlen=64))
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)

    async def send(self, kind: str) -> None:
        if kind in NEEDS_A_LINK and not self.links:
            kind = "health"
        expected, response = await REQUESTS[kind](self)
        self.statuses[kind, response.status_code] += 1
        if response.status_code != expected:
            self.unexpected.append(f"{kind}: {response.status_code} {response.text[:200]}")
        elif expected >= 400 and "detail" not in response.json():
            self.unexpected.append(f"{kind}: {expected} without a JSON detail: {response.text[:200]}")

    def link(self) -> tuple[str, str, bytes | None]:
        return self.rng.choice(self.links)

    async def remember(self, response: httpx.Response, sent: bytes | None) -> httpx.Response:
        if response.status_code == 200:
            answer = response.json()
            self.links.append((answer["url"], answer["sha256"], sent))
        return response


async def health(soak: Soak) -> tuple[int, httpx.Response]:
    return 200, await soak.client.get(f"{soak.base_url}/health")


async def generate(soak: Soak) -> tuple[int, httpx.Response]:
    prompt = f"a lighthouse at dusk, {soak.rng.randrange(10**6)}"
    response = await soak.client.post(f"{soak.base_url}/generate", json={"prompt": prompt})
    return 200, await soak.remember(response, None)


async def upload(soak: Soak) -> tuple[int, httpx.Response]:
    data = soak.rng.randbytes(soak.rng.randint(1, 32 * 1024))
    response = await soak.client.post(f"{soak.base_url}/upload", files={"file": ("notes.txt", data, "text/plain")})
    return 200, await soak.remember(response, data)


async def download(soak: Soak) -> tuple[int, httpx.Response]:
    url, sha256, sent = soak.link()
    response = await soak.client.get(url)
    if response.status_code == 200 and hashlib.sha256(response.content).hexdigest() != sha256:
        soak.unexpected.append(f"download: {url} does not match its sha256")
    if response.status_code == 200 and sent is not None and response.content != sent:
        soak.unexpected.append(f"download: {url} is not the bytes uploaded")
    return 200, response


async def blank_prompt(soak: Soak) -> tuple[int, httpx.Response]:
    return 422, await soak.client.post(f"{soak.base_url}/generate", json={"prompt": "  "})


async def unknown_path(soak: Soak) -> tuple[int, httpx.Response]:
    return 404, await soak.client.get(f"{soak.base_url}/no-such-page")


async def tampered_link(soak: Soak) -> tuple[int, httpx.Response]:
    url, _, _ = soak.link()
    return 403, await soak.client.get(url.replace("signature=", "signature=0"))


async def generate_over_limit(soak: Soak) -> tuple[int, httpx.Response]:
    # Refused on Content-Length, before the body is read.
    body = b'{"prompt": "' + b"a" * 70_000 + b'"}'
    return 413, await soak.client.post(f"{soak.base_url}/generate", content=body)


async def upload_over_limit(soak: Soak) -> tuple[int, httpx.Response]:
    # Fits the body limit, so it is parsed (and spooled to a temporary file past 1 MiB) before it is refused.
    body = multipart(soak.rng.randbytes(SOAK_MAX_UPLOAD_BYTES + 16 * 1024))
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    return 413, await soak.client.post(f"{soak.base_url}/upload", content=body, headers=headers)


async def chunked_upload_over_limit(soak: Soak) -> tuple[int, httpx.Response]:
    # Refused while streaming, after the parser has spooled to disk; only a little more than the limit
    # is sent, so that the rest fits the socket buffers and the client reads the answer.
    body = multipart(soak.rng.randbytes(SOAK_BODY_LIMIT + 16 * 1024))
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    return 413, await soak.client.post(f"{soak.base_url}/upload", content=in_chunks(body), headers=headers)


REQUESTS: dict[str, Callable[[Soak], Awaitable[tuple[int, httpx.Response]]]] = {
    "health": health,
    "generate": generate,
    "upload": upload,
    "download": download,
    "blank_prompt": blank_prompt,
    "unknown_path": unknown_path,
    "tampered_link": tampered_link,
    "generate_over_limit": generate_over_limit,
    "upload_over_limit": upload_over_limit,
    "chunked_upload_over_limit": chunked_upload_over_limit,
}
WEIGHTS = [5, 3, 4, 4, 1, 1, 1, 1, 1, 1]
NEEDS_A_LINK = {"download", "tampered_link"}


async def run_batch(soak: Soak, count: int) -> None:
    """`count` requests of the mix, SOAK_CONCURRENCY at a time."""
    kinds = iter(soak.rng.choices(list(REQUESTS), WEIGHTS, k=count))

    async def worker() -> None:
        for kind in kinds:  # one iterator shared by the workers: each request is sent once
            await soak.send(kind)

    async with asyncio.timeout(BATCH_DEADLINE_SECONDS):
        await asyncio.gather(*(worker() for _ in range(SOAK_CONCURRENCY)))


@pytest.mark.parametrize(
    "requests",
    [
        pytest.param(600, id="short"),
        pytest.param(5000, id="long", marks=[pytest.mark.soak, pytest.mark.timeout(900)]),
    ],
)
async def test_soak_does_not_leak(
    requests: int, start_server: StartServer, data_dir: Path, load_client: httpx.AsyncClient
) -> None:
    """A mixed stream of good and bad requests leaves the service's fds, threads and memory flat.

    Sampled between batches, when no request is in flight, after a warm-up that fills the worker
    thread pool, the allocator's arenas and the connection pool.
    """
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "MAX_UPLOAD_BYTES": str(SOAK_MAX_UPLOAD_BYTES)})
    soak = Soak(load_client, server.base_url, random.Random(requests))
    await run_batch(soak, SOAK_WARMUP_REQUESTS)

    started = time.monotonic()
    samples = []
    for _ in range(SOAK_SAMPLES):
        await run_batch(soak, requests // SOAK_SAMPLES)
        samples.append(usage(server.process.pid))
    elapsed = time.monotonic() - started

    fifth = SOAK_SAMPLES // 5
    first, last = peak(samples[:fifth]), peak(samples[-fifth:])
    growth = Usage(last.fds - first.fds, last.threads - first.threads, last.rss_mb - first.rss_mb)
    print(
        f"\n{requests} requests in {elapsed:.1f} s; first fifth (max) {first}, last fifth (max) {last};"
        f" all samples: {[tuple(sample) for sample in samples]}; statuses: {dict(soak.statuses)}"
    )
    assert soak.unexpected == []
    assert sum(soak.statuses.values()) == SOAK_WARMUP_REQUESTS + requests // SOAK_SAMPLES * SOAK_SAMPLES
    assert "Traceback" not in server.log()
    assert growth.fds <= MAX_FD_GROWTH
    assert growth.threads <= MAX_THREAD_GROWTH
    assert growth.rss_mb <= MAX_RSS_GROWTH_MB
