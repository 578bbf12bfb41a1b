"""Benchmark of the service against its limits: direct S3 for uploads, render.py alone for /generate,
the image check alone for /generate from an image API (bench/fake_image_api.py stands in for it).

Starts a moto S3 server and the real service (`python gen_service.py`) on loopback, prints one table
(each figure the median of --runs runs, ratios taken within one run) and saves bench/results.json.

    python bench/bench.py [--runs N] [--upload-mb N] [--quick] [--no-wrk] [--only PHASE ...]

CPU figures come from /proc/<pid>/stat of the service, not wall time: moto and this client share
the machine's two cores with it. Wall times and requests per second are noisy for the same reason.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple
from uuid import uuid4

import boto3
import httpx
from PIL import Image as PILImage
from PIL import ImageChops

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from image_check import image_media_type  # noqa: E402
from render import render_png  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
BUCKET = "bench"
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
# Every process here, this one included, sees fake credentials and no AWS config files, and
# the service sees none of the developer's settings: only what clean_env() and service() set.
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
}


# ---------------------------------------------------------------- a process, seen through /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of all the process's threads, live and exited."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


def disk_write_bytes(pid: int) -> int:
    # Bytes of file pages the process dirtied, counted when dirtied: an unnamed temporary file that
    # is deleted before writeback still counts (and shows up again in cancelled_write_bytes), while
    # it never appears in a directory listing of TMPDIR. Sockets do not count; logs do, a few bytes.
    return int(re.search(r"^write_bytes: (\d+)$", Path(f"/proc/{pid}/io").read_text(), re.M)[1])


# ---------------------------------------------------------------- moto and the service


def clean_env(**settings: str) -> dict[str, str]:
    kept = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    return {**kept, **FAKE_AWS, **settings}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(port: int) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            return int(sock.recv(64).split()[1])
    except (OSError, IndexError, ValueError):
        return None


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def moto_server(workdir: Path, largest_object: int) -> Iterator[str]:
    """moto in its own process, so that its CPU lands neither in the service nor in this client."""
    port = free_port()
    # moto spools objects over ~5 MB to its TMPDIR; real S3 writes nothing to our disk, so keep them in memory.
    env = clean_env(MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=str(largest_object + MiB), TMPDIR=str(workdir))
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: http_status(port) is not None, process, "moto")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def wait_for(ready: Callable[[], bool], process: subprocess.Popen[bytes], name: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start (exit status {process.poll()})")
        time.sleep(0.005)


class Running(NamedTuple):
    pid: int
    port: int
    startup_seconds: float

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def service(moto_url: str, workdir: Path, max_upload_bytes: int, **settings: str) -> Iterator[Running]:
    """`python gen_service.py` on a free port, storing in moto, with a TMPDIR of its own and `settings`."""
    port, tmpdir, log_path = free_port(), workdir / "service-tmp", workdir / "service.log"
    tmpdir.mkdir(exist_ok=True)
    env = clean_env(
        HOST="127.0.0.1",
        PORT=str(port),
        S3_BUCKET=BUCKET,
        S3_ENDPOINT_URL=moto_url,
        MAX_UPLOAD_BYTES=str(max_upload_bytes),
        TMPDIR=str(tmpdir),
        # /proc figures are per process; more workers would be more copies of this same process.
        WORKERS="1",
        **settings,
    )
    started = time.perf_counter()
    with log_path.open("wb") as log:
        # cwd is the work directory, so that a developer's .env cannot change what is measured.
        command = [sys.executable, str(ROOT / "gen_service.py")]
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: http_status(port) == 200, process, "service")
        startup_seconds = time.perf_counter() - started
        # Only our own log proves that the process answering on this port is ours.
        if f"Uvicorn running on http://127.0.0.1:{port}" not in log_path.read_text():
            raise RuntimeError(f"port {port} is taken by another process")
        yield Running(process.pid, port, startup_seconds)
    finally:
        stop(process)


# ---------------------------------------------------------------- upload


def empty_bucket(s3: object) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):  # type: ignore[attr-defined]
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})  # type: ignore[attr-defined]


def make_file(path: Path, size: int) -> Path:
    block = os.urandom(MiB)
    with path.open("wb") as out:
        for offset in range(0, size, MiB):
            out.write(block[: min(MiB, size - offset)])
        os.fsync(out.fileno())  # written back now, not while we measure
    return path


class Sample(NamedTuple):
    seconds: float
    cpu_seconds: float


def sample(pid: int) -> Sample:
    return Sample(time.perf_counter(), cpu_seconds(pid))


class MarkedFile:
    """A file for httpx to stream that samples the service as it hands over its last byte, to split
    an upload into receiving the body and what the service does after it (storing, answering)."""

    def __init__(self, file: BinaryIO, pid: int) -> None:
        self.file, self.pid = file, pid
        self.body_sent: Sample | None = None

    def read(self, size: int = -1) -> bytes:
        chunk = self.file.read(size)
        if not chunk and self.body_sent is None:
            self.body_sent = sample(self.pid)
        return chunk

    def __getattr__(self, name: str) -> Any:  # fileno, seek, tell: httpx sends a Content-Length
        return getattr(self.file, name)


def post_file(running: Running, path: Path) -> Sample:
    """Uploads `path` through /upload, streamed by httpx in 64 KiB reads; the sample at its last byte."""
    with httpx.Client(timeout=None) as client, path.open("rb") as file:
        body = MarkedFile(file, running.pid)
        response = client.post(
            f"{running.base_url}/upload", files={"file": (path.name, body, "application/octet-stream")}
        )
    response.raise_for_status()
    assert body.body_sent is not None
    return body.body_sent


class Direct(NamedTuple):
    seconds: float
    completing_seconds: float  # of which S3 (moto) assembling the parts into the object


def direct_upload(s3: object, path: Path) -> Direct:
    """The limit: boto3's upload_fileobj of the same file to the same endpoint, default TransferConfig."""
    marks: dict[str, float] = {}
    events = s3.meta.events  # type: ignore[attr-defined]
    handlers = {
        f"{when}-call.s3.CompleteMultipartUpload": partial(
            lambda when, **_: marks.update({when: time.perf_counter()}), when
        )
        for when in ("before", "after")
    }
    for event, handler in handlers.items():
        events.register(event, handler)
    started = time.perf_counter()
    try:
        with path.open("rb") as body:
            s3.upload_fileobj(body, BUCKET, f"direct/{uuid4().hex}")  # type: ignore[attr-defined]
    finally:
        for event, handler in handlers.items():
            events.unregister(event, handler)
    return Direct(time.perf_counter() - started, marks.get("after", 0.0) - marks.get("before", 0.0))


