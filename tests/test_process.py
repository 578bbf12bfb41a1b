"""The process as ECS runs it: JSON logs on stdout, SIGTERM with work in flight, several workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Server, StartServer, stored_before_types_were_checked, upload
from storage import LocalStorage

# Access lines are written once their response is sent: a test waits for them, up to this long.
LOG_WAIT_SECONDS = 10


def lines_of(server: Server) -> list[str]:
    return [line for line in server.log().splitlines() if line.strip()]


def json_lines(server: Server) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines_of(server)]  # fails on any line that is not JSON


def access_entries(server: Server) -> list[dict[str, Any]]:
    return [entry for entry in json_lines(server) if entry["logger"] == "gen_service.access"]


def wait_for_access(server: Server, count: int) -> list[dict[str, Any]]:
    """The access lines of a server logging JSON, once there are at least `count` of them."""
    deadline = time.monotonic() + LOG_WAIT_SECONDS
    while len(entries := access_entries(server)) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {count} access lines after {LOG_WAIT_SECONDS} s:\n{server.log()}")
        time.sleep(0.05)
    return entries


def test_json_logs_are_one_object_per_line(start_server: StartServer, http: httpx.Client, data_dir: Path) -> None:
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "LOG_FORMAT": "json"})
    url = upload(http, server, b"logged")["url"]
    http.get(url, headers={"X-Request-ID": "ws-7", "X-Amzn-Trace-Id": "Root=1-abc"})
    http.get(f"{server.base_url}/nowhere")

    access = wait_for_access(server, 3)
    entries = json_lines(server)
    assert all({"time", "level", "logger", "message", "request_id"} <= entry.keys() for entry in entries)
    assert any(entry["logger"] == "uvicorn.error" and "Started server process" in entry["message"] for entry in entries)
    download = next(entry for entry in access if entry["request_id"] == "ws-7")
    assert download["method"] == "GET" and download["status"] == 200 and download["bytes"] == len(b"logged")
    assert download["trace_id"] == "Root=1-abc" and download["duration_ms"] >= 0
    # upload, download, 404 (each line is written once its response is sent, so the order may vary)
    assert sorted(entry["status"] for entry in access) == [200, 200, 404]
    assert "signature=" not in server.log()


def test_an_answer_the_server_refuses_is_not_logged_as_sent(
    start_server: StartServer, http: httpx.Client, data_dir: Path
) -> None:
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "LOG_FORMAT": "json"})
    url = stored_before_types_were_checked(LocalStorage(data_dir, server.base_url, 60))

    with pytest.raises(httpx.RemoteProtocolError):  # uvicorn refuses the header, and then any answer
        http.get(url, headers={"X-Request-ID": "refused-1"})

    [entry] = wait_for_access(server, 1)
    assert (entry["request_id"], entry["status"], entry["bytes"]) == ("refused-1", 0, 0)
    [traceback] = [entry["exception"] for entry in json_lines(server) if "exception" in entry]
    assert "Invalid HTTP header value" in traceback and "Expected ASGI message" not in traceback


def test_log_level_hides_access_lines(start_server: StartServer, http: httpx.Client, data_dir: Path) -> None:
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "LOG_LEVEL": "WARNING"})
    upload(http, server, b"quiet")
    assert "POST /upload" not in server.log()


def test_sigterm_lets_an_upload_in_flight_finish(start_server: StartServer, data_dir: Path) -> None:
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "SHUTDOWN_GRACE_SECONDS": "10"})
    data = os.urandom(2_000_000)
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="slow.bin"\r\n\r\n'
    body = head + data + b"\r\n--b--\r\n"
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the service is shutting down while half the body is still to come
        connection.sendall(body[len(body) // 2 :])
        response = connection.makefile("rb").read()

    head_lines, _, payload = response.partition(b"\r\n\r\n")
    assert head_lines.startswith(b"HTTP/1.1 200"), response[:300]
    key = json.loads(payload)["key"]
    assert (data_dir / key).read_bytes() == data
    # uvicorn re-raises the SIGTERM once it has shut down, so a supervisor sees why it ended.
    assert server.process.wait(timeout=10) in (0, -signal.SIGTERM)
    assert "Finished server process" in server.log()


def worker_pids(server: Server) -> list[int]:
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_workers_share_the_local_store(start_server: StartServer, http: httpx.Client, data_dir: Path) -> None:
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "WORKERS": "2"})
    deadline = time.monotonic() + 15
    while len(worker_pids(server)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    # uvicorn's supervisor plus its resource tracker and two workers: at least the two workers.
    assert len(worker_pids(server)) >= 2

    for n in range(10):
        content = f"file {n}".encode()
        # New connections each time, so links made by one worker are opened by either.
        with httpx.Client(trust_env=False) as fresh:
            url = upload(fresh, server, content)["url"]
        with httpx.Client(trust_env=False) as fresh:
            assert fresh.get(url).content == content


@pytest.mark.parametrize("value", ["0", "many"])
def test_bad_worker_count_stops_the_process(start_server: StartServer, value: str) -> None:
    with pytest.raises(pytest.fail.Exception, match="WORKERS"):
        start_server({"WORKERS": value})
