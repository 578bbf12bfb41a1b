"""Clients that send slowly, stall or leave, against the real server on either store: they hold no
storing thread, an upload slot only while they send, and a body that stops arriving is cut."""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Server, keys_in, multipart_uploads, upload, wait_until
from raw_http import connect, form, form_head, form_tail, read_answer, request_head, upload_head

MiB = 1024 * 1024
BODY_TIMEOUT_SECONDS = 1.5


def answered_or_closed(connection: socket.socket) -> bool:
    """The server has written to the connection, or closed it (either makes it readable)."""
    return bool(select.select([connection], [], [], 0)[0])


@contextmanager
def stalled_uploads(server: Server, count: int, sent_bytes: int) -> Iterator[list[socket.socket]]:
    """`count` uploads of 20 MiB that send their head and `sent_bytes` of the file, then nothing."""
    with ExitStack() as connections:
        stalled = []
        for _ in range(count):
            connection = connections.enter_context(connect(server))
            connection.sendall(upload_head(len(form(b"")) + 20 * MiB) + form_head() + os.urandom(sent_bytes))
            stalled.append(connection)
        yield stalled


# ---------------------------------------------------------------- stalled clients starve nobody


class TestStalledClients:
    @pytest.fixture
    def server_env(self) -> dict[str, str]:
        """Stalled clients are never cut while a test runs: what it shows is not the body timeouts' doing."""
        return {"CLIENT_BODY_TIMEOUT_SECONDS": "300", "CLIENT_BODY_MIN_RATE_BYTES": "0"}

    @pytest.mark.parametrize(
        ("count", "sent_bytes"),
        [(100, 100_000), (40, MiB)],
        ids=["100-stalled-after-100KB", "40-stalled-after-1MiB"],
    )
    def test_a_new_upload_generate_and_health_pass_stalled_clients(
        self, server: Server, http: httpx.Client, count: int, sent_bytes: int
    ) -> None:
        upload(http, server, b"warm: the threads a well-behaved upload uses exist before counting")
        threads_before = server.threads()
        content = os.urandom(6 * MiB)  # in parts on S3, which needs a storing thread per part

        with stalled_uploads(server, count, sent_bytes) as stalled:
            answer = upload(http, server, content)
            generated = http.post(f"{server.base_url}/generate", json={"prompt": "a fox"})
            health = http.get(f"{server.base_url}/health")
            threads_during = server.threads()
            still_waiting = [not answered_or_closed(connection) for connection in stalled]

        assert http.get(answer["url"]).content == content
        assert generated.status_code == 200, generated.text
        assert health.status_code == 200
        # None of them was cut or answered: the upload went past them, not after them.
        assert all(still_waiting)
        # Stalled clients hold no thread (today's service held one per upload, up to 32).
        assert threads_during - threads_before < 8


# ---------------------------------------------------------------- the body timeout


def sends_nothing(connection: socket.socket) -> str:
    """Sends the head of an upload, then nothing of its body."""
    connection.sendall(upload_head(len(form(os.urandom(MiB)))))
    return "/upload"


def stops_early(connection: socket.socket) -> str:
    """Sends 100 KB of a 1 MiB upload, then nothing."""
    body = form(os.urandom(MiB))
    connection.sendall(upload_head(len(body)) + body[:100_000])
    return "/upload"


def stops_mid_part(connection: socket.socket) -> str:
    """Sends 7 MiB of a 10 MiB upload, then nothing: S3 has a multipart upload in progress."""
    body = form(os.urandom(10 * MiB))
    connection.sendall(upload_head(len(body)) + body[: 7 * MiB])
    return "/upload"


def stops_mid_json(connection: socket.socket) -> str:
    """Sends part of a JSON body, then nothing."""
    connection.sendall(request_head("/generate", {"Content-Type": "application/json", "Content-Length": "200"}))
    connection.sendall(b'{"prompt": "a fox in')
    return "/generate"


