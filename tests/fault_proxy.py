"""A TCP proxy on loopback in front of an S3 endpoint, switched per test between passing traffic and faults:
`proxy.mode = Fail(503, "SlowDown")`, and the client pointed at `proxy.url` is throttled once.

A mode applies to each new connection; one with `only` set applies to those whose first request line matches it
(a regular expression; moto closes every connection after one answer, so that is every such request).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from xml.sax.saxutils import escape

CHUNK = 64 * 1024


@dataclass(frozen=True)
class PassThrough:
    """Forward everything both ways."""


@dataclass(frozen=True)
class Refuse:
    """Nothing listens: connecting fails with "connection refused"."""


@dataclass(frozen=True)
class Stall:
    """Forward the first `after_bytes` the client sends, then read and drop the rest, answering nothing."""

    after_bytes: int = 0
    seconds: float = 10


@dataclass(frozen=True)
class Cut:
    """Forward the first `after_bytes` the client sends, then close the connection."""

    after_bytes: int


@dataclass(frozen=True)
class Hold:
    """Forward both ways, but pass upstream's answer on only `seconds` after it comes."""

    seconds: float
    only: str | None = None


@dataclass(frozen=True)
class Lose:
    """Forward the request, then close the connection without passing upstream's answer on."""

    only: str | None = None


@dataclass(frozen=True)
class Fail:
    """Answer the next `times` connections with an S3 error document, then switch to `then`. With `forward`, the
    request reaches upstream first and its answer is dropped: the work is done, the client hears of a failure."""

    status: int
    code: str
    times: int = 1
    message: str = "injected fault"
    only: str | None = None
    forward: bool = False
    then: Mode = PassThrough()


Mode = PassThrough | Refuse | Stall | Cut | Hold | Lose | Fail


