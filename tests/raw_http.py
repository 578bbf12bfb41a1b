"""Requests written byte by byte on a raw socket, for clients that misbehave in ways httpx cannot."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from conftest import Server

BOUNDARY = "raw-boundary"
FORM_HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
SOCKET_TIMEOUT = 10
CHUNK = 64 * 1024


def form(data: bytes) -> bytes:
    """A multipart body with `data` as the file part."""
    return form_head() + data + form_tail()


def form_head(filename: str = "big.bin") -> bytes:
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\n'.encode()


def form_tail() -> bytes:
    return f"\r\n--{BOUNDARY}--\r\n".encode()


def request_head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upload_head(body_bytes: int) -> bytes:
    """The head of a POST /upload whose form is `body_bytes` long."""
    return request_head("/upload", {**FORM_HEADERS, "Content-Length": str(body_bytes)})


def read_answer(connection: socket.socket) -> tuple[str, bytes]:
    """The first status line the server sends, and the body after it (by its Content-Length)."""
    raw = b""
    while b"\r\n\r\n" not in raw and (data := connection.recv(CHUNK)):
        raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length and (data := connection.recv(CHUNK)):
        body += data
    return status_line, body


def connect(server: Server) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", urlsplit(server.base_url).port or 80), SOCKET_TIMEOUT)
    connection.settimeout(SOCKET_TIMEOUT)
    return connection
