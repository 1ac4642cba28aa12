"""A lean HTTP/1.1 client for the proxy's hot path: kept-alive sockets per server, bodies streamed.

urllib3 and http.client spent about a third of the gateway's CPU per proxied request (parsing
headers with the email package, per-call URL parsing, pool bookkeeping; see docs/benchmarks.md). The
proxy needs far less: send one request on a pooled socket, parse a status line and headers,
and hand the body on chunk by chunk with its framing (Content-Length, chunked, or to the close).
"""

from __future__ import annotations

import io
import re
import select
import socket
import ssl
from collections import deque
from typing import Any
from urllib.parse import urlsplit

MAX_HEADER_LINE = 65536
MAX_HEADERS = 200
MAX_INTERIM = 20  # 1xx answers (100 Continue, 103 Early Hints) skipped before the real one
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.1: a field name
FIELD_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")  # RFC 9110 5.5, no control characters
NO_BODY_STATUSES = frozenset({204, 304})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class ConnectFailed(OSError):
    """No connection could be made: nothing was sent."""


class SendFailed(OSError):
    """The connection broke while sending or before the answer's head came: the server may have it."""


class IncompleteBody(OSError):
    """The answer's body ended before its framing said it would."""


class ResponseHeaders:
    """A response's headers in arrival order, repeats kept apart, looked up without regard to case."""

    __slots__ = ("_first", "_items")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._first: dict[str, str] = {}
        for name, value in items:
            self._first.setdefault(name.lower(), value)

    def get(self, name: str, default: str = "") -> str:
        """The first value of a header, or `default`."""
        return self._first.get(name.lower(), default)

    def iteritems(self) -> list[tuple[str, str]]:
        """Every (name, value), in order."""
        return self._items

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first


