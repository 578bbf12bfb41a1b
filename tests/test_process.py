"""The process as ECS runs it: JSON logs on stdout, SIGTERM with work in flight, several workers."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from conftest import Server, StartServer, stored_before_types_were_checked, upload, wait_until
from raw_http import connect, read_answer
from storage import LocalStorage


def lines_of(server: Server) -> list[str]:
    return [line for line in server.log().splitlines() if line.strip()]


def json_lines(server: Server) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines_of(server)]  # fails on any line that is not JSON


def access_entries(server: Server) -> list[dict[str, Any]]:
    return [entry for entry in json_lines(server) if entry["logger"] == "gen_service.access"]


def wait_for_log(server: Server, shows: Callable[[str], bool]) -> str:
    """The server's log, once it `shows` what the test waits for (a line is written once its response is sent)."""
    wait_until(lambda: shows(server.log()))
    log = server.log()
    assert shows(log), log
    return log


def partial_files(data_dir: Path) -> list[Path]:
    """The local store's files still being written."""
    return list((data_dir / "uploads").glob(".partial-*"))


def wait_for_access(server: Server, count: int) -> list[dict[str, Any]]:
    """The access lines of a server logging JSON, once there are at least `count` of them."""
    wait_for_log(server, lambda _: len(access_entries(server)) >= count)
    return access_entries(server)


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


FORGED = "2026-12-02 00:00:00,000 INFO gen_service.access [admin] POST /upload 200 FORGED"
TEXT_ACCESS_LINE = r"[-0-9]+ [:,0-9]+ INFO gen_service\.access \[[0-9a-f]{32}\] "
# Percent-encoded, uvicorn decodes them into the path; as a header's obs-text, Starlette reads NEL as is.
BREAKS = ["%0A", "%0D", "%0B", "%0C", "%1B[2K", "%C2%85", "%E2%80%A8", "%E2%80%A9"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_callers_value_can_forge_a_log_line(start_server: StartServer, data_dir: Path, log_format: str) -> None:
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "LOG_FORMAT": log_format})
    path = "/x" + "".join(f"{line_break}{quote(FORGED)}" for line_break in BREAKS)
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Amzn-Trace-Id: Root=1\x85{FORGED}\r\n\r\n"
    with connect(server) as connection:
        connection.sendall(head.encode("latin-1"))
        assert read_answer(connection)[0].startswith("HTTP/1.1 404")

    log = wait_for_log(server, lambda log: "FORGED" in log)
    [line] = [line for line in log.splitlines() if "FORGED" in line]  # every line break a viewer may honour
    assert line.isprintable()
    if log_format == "json":
        entry = json.loads(line)
        assert all(str(value).isprintable() for value in entry.values())
        assert entry["path"].startswith("/x\\n2026-12-02 00:00:00,000 INFO") and entry["method"] == "GET"
        assert entry["trace_id"] == "Root=1\\x85" + FORGED
    else:
        assert re.match(TEXT_ACCESS_LINE + re.escape("GET /x\\n" + FORGED), line)


def test_log_level_hides_access_lines(start_server: StartServer, http: httpx.Client, data_dir: Path) -> None:
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "LOG_LEVEL": "WARNING"})
    upload(http, server, b"quiet")
    assert "POST /upload" not in server.log()


def test_sigterm_lets_an_upload_in_flight_finish(start_server: StartServer, data_dir: Path) -> None:
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "SHUTDOWN_GRACE_SECONDS": "10"})
    data = os.urandom(3_000_000)  # half of it is more than the local store's first part (1 MiB)
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="slow.bin"\r\n\r\n'
    body = head + data + b"\r\n--b--\r\n"
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        wait_until(lambda: bool(partial_files(data_dir)))
        assert partial_files(data_dir), "the upload never reached the store"
        server.process.send_signal(signal.SIGTERM)
        wait_for_log(server, lambda log: "Shutting down" in log)  # while half the body is still to come
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


@contextmanager
def only_accepting(worker: int, workers: set[int]) -> Iterator[None]:
    """The other workers stopped (SIGSTOP), so that `worker` alone accepts new connections meanwhile."""
    others = workers - {worker}
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def test_workers_share_the_local_store(start_server: StartServer, data_dir: Path) -> None:
    server = start_server({"LOCAL_STORAGE_DIR": str(data_dir), "WORKERS": "2", "LOG_FORMAT": "json"})
    wait_for_log(server, lambda log: log.count("Application startup complete") == 2)
    workers = {entry["pid"] for entry in json_lines(server) if entry["message"] == "Application startup complete."}
    assert len(workers) == 2 and workers <= set(worker_pids(server))

    # Each worker makes a link that the other opens, on connections of their own.
    for maker, opener in itertools.permutations(workers):
        content = f"made by {maker}".encode()
        with only_accepting(maker, workers), httpx.Client(trust_env=False, timeout=10) as fresh:
            made = fresh.post(
                f"{server.base_url}/upload", files={"file": ("a.txt", content)}, headers={"X-Request-ID": f"up-{maker}"}
            )
        assert made.status_code == 200, made.text
        with only_accepting(opener, workers), httpx.Client(trust_env=False, timeout=10) as fresh:
            opened = fresh.get(made.json()["url"], headers={"X-Request-ID": f"down-{opener}"})
        assert (opened.status_code, opened.content) == (200, content)

    served_by = {entry["request_id"]: entry["pid"] for entry in wait_for_access(server, 4)}
    assert served_by == {f"{step}-{pid}": pid for step in ("up", "down") for pid in workers}


@pytest.mark.parametrize("value", ["0", "many"])
def test_bad_worker_count_stops_the_process(start_server: StartServer, value: str) -> None:
    with pytest.raises(pytest.fail.Exception, match="WORKERS"):
        start_server({"WORKERS": value})