def upload_run(running: Running, s3: object, small: Path, large: Path, direct_first: bool) -> dict[str, float]:
    # VmHWM is the peak over the process's life and cannot go down, so every run gets a fresh
    # service: the peak after a 1 MiB upload is its baseline, and the peak after the large upload
    # that follows, minus that baseline, is what the large upload costs.
    post_file(running, small)
    small_peak = peak_rss_mb(running.pid)
    direct = direct_upload(s3, large) if direct_first else Direct(0.0, 0.0)
    empty_bucket(s3)
    before, written_before = sample(running.pid), disk_write_bytes(running.pid)
    body_sent = post_file(running, large)
    after, written = sample(running.pid), disk_write_bytes(running.pid) - written_before
    peak = peak_rss_mb(running.pid)
    empty_bucket(s3)
    if not direct_first:  # alternate the order, so that neither side always runs on a warmer moto
        direct = direct_upload(s3, large)
        empty_bucket(s3)
    gib = large.stat().st_size / GiB
    return {
        "service_seconds": after.seconds - before.seconds,
        "direct_seconds": direct.seconds,
        "direct_completing_seconds": direct.completing_seconds,
        "ratio": (after.seconds - before.seconds) / direct.seconds,
        "seconds_after_body_sent": after.seconds - body_sent.seconds,
        "peak_rss_mb": peak,
        "peak_rss_after_1mib_mb": small_peak,
        "peak_rss_growth_mb": peak - small_peak,
        "cpu_seconds_per_gb": (after.cpu_seconds - before.cpu_seconds) / gib,
        "cpu_seconds_per_gb_receiving": (body_sent.cpu_seconds - before.cpu_seconds) / gib,
        "cpu_seconds_per_gb_after_body_sent": (after.cpu_seconds - body_sent.cpu_seconds) / gib,
        "temp_disk_bytes": written,
    }


