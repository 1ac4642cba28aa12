"""A lean HTTP/1.1 client for the proxy's hot path: kept-alive sockets per server, bodies streamed.

urllib3 and http.client spent about a third of the gateway's CPU per proxied request (parsing
headers with the email package, per-call URL parsing, pool bookkeeping; see docs/benchmarks.md).
The proxy needs far less: send one request on a pooled socket, read the answer's head, and hand
the body on chunk by chunk. Where an answer ends is decided by llhttp, Node.js's fuzzed parser
(through httptools, in framing.py), never by our own code: an answer it refuses is a 502, and
a connection that carries a byte past the end of its answer is closed, never pooled.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import httptools

from gateway.proxy.framing import Answer, AnswerReader, IncompleteBody, ResponseHeaders

MAX_HEAD = 256 * 1024  # bytes before the end of an answer's head
RECV_SIZE = 64 * 1024
WATCH_AFTER = 1.0  # seconds of waiting for a head after which the client is watched too
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class ConnectFailed(OSError):
    """No connection could be made: nothing was sent."""


class SendFailed(OSError):
    """The connection broke while sending or before the answer's head came: the server may have it."""

    stale = False  # True when it broke on a kept-alive connection the server had closed while idle


class ClientLeft(Exception):
    """The client hung up while the answer's head was awaited: the request was abandoned."""


class UpstreamPool:
    """Kept-alive connections to one server (base URL), at most `maxsize` of them idle."""

    def __init__(
        self, base_url: str, maxsize: int, connect_timeout: float, read_timeout: float, head_timeout: float = 0.0
    ) -> None:
        parts = urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.host_header = parts.netloc.rsplit("@", 1)[-1].encode("latin-1")
        self.maxsize = maxsize
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.head_timeout = head_timeout or read_timeout  # for the answer's head; then read_timeout per read
        self._idle: deque[Connection] = deque()
        self._ssl = ssl.create_default_context() if self.https else None

    def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes, client: socket.socket | None = None
    ) -> UpstreamResponse:
        """Send one request and read the answer's head; the body is left to read.

        While the head is awaited, a `client` socket that the client closes abandons the
        request (ClientLeft): nobody would read the answer.
        """
        head = self._head(method, target, headers, body)
        connection = self._reusable()
        if connection is not None:
            try:
                return connection.exchange(head, body, method, self, client)
            except SendFailed as exc:
                # The server closed it while idle, most likely: only a request that may be
                # repeated is tried again on a fresh connection.
                if method not in IDEMPOTENT:
                    exc.stale = True  # says nothing of the server's health
                    raise
        return self._connect().exchange(head, body, method, self, client)

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