class UpstreamPool:
    """Kept-alive connections to one server (base URL), at most `maxsize` of them idle."""

    def __init__(self, base_url: str, maxsize: int, connect_timeout: float, read_timeout: float) -> None:
        parts = urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.host_header = parts.netloc.rsplit("@", 1)[-1].encode("latin-1")
        self.maxsize = maxsize
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: deque[Connection] = deque()
        self._ssl = ssl.create_default_context() if self.https else None

    def request(self, method: str, target: str, headers: dict[str, str], body: bytes) -> UpstreamResponse:
        """Send one request and read the answer's head; the body is left to read."""
        head = self._head(method, target, headers, body)
        connection = self._reusable()
        if connection is not None:
            try:
                return connection.exchange(head, body, method, self)
            except SendFailed:
                # The server closed it while idle, most likely: only a request that may be
                # repeated is tried again on a fresh connection.
                if method not in IDEMPOTENT:
                    raise
        return self._connect().exchange(head, body, method, self)

    def _head(self, method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        lines = [f"{method} {target} HTTP/1.1".encode("latin-1"), b"Host: " + self.host_header]
        lines += [f"{name}: {value}".encode("latin-1", "replace") for name, value in headers.items()]
        if body or method in BODY_METHODS:
            lines.append(b"Content-Length: %d" % len(body))
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    def _reusable(self) -> Connection | None:
        """An idle connection that the server has not closed meanwhile, or None."""
        while True:
            try:
                connection = self._idle.pop()
            except IndexError:
                return None
            if connection.alive():
                return connection
            connection.close()

    def _connect(self) -> Connection:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise ConnectFailed(exc.errno, f"cannot connect: {exc.strerror or exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None:
            try:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            except OSError as exc:
                sock.close()
                raise ConnectFailed(exc.errno, f"TLS handshake failed: {exc}") from exc
        sock.settimeout(self.read_timeout)
        return Connection(sock)

    def put_back(self, connection: Connection) -> None:
        """Keep a connection whose answer was read to the end, if there is room."""
        if len(self._idle) < self.maxsize:
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        """Close every idle connection."""
        while self._idle:
            self._idle.pop().close()


class Connection:
    """One socket and its read buffer."""

    __slots__ = ("reader", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader: io.BufferedReader = sock.makefile("rb")

    def alive(self) -> bool:
        """False when the server closed the idle connection or sent something unasked."""
        if isinstance(self.sock, ssl.SSLSocket):
            return True  # TLS sockets take no recv flags; a dead one fails the send and is retried
        raw = getattr(self.sock, "_sock", self.sock)  # gevent wraps the real, non-blocking socket
        try:
            if raw.gettimeout() != 0.0 and not select.select([raw], [], [], 0)[0]:
                return True  # a socket with a timeout would wait in recv: ask select instead
            raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return False  # b"": closed by the server; bytes: an answer nobody asked for
        except BlockingIOError:
            return True  # nothing to read: still open
        except OSError:
            return False

    def exchange(self, head: bytes, body: bytes, method: str, pool: UpstreamPool) -> UpstreamResponse:
        try:
            send_all(self.sock, head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                self.sock.sendall(body)
            status_line = self.reader.readline(MAX_HEADER_LINE)
        except TimeoutError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise SendFailed(exc.errno, f"connection broken: {exc.strerror or exc}") from exc
        if not status_line:
            self.close()
            raise SendFailed(None, "connection broken: the server closed it without an answer")
        try:
            for _ in range(MAX_INTERIM):
                if not _interim(status_line):
                    break
                _read_headers(self.reader)  # a 100 Continue or 103 Early Hints: the answer follows
                status_line = self.reader.readline(MAX_HEADER_LINE)
            else:
                raise IncompleteBody(None, f"more than {MAX_INTERIM} interim (1xx) answers")
            return UpstreamResponse(self, pool, status_line, method)
        except (ValueError, OSError):
            self.close()
            raise

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class UpstreamResponse:
    """An answer whose head has been read; its body is read with `read`/`read1`."""

    def __init__(self, connection: Connection, pool: UpstreamPool, status_line: bytes, method: str) -> None:
        self._connection: Connection | None = connection
        self._pool = pool
        version, _, rest = status_line.partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise IncompleteBody(None, f"malformed status line {status_line[:80]!r}")
        self.status = int(code)
        self.headers = ResponseHeaders(_read_headers(connection.reader))
        self._keep_alive = version == b"HTTP/1.1" and "close" not in self.headers.get("Connection").lower()
        self._chunked = "chunked" in self.headers.get("Transfer-Encoding").lower()
        self._chunk_left = 0
        self._done = False
        length = self.headers.get("Content-Length")
        self.length_remaining: int | None = None
        if method == "HEAD" or self.status in NO_BODY_STATUSES or 100 <= self.status < 200:
            self.length_remaining, self._done = 0, True
        elif not self._chunked and length.isdigit():
            self.length_remaining = int(length)
            self._done = self.length_remaining == 0
        elif not self._chunked:
            self._keep_alive = False  # the body runs to the close

    def read1(self, amount: int, decode_content: bool = False) -> bytes:
        """Up to `amount` bytes of the body as soon as any are there; b"" at its end."""
        if self._done or self._connection is None:
            return b""
        reader = self._connection.reader
        if self._chunked:
            return self._read_chunk(reader, amount)
        if self.length_remaining is None:
            data = reader.read1(amount)
            self._done = not data
            return data
        data = reader.read1(min(amount, self.length_remaining))
        if not data:
            self._keep_alive, self._done = False, True
            return b""  # length_remaining > 0 tells the caller the body was cut short
        self.length_remaining -= len(data)
        self._done = self.length_remaining == 0
        return data

    def read(self, amount: int) -> bytes:
        """Up to `amount` bytes of the body, fewer only at its end."""
        parts, size = [], 0
        while size < amount and (data := self.read1(amount - size)):
            parts.append(data)
            size += len(data)
        return b"".join(parts)

    def _read_chunk(self, reader: io.BufferedReader, amount: int) -> bytes:
        if self._chunk_left == 0:
            line = reader.readline(MAX_HEADER_LINE)
            size = line.split(b";", 1)[0].strip()
            try:
                self._chunk_left = int(size, 16)
            except ValueError:
                raise IncompleteBody(None, f"bad chunk size line {line[:40]!r}") from None
            if self._chunk_left == 0:
                _read_headers(reader)  # trailers, dropped
                self._done = True
                return b""
        data = reader.read1(min(amount, self._chunk_left))
        if not data:
            raise IncompleteBody(None, "the chunked body ended early")
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and reader.readline(MAX_HEADER_LINE) not in (b"\r\n", b"\n"):
            raise IncompleteBody(None, "a chunk did not end with CRLF")
        return data

    def release_conn(self) -> None:
        """Give the connection back if the body was read to the end, else close it."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._done and self._keep_alive and not self.length_remaining:
            self._pool.put_back(connection)
        else:
            connection.close()

    def close(self) -> None:
        """Drop the connection, whatever is left of the body."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def send_all(sock: socket.socket | Any, data: bytes) -> None:
    """`sock.sendall(data)`, in one `send` when the socket takes it all, as it does a small message.

    gevent's sendall asks the socket for its buffer size before every send; the proxy's
    requests upstream and the worker's answers to clients are mostly one small write.
    """
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def _interim(status_line: bytes) -> bool:
    """True for an informational answer (1xx) other than 101 Switching Protocols."""
    code = status_line.partition(b" ")[2][:3]
    return code[:1] == b"1" and code.isdigit() and code != b"101"


def _read_headers(reader: io.BufferedReader) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    while True:
        line = reader.readline(MAX_HEADER_LINE)
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise IncompleteBody(None, "the connection closed inside the answer's headers")
        if len(headers) >= MAX_HEADERS or not line.endswith(b"\n"):
            raise IncompleteBody(None, "the answer's headers are too long")
        name, sep, value = line.decode("latin-1").partition(":")
        value = value.strip(" \t\r\n")
        if not sep or not TOKEN.fullmatch(name) or not FIELD_VALUE.fullmatch(value):
            # As nginx does: a header the client could not be sent makes the answer a bad one (502).
            raise IncompleteBody(None, f"malformed header line {line[:80]!r}")
        headers.append((name, value))