# ---------------------------------------------------------------- a full house of uploads

FULL_HOUSE = 32  # MAX_CONCURRENT_UPLOADS for this run (the default)


def current_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024


async def concurrent_uploads(base_url: str, path: Path, count: int) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=httpx.Limits(max_connections=count)) as client:

        async def one() -> None:
            with path.open("rb") as file:
                files = {"file": (path.name, file, "application/octet-stream")}
                (await client.post("/upload", files=files)).raise_for_status()

        await asyncio.gather(*(one() for _ in range(count)))


def stalled_clients_rss_mb(running: Running, count: int, sent_bytes: int, field_bytes: int = 0) -> float:
    """What `count` uploads that send their head, a text field of `field_bytes` if any, and `sent_bytes` of
    the file, then stop, add to RSS."""
    before = current_rss_mb(running.pid)
    field = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n' + b"n" * field_bytes + b"\r\n"
    head = (field if field_bytes else b"") + (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="stalled.bin"\r\n\r\n' + os.urandom(sent_bytes)
    )
    request = (
        f"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {len(head) + 20 * MiB}\r\n\r\n"
    ).encode() + head
    connections = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(count)]
    try:
        for connection in connections:
            connection.sendall(request)
        time.sleep(2)  # for the service to read what they sent; nothing marks that from outside
        return current_rss_mb(running.pid) - before
    finally:
        for connection in connections:
            connection.close()


def full_house_run(running: Running, s3: object, small: Path, part_file: Path) -> dict[str, float]:
    """FULL_HOUSE + 8 uploads at once, more than the slots, each of several parts: what the most that
    uploads can hold costs, per slot. (A fresh service, whose heap has no room freed by earlier work.)"""
    post_file(running, small)
    small_peak = peak_rss_mb(running.pid)
    asyncio.run(concurrent_uploads(running.base_url, part_file, FULL_HOUSE + 8))
    growth = peak_rss_mb(running.pid) - small_peak
    empty_bucket(s3)
    return {
        "peak_rss_growth_mb": growth,
        "per_upload_mb": growth / FULL_HOUSE,
    }


# ---------------------------------------------------------------- generate and health


def prompts(count: int, run: int) -> list[str]:
    return [f"a lighthouse at dusk over a stormy sea, oil painting, study {run}-{i}" for i in range(count)]


async def generate_load(base_url: str, prompt_list: list[str], concurrency: int) -> tuple[list[float], list[float]]:
    """Latencies of /generate at `concurrency`, and of GET / probed every 20 ms meanwhile (the
    probes, well under 1% of the service's CPU, show whether rendering blocks the event loop)."""
    latencies: list[float] = []
    probes: list[float] = []
    pending = iter(prompt_list)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=60, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def worker() -> None:
            for prompt in pending:
                started = time.perf_counter()
                (await client.post("/generate", json={"prompt": prompt})).raise_for_status()
                latencies.append(time.perf_counter() - started)

        async def probe(load: asyncio.Future[object]) -> None:
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as prober:
                while not load.done():
                    started = time.perf_counter()
                    (await prober.get("/")).raise_for_status()
                    probes.append(time.perf_counter() - started)
                    await asyncio.sleep(0.02)

        load = asyncio.gather(*(worker() for _ in range(concurrency)))
        await asyncio.gather(load, probe(load))
    return latencies, probes


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def generate_run(
    running: Running, count: int, run: int, alone: Callable[[str], object] = render_png, name: str = "render"
) -> dict[str, float]:
    """CPU per /generate in the service, and of `alone` (what the request cannot do without) per prompt."""
    prompt_list = prompts(count, run)
    cpu_before = cpu_seconds(running.pid)
    latencies, probes = asyncio.run(generate_load(running.base_url, prompt_list, concurrency=8))
    service_cpu = cpu_seconds(running.pid) - cpu_before
    alone_before = time.process_time()
    for prompt in prompt_list:
        alone(prompt)
    alone_cpu = time.process_time() - alone_before
    return {
        "service_cpu_ms": 1000 * service_cpu / count,
        f"{name}_cpu_ms": 1000 * alone_cpu / count,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "health_p99_during_generate_ms": 1000 * percentile(probes, 0.99),
    }