class TestBodyTimeout:
    @pytest.fixture
    def server_env(self) -> dict[str, str]:
        return {"CLIENT_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_SECONDS)}

    @pytest.mark.parametrize("stall", [sends_nothing, stops_early, stops_mid_part, stops_mid_json])
    def test_a_body_that_stops_arriving_is_408_and_leaves_nothing(
        self,
        server: Server,
        http: httpx.Client,
        assert_nothing_left: Callable[[], None],
        stall: Callable[[socket.socket], str],
    ) -> None:
        with connect(server) as connection:
            stall(connection)
            status_line, body = read_answer(connection)
            closed = connection.recv(1) == b""

        assert status_line == "HTTP/1.1 408 Request Timeout"
        assert json.loads(body) == {"detail": "request body timed out"}
        assert closed
        assert_nothing_left()
        assert upload(http, server, b"the next one")["url"]

    def test_a_slow_client_that_keeps_sending_is_not_cut(self, server: Server, http: httpx.Client) -> None:
        content = os.urandom(600_000)
        body = form(content)
        pieces = [body[start : start + 50_000] for start in range(0, len(body), 50_000)]
        with connect(server) as connection:
            connection.sendall(upload_head(len(body)))
            for piece in pieces:  # 13 pieces a sixth of the timeout apart: twice the timeout in all
                time.sleep(BODY_TIMEOUT_SECONDS / 6)
                connection.sendall(piece)
            status_line, answer = read_answer(connection)

        assert status_line == "HTTP/1.1 200 OK", answer
        assert http.get(json.loads(answer)["url"]).content == content


# ---------------------------------------------------------------- the minimum data rate


TRICKLE_GAP_SECONDS = 3
TRICKLE_FOR_SECONDS = 90


def trickle(server: Server, ended: dict[str, Any]) -> None:
    """An upload of 2 MiB that sends 900 KiB at once, then one byte every TRICKLE_GAP_SECONDS (each of which
    would restart a timeout that waits for the next byte), until it is answered or TRICKLE_FOR_SECONDS pass."""
    body = form(os.urandom(2 * MiB))
    with connect(server) as connection:
        connection.sendall(upload_head(len(body)) + body[: 900 * 1024])
        deadline, sent = time.monotonic() + TRICKLE_FOR_SECONDS, 900 * 1024
        while time.monotonic() < deadline and not answered_or_closed(connection):
            time.sleep(TRICKLE_GAP_SECONDS)
            with suppress(OSError):  # the server may close as this byte goes
                connection.sendall(body[sent : sent + 1])
            sent += 1
        connection.settimeout(TRICKLE_GAP_SECONDS)
        ended["status_line"], ended["body"] = read_answer(connection) if answered_or_closed(connection) else ("", b"")


class TestMinimumRate:
    @pytest.fixture
    def server_env(self) -> dict[str, str]:
        """Two upload slots, and a timeout for a silent body far off: only the minimum rate (240 bytes a
        second, the default) can cut the tricklers."""
        return {"MAX_CONCURRENT_UPLOADS": "2", "CLIENT_BODY_TIMEOUT_SECONDS": "300"}

    def test_trickling_uploads_are_cut_and_a_normal_one_beside_them_completes(
        self, server: Server, http: httpx.Client, s3: Any, bucket: str, data_dir: Path
    ) -> None:
        ends: list[dict[str, Any]] = [{} for _ in range(3)]
        tricklers = [threading.Thread(target=trickle, args=(server, ended)) for ended in ends]
        for trickler in tricklers:
            trickler.start()
        wait_until(lambda: files_being_stored(s3, bucket, data_dir) == 2)  # both slots held
        content = os.urandom(MiB)  # over what an upload may gather without a slot
        answer = upload(http, server, content)
        for trickler in tricklers:
            trickler.join()

        assert http.get(answer["url"]).content == content
        detail = {"detail": "request body arrived slower than 240 bytes per second"}
        assert [(ended["status_line"], json.loads(ended["body"])) for ended in ends] == [
            ("HTTP/1.1 408 Request Timeout", detail)
        ] * 3
        # Nothing of the tricklers is kept: the one file stored is the normal upload.
        wait_until(lambda: files_being_stored(s3, bucket, data_dir) == 0)
        assert files_being_stored(s3, bucket, data_dir) == 0
        local = [f"uploads/{path.name}" for path in data_dir.glob("uploads/*") if path.suffix != ".json"]
        assert keys_in(s3, bucket, "uploads/") + local == [answer["key"]]


# ---------------------------------------------------------------- the upload slot limit


TRICKLE_SECONDS = 3


@contextmanager
def slots_held(server: Server, s3: Any, bucket: str, data_dir: Path, count: int) -> Iterator[list[dict[str, Any]]]:
    """`count` uploads of 6 MiB that send 5.5 MiB at once, so that storing begins on either store, then
    the rest in small pieces over TRICKLE_SECONDS, never quiet long enough to give their slot back.
    Yields a dict per upload that gets `sent_all_at` once its last byte is sent, then its answer."""
    ends: list[dict[str, Any]] = [{} for _ in range(count)]

    def send(ended: dict[str, Any]) -> None:
        body = form(os.urandom(6 * MiB))
        with connect(server) as connection:
            connection.sendall(upload_head(len(body)) + body[: 11 * MiB // 2])
            pieces = [body[start : start + 16 * 1024] for start in range(11 * MiB // 2, len(body), 16 * 1024)]
            for piece in pieces:
                time.sleep(TRICKLE_SECONDS / len(pieces))
                connection.sendall(piece)
            ended["sent_all_at"] = time.monotonic()
            ended["status_line"], ended["body"] = read_answer(connection)

    senders = [threading.Thread(target=send, args=(ended,)) for ended in ends]
    for sender in senders:
        sender.start()
    try:
        wait_until(lambda: files_being_stored(s3, bucket, data_dir) == count)
        assert files_being_stored(s3, bucket, data_dir) == count
        yield ends
    finally:
        for sender in senders:
            sender.join()
    assert [ended["status_line"] for ended in ends] == ["HTTP/1.1 200 OK"] * count


def files_being_stored(s3: Any, bucket: str, data_dir: Path) -> int:
    """Unfinished files with a part in the store: S3 multipart uploads, or local partial files."""
    return len(multipart_uploads(s3, bucket)) + len(list(data_dir.glob("uploads/.partial-*")))


class TestUploadSlots:
    @pytest.fixture
    def server_env(self) -> dict[str, str]:
        return {"MAX_CONCURRENT_UPLOADS": "1", "CLIENT_BODY_TIMEOUT_SECONDS": "300"}

    def test_an_upload_beyond_the_limit_waits_for_a_slot(
        self, server: Server, http: httpx.Client, s3: Any, bucket: str, data_dir: Path
    ) -> None:
        second = os.urandom(MiB)
        with slots_held(server, s3, bucket, data_dir, count=1) as [holder]:
            answer = upload(http, server, second)
            second_answered_at = time.monotonic()

        # Sent whole while the first was still arriving, yet answered after the first had all arrived.
        assert second_answered_at > holder["sent_all_at"]
        assert http.get(answer["url"]).content == second


class TestAllSlotsTaken:
    @pytest.fixture
    def server_env(self) -> dict[str, str]:
        """The default limit of 32 uploads."""
        return {"CLIENT_BODY_TIMEOUT_SECONDS": "300"}

    def test_a_request_failing_before_it_needs_a_slot_answers_while_every_slot_is_taken(
        self, server: Server, s3: Any, bucket: str, data_dir: Path
    ) -> None:
        # Its file part starts, then a second file part breaks the form (it may hold one file).
        body = form_head("first.bin") + b"x" * 100 + b"\r\n" + form_head("second.bin") + b"y" * 100 + form_tail()
        with slots_held(server, s3, bucket, data_dir, count=32) as holders, connect(server) as connection:
            connection.sendall(upload_head(len(body)) + body)
            status_line, answer = read_answer(connection)
            still_sending = not any("sent_all_at" in holder for holder in holders)

        assert (status_line, json.loads(answer)) == (
            "HTTP/1.1 400 Bad Request",
            {"detail": "Too many files. Maximum number of files is 1."},
        )
        assert still_sending  # it was answered while every slot was held