class FaultProxy:
    """Byte counts are per connection, request heads included. Setting `mode` closes every open connection, so
    each mode starts on fresh ones; after a closed connection, boto3 opens a new one for its next attempt."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.faults_injected = 0
        self._mode: Mode = PassThrough()
        self._uses = 0  # of the current mode, by connections it applied to
        self._lock = threading.RLock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        # Keeps the port ours while nothing listens on it, so that Refuse is refused and no other process takes it.
        self._placeholder = port_sharing_socket(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._placeholder.getsockname()
        self._listener: socket.socket | None = None
        self.mode = PassThrough()

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    @property
    def mode(self) -> Mode:
        with self._lock:
            return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        with self._lock:
            self._mode = mode
            self._uses = 0
            self.faults_injected = 0
            for sock in self._sockets:
                close(sock)
            if isinstance(mode, Refuse) and self._listener is not None:
                close(self._listener)
                self._listener = None
            elif not isinstance(mode, Refuse) and self._listener is None:
                self._listener = port_sharing_socket(self.address)
                self._listener.listen()
                self._start(self._accept, self._listener)

    def close(self) -> None:
        self.mode = Refuse()
        close(self._placeholder)
        for thread in self._threads:
            thread.join(timeout=5)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [*filter(threading.Thread.is_alive, self._threads), thread]
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client = listener.accept()[0]
            except OSError:  # the listener was closed
                return
            with self._lock:
                self._sockets.add(client)
            self._start(self._serve, client)

    def _next_mode(self, request_line: str) -> Mode:
        mode = self._mode
        only = getattr(mode, "only", None)
        if only is not None and not re.search(only, request_line):
            return PassThrough()
        if isinstance(mode, Hold | Lose | Fail):
            self.faults_injected += 1
        if isinstance(mode, Fail):
            self._uses += 1
            if self._uses == mode.times:
                self._mode, self._uses = mode.then, 0
        return mode

    def _serve(self, client: socket.socket) -> None:
        try:
            request_line = peek_request_line(client)
            with self._lock:
                mode = self._next_mode(request_line)
            if isinstance(mode, Fail) and not mode.forward:
                answer_error(client, mode)
            else:
                self._forward(client, mode)
        except OSError:  # the client left, or a mode switch closed the connection
            pass
        finally:
            self._forget(client)

    def _forward(self, client: socket.socket, mode: Mode) -> None:
        upstream = socket.create_connection(self.upstream, timeout=5)
        upstream.settimeout(None)
        with self._lock:
            self._sockets.add(upstream)
        faulted = threading.Event()
        self._start(pump_answers, upstream, client, faulted, mode)
        try:
            if copy_until(client, upstream, mode.after_bytes if isinstance(mode, Stall | Cut) else None):
                faulted.set()  # from here on, the client hears nothing more from upstream
        finally:
            self._forget(upstream)
        if faulted.is_set():
            with self._lock:
                self.faults_injected += 1
            if isinstance(mode, Stall):
                swallow(client, mode.seconds)

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        close(sock)


def copy_until(client: socket.socket, upstream: socket.socket, limit: int | None) -> bool:
    """Copy what the client sends upstream until it stops (False) or `limit` bytes have passed (True)."""
    forwarded = 0
    while data := client.recv(CHUNK):
        if limit is not None and forwarded + len(data) >= limit:
            upstream.sendall(data[: limit - forwarded])
            return True
        upstream.sendall(data)
        forwarded += len(data)
    return False


def pump_answers(upstream: socket.socket, client: socket.socket, faulted: threading.Event, mode: Mode) -> None:
    try:
        if isinstance(mode, Lose | Fail):  # forwarded: upstream does the work, the client hears of no success
            while upstream.recv(CHUNK):
                pass
            if isinstance(mode, Fail):
                send_error(client, mode)
            client.shutdown(socket.SHUT_RDWR)
            return
        if isinstance(mode, Hold) and (data := upstream.recv(CHUNK)):
            time.sleep(mode.seconds)
            client.sendall(data)
        while data := upstream.recv(CHUNK):
            client.sendall(data)
        if not faulted.is_set():
            client.shutdown(socket.SHUT_WR)
    except OSError:  # either side closed
        pass


def peek_request_line(client: socket.socket) -> str:
    """The first line of the first request on `client`, left unread for whoever forwards or answers it."""
    client.settimeout(5)
    while b"\r\n" not in (head := client.recv(CHUNK, socket.MSG_PEEK)):
        if not head:
            break
        time.sleep(0.001)  # part of the line has come: peeking again at once would only spin
    client.settimeout(None)
    return head.partition(b"\r\n")[0].decode("latin-1")


def answer_error(client: socket.socket, fail: Fail) -> None:
    """Answer the request on `client` with `fail`'s S3 error document, and close."""
    client.settimeout(5)
    head = b""
    while b"\r\n\r\n" not in head and (data := client.recv(CHUNK)):
        head += data
    send_error(client, fail)
    # A body sent without waiting for `100 Continue` must still be read: closing on unread bytes resets the
    # connection, and the client may then lose the answer.
    swallow(client, 5)


def send_error(client: socket.socket, fail: Fail) -> None:
    """`fail`'s S3 error document as the whole answer: the connection is closed after it."""
    body = (
        "<?xml version='1.0' encoding='UTF-8'?>\n"
        f"<Error><Code>{fail.code}</Code><Message>{escape(fail.message)}</Message></Error>"
    ).encode()
    client.sendall(
        f"HTTP/1.1 {fail.status} {fail.code}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )
    client.shutdown(socket.SHUT_WR)


def swallow(client: socket.socket, seconds: float) -> None:
    """Read and drop what the client sends, until it closes or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        client.settimeout(left)
        try:
            if not client.recv(CHUNK):
                return
        except TimeoutError:
            return


def port_sharing_socket(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def close(sock: socket.socket) -> None:
    """Close `sock`, waking any thread blocked on it (on Linux, close alone does not)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected, or already shut
        pass
    sock.close()