async def health_load(port: int, requests: int, concurrency: int) -> None:
    """Keep-alive HTTP/1.1 on raw asyncio streams: much lighter than an HTTP client library."""

    async def connection(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(count):
            writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"GET / answered {head[:40]!r}")
            await reader.readexactly(int(re.search(rb"content-length: *(\d+)", head, re.I)[1]))
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(connection(requests // concurrency) for _ in range(concurrency)))


def run_wrk(base_url: str, seconds: int, concurrency: int) -> int:
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", f"{base_url}/"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk saw errors:\n{output}")
    return int(re.search(r"(\d+) requests in", output)[1])


def client_cpu() -> float:
    """CPU seconds of this process and of its finished children (wrk)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def health_run(running: Running, requests: int, use_wrk: bool) -> dict[str, float]:
    # On two cores the client competes with the service for CPU; wrk (C) takes far less of it than
    # the Python client, whose own CPU share is recorded so a saturated client shows.
    cpu_before, client_before, started = cpu_seconds(running.pid), client_cpu(), time.perf_counter()
    if use_wrk:  # wrk runs for a time, not a count: about as long as the Python client would take
        requests = run_wrk(running.base_url, seconds=max(1, round(requests / 2000)), concurrency=16)
    else:
        requests = requests // 16 * 16
        asyncio.run(health_load(running.port, requests, concurrency=16))
    wall = time.perf_counter() - started
    return {
        "service_cpu_us": 1e6 * (cpu_seconds(running.pid) - cpu_before) / requests,
        "requests_per_second": requests / wall,
        "client_cpu_share": (client_cpu() - client_before) / wall,
        "requests": requests,
    }


# ---------------------------------------------------------------- generate from an image API


def noisy_png(side: int) -> bytes:
    """A side x side PNG, a gradient with two bits of noise: about as hard to compress as a photograph
    (960 x 960 is about 1 MiB)."""
    base = PILImage.radial_gradient("L").resize((side, side)).convert("RGB")
    noise = random.Random(5).randbytes(3 * side * side).translate(bytes(value % 4 for value in range(256)))
    out = io.BytesIO()
    ImageChops.add(base, PILImage.frombytes("RGB", (side, side), noise)).save(out, format="PNG")
    return out.getvalue()


@contextmanager
def fake_image_api(workdir: Path, image: bytes, delay: float) -> Iterator[str]:
    """bench/fake_image_api.py in its own process; its base URL, for OPENAI_BASE_URL (and `/held`)."""
    port, image_file = free_port(), workdir / f"fake-image-{len(image)}.png"
    image_file.write_bytes(image)
    command = [sys.executable, str(ROOT / "bench" / "fake_image_api.py"), str(port), str(delay), str(image_file)]
    process = subprocess.Popen(command, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: http_status(port) is not None, process, "fake image API")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process)


def remote_settings(api_url: str, **more: str) -> dict[str, str]:
    return {"IMAGE_BACKEND": "openai", "OPENAI_BASE_URL": api_url, "OPENAI_API_KEY": "sk-bench", **more}


def remote_cpu_run(running: Running, image: bytes, count: int, run: int) -> dict[str, float]:
    """CPU per /generate against an API that answers at once, and the image check alone on the same image."""

    def check(prompt: str) -> str:
        return image_media_type(image, len(image))

    return generate_run(running, count, run, alone=check, name="check") | {"image_bytes": len(image)}


# Probes /health every 20 ms on one keep-alive connection until terminated, from a process of its own so
# that the client holding 1,000 requests open does not delay the probes it measures. Prints a line per
# probe: when it was sent (time.monotonic(), the same clock across processes) and how long it took.
PROBE_SCRIPT = """
import socket, sys, time
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as sock:
    while True:
        started = time.perf_counter()
        sock.sendall(b"GET /health HTTP/1.1\\r\\nHost: bench\\r\\n\\r\\n")
        answer = b""
        while not answer.endswith(b'"ok"}'):
            answer += sock.recv(4096)
        print(time.monotonic(), time.perf_counter() - started, flush=True)
        time.sleep(0.02)
"""


def proc_status(pid: int, field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)[1])


async def post_generate_raw(port: int, number: int) -> tuple[int, float]:
    """One POST /generate on a connection of its own, on raw asyncio streams (1,000 httpx clients'
    worth of work would take the CPU the service needs); its status, and when its answer came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"prompt": f"a lighthouse {number}"}).encode()
    writer.write(
        b"POST /generate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    answered = time.monotonic()
    await reader.read()
    writer.close()
    await writer.wait_closed()
    return int(head.split()[1]), answered


def remote_hold_run(running: Running, api: str, count: int) -> dict[str, float]:
    """`count` generations at once against an API (`api`) that holds each a while: what holding them
    costs (memory, threads) and whether /health stays quick meanwhile."""
    rss_before, threads_before = proc_status(running.pid, "VmRSS") / 1024, proc_status(running.pid, "Threads")
    samples: list[tuple[float, int]] = []
    sampling = True
    all_held = math.inf  # when the API holds every generation

    def sample() -> None:
        nonlocal all_held
        with httpx.Client() as client:
            while sampling:
                samples.append((time.monotonic(), proc_status(running.pid, "Threads")))
                if all_held == math.inf and int(client.get(f"{api}/held").text) == count:
                    all_held = time.monotonic()
                time.sleep(0.05)

    probe = subprocess.Popen([sys.executable, "-c", PROBE_SCRIPT, str(running.port)], stdout=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(0.5)  # probes of the idle service first

    async def all_at_once() -> tuple[list[tuple[int, float]], float]:
        calls = [asyncio.create_task(post_generate_raw(running.port, n)) for n in range(count)]
        await asyncio.sleep(0)
        return await asyncio.gather(*calls), time.monotonic()

    sent, cpu_before = time.monotonic(), cpu_seconds(running.pid)
    answers, done = asyncio.run(all_at_once())
    cpu = cpu_seconds(running.pid) - cpu_before
    sampling = False
    sampler.join()
    probe.terminate()
    probes = [
        (float(at), float(seconds)) for at, seconds in map(str.split, probe.communicate(timeout=60)[0].splitlines())
    ]
    # While every generation waits on the API: from when it holds them all to the first answer.
    first_answer = min(answered for _, answered in answers)
    waiting = [threads for at, threads in samples if all_held <= at < first_answer]
    latencies = [seconds for _, seconds in probes]
    latencies_waiting = [seconds for at, seconds in probes if all_held <= at < first_answer] or [math.nan]
    return {
        "succeeded": sum(status == 200 for status, _ in answers),
        "seconds": done - sent,
        "held_cpu_ms": 1000 * cpu / count,
        "rss_growth_mb": proc_status(running.pid, "VmHWM") / 1024 - rss_before,
        "threads_before": threads_before,
        "threads_while_waiting": max(waiting, default=0),
        "threads_most": max(threads for _, threads in samples),
        "health_p99_ms": 1000 * percentile(latencies, 0.99),
        "health_p99_while_waiting_ms": 1000 * percentile(latencies_waiting, 0.99),
        "seconds_to_hold_all": all_held - sent,
        "health_max_ms": 1000 * max(latencies),
    }


# ---------------------------------------------------------------- report


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


Row = tuple[str, str, str, "bool | None"]


def row(name: str, value: float, shown: str, limit: float | None = None, note: str = "") -> Row:
    """A table row; `met` is None where the issue sets no target."""
    target = note if limit is None else f"<= {shown.format(limit)} {note}".rstrip()
    return name, shown.format(value), target, None if limit is None else value <= limit


def table_rows(figures: dict[str, dict[str, float]], upload_mb: int) -> list[Row]:
    """The rows of the phases measured."""
    phases = {
        "upload": partial(upload_rows, upload_mb=upload_mb),
        "full_house": full_house_rows,
        "generate": generate_rows,
        "remote": remote_rows,
        "health": health_rows,
        "startup": lambda startup: [row("startup: process start to first 200", startup["seconds"], "{:.2f} s", 1.0)],
    }
    return [table_row for phase, rows in phases.items() if phase in figures for table_row in rows(figures[phase])]


def upload_rows(up: dict[str, float], upload_mb: int) -> list[Row]:
    return [
        row(f"upload {upload_mb} MiB: time / direct boto3", up["ratio"], "{:.2f}x", 1.15, "(stretch 1.05x)"),
        row("upload: through the service", up["service_seconds"], "{:.1f} s"),
        row("upload: direct boto3 upload_fileobj", up["direct_seconds"], "{:.1f} s"),
        row("upload: of which moto completing the object", up["direct_completing_seconds"], "{:.1f} s"),
        row("upload: service time after the body was sent", up["seconds_after_body_sent"], "{:.1f} s"),
        row("upload: service peak RSS", up["peak_rss_mb"], "{:.0f} MB", 100),
        row("upload: peak RSS over the 1 MiB-upload peak", up["peak_rss_growth_mb"], "{:.0f} MB", 25),
        row("upload: service CPU per GiB", up["cpu_seconds_per_gb"], "{:.2f} s", 2.5),
        row("upload: of which while receiving the body", up["cpu_seconds_per_gb_receiving"], "{:.2f} s"),
        row("upload: bytes written to temporary disk", up["temp_disk_bytes"] / MiB, "{:.0f} MiB", note="stretch: 0"),
    ]


def full_house_rows(house: dict[str, float]) -> list[Row]:
    return [
        row(f"uploads: peak RSS, {FULL_HOUSE + 8} at once over 1 MiB", house["peak_rss_growth_mb"], "{:.0f} MB"),
        row(f"uploads: the same per slot ({FULL_HOUSE} slots)", house["per_upload_mb"], "{:.1f} MB"),
        row("uploads: 100 stalled after 100 KB, RSS", house["stalled_100_rss_mb"], "{:.0f} MB"),
        row("uploads: 100 stalled, 64 KiB fields + 250 KB", house["stalled_100_most_rss_mb"], "{:.0f} MB"),
    ]


def generate_rows(gen: dict[str, float]) -> list[Row]:
    return [
        row("generate: service CPU per request", gen["service_cpu_ms"], "{:.1f} ms", gen["render_cpu_ms"] + 2),
        row("generate: render_png alone (target: + 2 ms)", gen["render_cpu_ms"], "{:.1f} ms"),
        row("generate: latency p50 at concurrency 8", gen["p50_ms"], "{:.0f} ms"),
        row("generate: latency p99 at concurrency 8", gen["p99_ms"], "{:.0f} ms"),
        row("generate: GET / latency p99 meanwhile", gen["health_p99_during_generate_ms"], "{:.0f} ms"),
    ]


def remote_rows(remote: dict[str, float]) -> list[Row]:
    mib = remote["image_bytes"] / MiB
    return [
        row(
            f"image API, {mib:.1f} MiB PNG: CPU per /generate",
            remote["service_cpu_ms"],
            "{:.1f} ms",
            remote["check_cpu_ms"] + 3,
        ),
        row("image API: the image check alone (target: + 3 ms)", remote["check_cpu_ms"], "{:.1f} ms"),
        row("image API: latency p50 at concurrency 8", remote["p50_ms"], "{:.0f} ms"),
        row(
            f"image API: {HELD:,} held 5 s ({remote['held_image_bytes'] / 1024:.0f} KiB PNG): failed",
            HELD - remote["succeeded"],
            "{:.0f}",
            0,
        ),
        row("image API: 1,000 held: service CPU per generation", remote["held_cpu_ms"], "{:.1f} ms"),
        row("image API: 1,000 held: service RSS growth", remote["rss_growth_mb"], "{:.0f} MB", 100),
        row(
            "image API: 1,000 held: threads while waiting",
            remote["threads_while_waiting"],
            "{:.0f}",
            remote["threads_before"],
            "(as idle)",
        ),
        row("image API: 1,000 held: GET /health p99", remote["health_p99_ms"], "{:.0f} ms", 50),
        row("image API: 1,000 held: p99 while all wait", remote["health_p99_while_waiting_ms"], "{:.0f} ms"),
        row("image API: 1,000 held: slowest GET /health", remote["health_max_ms"], "{:.0f} ms"),
    ]


def health_rows(health: dict[str, float]) -> list[Row]:
    return [
        row("health: service CPU per GET /", health["service_cpu_us"], "{:.0f} us", 60),
        row("health: requests per second at concurrency 16", health["requests_per_second"], "{:.0f}"),
    ]


def print_table(rows: list[Row]) -> None:
    print(f"\n{'figure':<47} {'median':>10}  {'target':<26} met")
    for name, value, target, met in rows:
        print(f"{name:<47} {value:>10}  {target:<26} {'' if met is None else 'yes' if met else 'NO'}")


def measure(
    runs: int, upload_bytes: int, *, quick: bool, use_wrk: bool, phases: list[str]
) -> dict[str, list[dict[str, float]]]:
    generate_requests, health_requests, starts = (40, 1000, 3) if quick else (200, 5000, 7)
    measured: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="gen-bench-") as scratch:
        workdir = Path(scratch)
        with moto_server(workdir, upload_bytes) as moto_url:
            s3 = boto3.client("s3", endpoint_url=moto_url)
            s3.create_bucket(Bucket=BUCKET)
            # moto loads its code lazily and this process builds boto3's transfer machinery on first
            # use: neither should count against whichever side of the first upload run goes first.
            direct_upload(s3, make_file(workdir / "warm-up.bin", 16 * MiB))
            empty_bucket(s3)
            start = partial(service, moto_url, workdir, upload_bytes + MiB)
            if "startup" in phases:
                measured["startup"] = []
                for _ in range(starts):
                    with start() as running:
                        measured["startup"].append({"seconds": running.startup_seconds})
            small = make_file(workdir / "small.bin", MiB)
            if "upload" in phases:
                large = make_file(workdir / "large.bin", upload_bytes)
                measured["upload"] = []
                for run in range(runs):
                    with start() as running:  # a fresh process per run: see upload_run
                        measured["upload"].append(upload_run(running, s3, small, large, direct_first=run % 2 == 0))
                    print(f"upload run {run + 1}: {measured['upload'][-1]['ratio']:.2f}x", file=sys.stderr)
            if "full_house" in phases:
                part_file = make_file(workdir / "parts.bin", 24 * MiB if quick else 48 * MiB)
                measured["full_house"] = []
                for _ in range(runs):
                    with start() as running:
                        stalled = stalled_clients_rss_mb(running, 100, 100_000)
                    with start() as running:  # the most a connection holds without a slot
                        stalled_most = stalled_clients_rss_mb(running, 100, 250_000, field_bytes=64 * 1024 - 100)
                    with start() as running:
                        house = full_house_run(running, s3, small, part_file)
                        measured["full_house"].append(
                            {**house, "stalled_100_rss_mb": stalled, "stalled_100_most_rss_mb": stalled_most}
                        )
            if "generate" in phases or "health" in phases:
                with start() as running:
                    generate_run(running, 16, run=-1)  # warm-up: fonts, threads, connections
                    asyncio.run(health_load(running.port, 512, concurrency=16))
                    measured["generate"] = [generate_run(running, generate_requests, run) for run in range(runs)]
                    measured["health"] = [health_run(running, health_requests, use_wrk) for _ in range(runs)]
            if "remote" in phases:
                measured["remote"] = remote_runs(start, workdir, runs, generate_requests)
            empty_bucket(s3)
    return {phase: measured[phase] for phase in phases}


# The figure: as many generations held at once as the FastAPI service's 40 threads, 25 times over.
HELD = 1000
HELD_SECONDS = 5.0


def remote_runs(start: Callable[..., Any], workdir: Path, runs: int, requests: int) -> list[dict[str, float]]:
    """CPU per /generate against an image API answering at once with a 1 MiB PNG; then, on a fresh
    process each run, HELD generations held HELD_SECONDS by the API (with a small image: what is
    measured is the cost of waiting)."""
    image, small_image = noisy_png(960), noisy_png(64)
    with fake_image_api(workdir, image, delay=0) as api, start(**remote_settings(api)) as running:
        remote_cpu_run(running, image, 16, run=-1)  # warm-up
        cpu_runs = [remote_cpu_run(running, image, requests, run) for run in range(runs)]
    hold_runs = []
    for run in range(runs):
        with fake_image_api(workdir, small_image, delay=HELD_SECONDS) as slow_api:
            with start(**remote_settings(slow_api, GENERATE_CONCURRENCY=str(HELD))) as running:
                asyncio.run(generate_load(running.base_url, prompts(8, -1), concurrency=8))  # warm-up
                hold_runs.append(remote_hold_run(running, slow_api, HELD))
        print(f"remote run {run + 1}: {hold_runs[-1]['succeeded']:.0f} of {HELD} held", file=sys.stderr)
    sizes = {"held_image_bytes": len(small_image)}
    return [cpu | held | sizes for cpu, held in zip(cpu_runs, hold_runs, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported")
    parser.add_argument("--upload-mb", type=int, default=1024, help="size of the large upload in MiB")
    parser.add_argument("--quick", action="store_true", help="a smoke run of well under a minute")
    parser.add_argument("--no-wrk", action="store_true", help="measure health with the Python client")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=PHASES,
        help="measure only these phases; the others' figures in bench/results.json are kept as they were",
    )
    args = parser.parse_args()
    # A CI timeout sends SIGTERM: exit through the finally blocks, which stop moto and the service.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.runs, args.upload_mb = min(args.runs, 2), min(args.upload_mb, 64)
    use_wrk = shutil.which("wrk") is not None and not args.no_wrk
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(FAKE_AWS)
    load_before = os.getloadavg()
    phases = args.only or list(PHASES)
    runs = measure(args.runs, args.upload_mb * MiB, quick=args.quick, use_wrk=use_wrk, phases=phases)
    print_table(table_rows({phase: median_of(runs[phase]) for phase in phases}, args.upload_mb))
    machine = {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    this_run = {"settings": {**vars(args), "health_client": "wrk" if use_wrk else "python"}, "machine": machine}
    save_results(Path(__file__).parent / "results.json", runs, this_run, keep_others=args.only is not None)


PHASES = ("upload", "full_house", "generate", "health", "startup", "remote")


def save_results(
    path: Path, runs: dict[str, list[dict[str, float]]], this_run: dict[str, Any], keep_others: bool
) -> None:
    """Medians, the table and every run of each phase, with the settings and machine load it was measured
    with; with `keep_others`, the phases not measured now keep their earlier figures."""
    earlier = json.loads(path.read_text()) if keep_others and path.exists() else {}
    if "settings" in earlier:  # saved before each phase recorded its own
        earlier["measured_with"] = dict.fromkeys(
            earlier["runs"], {key: earlier[key] for key in ("settings", "machine")}
        )
    all_runs = {**earlier.get("runs", {}), **runs}
    medians = {phase: median_of(phase_runs) for phase, phase_runs in all_runs.items()}
    measured_with = {**earlier.get("measured_with", {}), **dict.fromkeys(runs, this_run)}
    upload_mb = measured_with.get("upload", this_run)["settings"]["upload_mb"]
    results = {
        "measured_with": measured_with,
        "medians": medians,
        "table": [
            dict(zip(("figure", "median", "target", "met"), table_row, strict=True))
            for table_row in table_rows(medians, upload_mb)
        ],
        "runs": all_runs,
    }
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
