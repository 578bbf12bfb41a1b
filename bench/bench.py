"""Benchmark of the service against its limits: direct S3 for uploads, render.py alone for /generate.

Starts a moto S3 server and the real service (`python gen_service.py`) on loopback, prints one table
(each figure the median of --runs runs, ratios taken within one run) and saves bench/results.json.

    python bench/bench.py [--runs N] [--upload-mb N] [--quick] [--no-wrk]

CPU figures come from /proc/<pid>/stat of the service, not wall time: moto and this client share
the machine's two cores with it. Wall times and requests per second are noisy for the same reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple
from uuid import uuid4

import boto3
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
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
def service(moto_url: str, workdir: Path, max_upload_bytes: int) -> Iterator[Running]:
    """`python gen_service.py` on a free port, storing in moto, with a TMPDIR of its own."""
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


def stalled_clients_rss_mb(running: Running, count: int, sent_bytes: int) -> float:
    """What `count` uploads that send their head and `sent_bytes` of the file, then stop, add to RSS."""
    before = current_rss_mb(running.pid)
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="stalled.bin"\r\n\r\n' + os.urandom(
        sent_bytes
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


def generate_run(running: Running, count: int, run: int) -> dict[str, float]:
    prompt_list = prompts(count, run)
    cpu_before = cpu_seconds(running.pid)
    latencies, probes = asyncio.run(generate_load(running.base_url, prompt_list, concurrency=8))
    service_cpu = cpu_seconds(running.pid) - cpu_before
    render_before = time.process_time()
    for prompt in prompt_list:
        render_png(prompt)
    render_cpu = time.process_time() - render_before
    return {
        "service_cpu_ms": 1000 * service_cpu / count,
        "render_cpu_ms": 1000 * render_cpu / count,
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


# ---------------------------------------------------------------- report


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


Row = tuple[str, str, str, "bool | None"]


def row(name: str, value: float, shown: str, limit: float | None = None, note: str = "") -> Row:
    """A table row; `met` is None where the issue sets no target."""
    target = note if limit is None else f"<= {shown.format(limit)} {note}".rstrip()
    return name, shown.format(value), target, None if limit is None else value <= limit


def table_rows(figures: dict[str, dict[str, float]], upload_mb: int) -> list[Row]:
    up, gen, health, house = figures["upload"], figures["generate"], figures["health"], figures["full_house"]
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
        row(f"uploads: peak RSS, {FULL_HOUSE + 8} at once over 1 MiB", house["peak_rss_growth_mb"], "{:.0f} MB"),
        row(f"uploads: the same per slot ({FULL_HOUSE} slots)", house["per_upload_mb"], "{:.1f} MB"),
        row("uploads: 100 stalled after 100 KB, RSS", house["stalled_100_rss_mb"], "{:.0f} MB"),
        row("generate: service CPU per request", gen["service_cpu_ms"], "{:.1f} ms", gen["render_cpu_ms"] + 2),
        row("generate: render_png alone (target: + 2 ms)", gen["render_cpu_ms"], "{:.1f} ms"),
        row("generate: latency p50 at concurrency 8", gen["p50_ms"], "{:.0f} ms"),
        row("generate: latency p99 at concurrency 8", gen["p99_ms"], "{:.0f} ms"),
        row("generate: GET / latency p99 meanwhile", gen["health_p99_during_generate_ms"], "{:.0f} ms"),
        row("health: service CPU per GET /", health["service_cpu_us"], "{:.0f} us", 60),
        row("health: requests per second at concurrency 16", health["requests_per_second"], "{:.0f}"),
        row("startup: process start to first 200", figures["startup"]["seconds"], "{:.2f} s", 1.0),
    ]


def print_table(rows: list[Row]) -> None:
    print(f"\n{'figure':<47} {'median':>10}  {'target':<26} met")
    for name, value, target, met in rows:
        print(f"{name:<47} {value:>10}  {target:<26} {'' if met is None else 'yes' if met else 'NO'}")


def measure(runs: int, upload_bytes: int, *, quick: bool, use_wrk: bool) -> dict[str, list[dict[str, float]]]:
    generate_requests, health_requests, starts = (40, 1000, 3) if quick else (200, 5000, 7)
    with tempfile.TemporaryDirectory(prefix="gen-bench-") as scratch:
        workdir = Path(scratch)
        small, large = make_file(workdir / "small.bin", MiB), make_file(workdir / "large.bin", upload_bytes)
        with moto_server(workdir, upload_bytes) as moto_url:
            s3 = boto3.client("s3", endpoint_url=moto_url)
            s3.create_bucket(Bucket=BUCKET)
            # moto loads its code lazily and this process builds boto3's transfer machinery on first
            # use: neither should count against whichever side of the first upload run goes first.
            direct_upload(s3, make_file(workdir / "warm-up.bin", 16 * MiB))
            empty_bucket(s3)
            start = partial(service, moto_url, workdir, upload_bytes + MiB)
            startups = []
            for _ in range(starts):
                with start() as running:
                    startups.append({"seconds": running.startup_seconds})
            uploads = []
            for run in range(runs):
                with start() as running:  # a fresh process per run: see upload_run
                    uploads.append(upload_run(running, s3, small, large, direct_first=run % 2 == 0))
                print(f"upload run {run + 1}: {uploads[-1]['ratio']:.2f}x", file=sys.stderr)
            part_file = make_file(workdir / "parts.bin", 24 * MiB if quick else 48 * MiB)
            houses = []
            for _ in range(runs):
                with start() as running:
                    stalled = stalled_clients_rss_mb(running, 100, 100_000)
                with start() as running:
                    houses.append({**full_house_run(running, s3, small, part_file), "stalled_100_rss_mb": stalled})
            with start() as running:
                generate_run(running, 16, run=-1)  # warm-up: fonts, threads, connections
                asyncio.run(health_load(running.port, 512, concurrency=16))
                generates = [generate_run(running, generate_requests, run) for run in range(runs)]
                healths = [health_run(running, health_requests, use_wrk) for _ in range(runs)]
            empty_bucket(s3)
    return {
        "upload": uploads,
        "full_house": houses,
        "generate": generates,
        "health": healths,
        "startup": startups,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported")
    parser.add_argument("--upload-mb", type=int, default=1024, help="size of the large upload in MiB")
    parser.add_argument("--quick", action="store_true", help="a smoke run of well under a minute")
    parser.add_argument("--no-wrk", action="store_true", help="measure health with the Python client")
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
    runs = measure(args.runs, args.upload_mb * MiB, quick=args.quick, use_wrk=use_wrk)
    figures = {phase: median_of(phase_runs) for phase, phase_runs in runs.items()}
    rows = table_rows(figures, args.upload_mb)
    print_table(rows)
    health_client = "wrk" if use_wrk else "python"
    results = {
        "settings": {**vars(args), "health_client": health_client},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "medians": figures,
        "table": [dict(zip(("figure", "median", "target", "met"), table_row, strict=True)) for table_row in rows],
        "runs": runs,
    }
    (Path(__file__).parent / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