class Connection(AnswerReader):
    """One socket, and the llhttp parser that reads its answers: every byte read goes to the parser.

    The connection is the parser's protocol: llhttp calls its `on_*` methods (AnswerReader's),
    which fill in the current answer. Nothing is ever buffered outside the parser, so a byte past the end of an
    answer is either seen by the parser (a second answer begins, or a body where none may be)
    or still in the kernel, where `alive` finds it before the connection is used again.
    """

    __slots__ = ("answer", "parser", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser: httptools.HttpResponseParser | None = None
        self.answer = Answer(False)

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

    def exchange(
        self, head: bytes, body: bytes, method: str, pool: UpstreamPool, client: socket.socket | None = None
    ) -> UpstreamResponse:
        """Send a request and read its answer's head; the body is left to read."""
        answer = self.answer = Answer(method == "HEAD")
        # A parser per answer (a fraction of a µs): whatever state a bad answer left is gone.
        self.parser = httptools.HttpResponseParser(self)
        # Chunked with a Content-Length too: the chunking frames the body and the length is
        # dropped, as RFC 9112 6.3 lets an intermediary do. Any other coding with a length is refused.
        self.parser.set_dangerous_leniencies(lenient_chunked_length=True)
        try:
            send_all(self.sock, head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                self.sock.sendall(body)
            data = self.first_bytes(pool, client)
        except (TimeoutError, ClientLeft):
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise SendFailed(exc.errno, f"connection broken: {exc.strerror or exc}") from exc
        if not data:
            self.close()
            raise SendFailed(None, "connection broken: the server closed it without an answer")
        try:
            received = 0
            while True:
                received += len(data)
                self.feed(data)
                if answer.head_done:
                    return UpstreamResponse(self, pool)
                if received > MAX_HEAD:
                    raise IncompleteBody(None, "the answer's head is too long")
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    raise IncompleteBody(None, "the connection closed inside the answer's head")
        except (ValueError, OSError):
            self.close()
            raise

    def first_bytes(self, pool: UpstreamPool, client: socket.socket | None) -> bytes:
        """The answer's first bytes, within the pool's head timeout; ClientLeft if the client goes."""
        sock, head_timeout = self.sock, pool.head_timeout
        started = time.monotonic()
        sock.settimeout(head_timeout if client is None else min(WATCH_AFTER, head_timeout))
        try:
            return sock.recv(RECV_SIZE)
        except TimeoutError:
            if client is None or head_timeout <= WATCH_AFTER:
                raise
        finally:
            sock.settimeout(pool.read_timeout)
        return self.watched_bytes(client, started + head_timeout)

    def watched_bytes(self, client: socket.socket, deadline: float) -> bytes:
        """Wait for the answer and for the client at once, until `deadline`."""
        watched = [self.sock, client]
        while (left := deadline - time.monotonic()) > 0:
            readable = select.select(watched, [], [], left)[0]
            if self.sock in readable:
                return self.sock.recv(RECV_SIZE)
            if client in readable:
                if client_gone(client):
                    raise ClientLeft("the client closed its connection before the answer came")
                watched = [self.sock]  # it sent more (a pipelined request): stop watching it
        raise TimeoutError("timed out waiting for the answer's head")

    def read_more(self) -> bool:
        """Read and parse what the socket has next; False at the server's close."""
        data = self.sock.recv(RECV_SIZE)
        if data:
            self.feed(data)
        return bool(data)

    def close(self) -> None:
        self.parser = None  # the parser holds our callbacks: let both go now, not at the next GC
        self.sock.close()


class UpstreamResponse:
    """An answer whose head has been read; its body is read with `read`/`read1`."""

    __slots__ = ("_answer", "_connection", "_pool", "headers", "status")

    def __init__(self, connection: Connection, pool: UpstreamPool) -> None:
        self._connection: Connection | None = connection
        self._pool = pool
        self._answer = answer = connection.answer
        self.status = answer.status
        self.headers = ResponseHeaders(answer.headers)

    @property
    def length_remaining(self) -> int | None:
        """Body bytes still to come by the Content-Length; None when that does not frame the body."""
        answer = self._answer
        if answer.no_body:
            return 0
        return None if answer.length is None else answer.length - answer.delivered

    def read1(self, amount: int, decode_content: bool = False) -> bytes:
        """Up to `amount` bytes of the body as soon as any are there; b"" at its end."""
        answer, connection = self._answer, self._connection
        while not answer.body:
            if answer.bad_body:
                raise IncompleteBody(None, answer.bad_body)
            if answer.complete or connection is None:
                return b""
            if not connection.read_more():
                return self._closed()
        data = answer.body.popleft()
        if len(data) > amount:
            answer.body.appendleft(data[amount:])
            data = data[:amount]
        answer.delivered += len(data)
        return data

    def read(self, amount: int) -> bytes:
        """Up to `amount` bytes of the body, fewer only at its end."""
        parts, size = [], 0
        while size < amount and (data := self.read1(amount - size)):
            parts.append(data)
            size += len(data)
        return b"".join(parts)

    def _closed(self) -> bytes:
        """The server closed the connection: the end of a body that runs to the close, else a cut."""
        answer = self._answer
        answer.keep_alive = False
        if answer.chunked:
            raise IncompleteBody(None, "the chunked body ended early")
        if answer.length is None:
            answer.complete = True  # the body ran to the close, as its head said
        return b""  # else length_remaining > 0 tells the caller the body was cut short

    def release_conn(self) -> None:
        """Give the connection back if its answer was read exactly to the end, else close it."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        answer = self._answer
        if answer.complete and answer.keep_alive and not answer.extra and not answer.body:
            self._pool.put_back(connection)
        else:
            connection.close()

    def close(self) -> None:
        """Drop the connection, whatever is left of the body."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def client_gone(client: socket.socket) -> bool:
    """True when the client closed its side of the connection (or it broke)."""
    raw = getattr(client, "_sock", client)
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def send_all(sock: socket.socket | Any, data: bytes) -> None:
    """`sock.sendall(data)`, in one `send` when the socket takes it all, as it does a small message.

    gevent's sendall asks the socket for its buffer size before every send; the proxy's
    requests upstream and the worker's answers to clients are mostly one small write.
    """
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
