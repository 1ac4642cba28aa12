"""HealthChecker against real misbehaving servers: a hard deadline, bounded reads, no redirects."""

from __future__ import annotations

import errno
import http.client
import socket
import threading
import time

import pytest

from health import HealthChecker, Target


class RawServer:
    """A TCP server on 127.0.0.1 whose handler does whatever a test needs; stopped by the test."""

    def __init__(self, handler) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.stopping = threading.Event()
        self.connections = 0
        threading.Thread(target=self.serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.run, args=(conn,), daemon=True).start()

    def run(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                self.handler(conn, self.stopping)
            except OSError:
                pass

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()


@pytest.fixture
def raw_server():
    servers: list[RawServer] = []

    def start(handler) -> RawServer:
        server = RawServer(handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def answer(status: str, body: bytes = b"ok", extra: str = ""):
    def handler(conn, stopping):
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body)

    return handler


def black_hole(conn, stopping):
    stopping.wait(30)


def header_drip(conn, stopping):
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    for i in range(200):  # bounded: at most 40 s, and the test stops it sooner
        if stopping.wait(0.2):
            return
        conn.sendall(f"X-Drip-{i}: x\r\n".encode())


def huge_body(conn, stopping):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
    chunk = b"x" * 65536
    for _ in range(1600):
        if stopping.is_set():
            return
        conn.sendall(chunk)


@pytest.fixture
def checker():
    made: list[HealthChecker] = []

    def build(timeout: float = 1.0, concurrency: int = 256) -> HealthChecker:
        made.append(HealthChecker(timeout=timeout, concurrency=concurrency))
        return made[-1]

    yield build
    for item in made:
        item.close()


@pytest.mark.parametrize(
    ("handler", "ok", "detail"),
    [
        (answer("200 OK"), True, "HTTP 200"),
        (answer("204 No Content", b""), True, "HTTP 204"),
        (answer("503 Service Unavailable"), False, "HTTP 503"),
        (black_hole, False, "timed out"),
    ],
)
def test_outcomes(raw_server, checker, handler, ok, detail):
    server = raw_server(handler)
    (result,) = checker().check_all([Target("B1", server.url)])
    assert (result.server_id, result.ok, result.detail) == ("B1", ok, detail)


def test_a_redirect_is_a_failure_and_is_not_followed(raw_server, checker):
    elsewhere = raw_server(answer("200 OK"))
    server = raw_server(answer("302 Found", b"", f"Location: {elsewhere.url}/health\r\n"))
    (result,) = checker().check_all([Target("B1", server.url)])
    assert (result.ok, result.detail) == (False, "HTTP 302")
    assert elsewhere.connections == 0


def test_refused_connection(checker):
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    (result,) = checker().check_all([Target("B1", f"http://127.0.0.1:{port}")])
    assert (result.ok, result.detail) == (False, "unreachable: Connection refused")


def test_a_server_that_drips_headers_cannot_hold_a_check(raw_server, checker):
    server = raw_server(header_drip)
    started = time.monotonic()
    (result,) = checker(timeout=1.0).check_all([Target("B1", server.url)])
    assert (result.ok, result.detail) == (False, "timed out")
    assert time.monotonic() - started < 10  # without the deadline it lasts as long as the drip (40 s)


def test_a_huge_body_is_not_read_whole(raw_server, checker):
    server = raw_server(huge_body)
    (result,) = checker(timeout=5.0).check_all([Target("B1", server.url)])
    assert (result.ok, result.detail) == (True, "HTTP 200")


def test_ipv6(checker):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        sock = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = sock.getsockname()[1]

    def serve():
        conn, _ = sock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        (result,) = checker().check_all([Target("B6", f"http://[::1]:{port}")])
        assert result.ok
    finally:
        sock.close()


def test_a_sweep_with_hung_servers_takes_about_one_timeout(raw_server, checker):
    good, hung = raw_server(answer("200 OK")), raw_server(black_hole)
    targets = [Target(f"S{i}", (hung if i % 6 == 0 else good).url) for i in range(300)]
    started = time.monotonic()
    results = checker(timeout=1.0).check_all(targets)
    assert sum(1 for r in results if r.detail == "timed out") == 50
    assert sum(1 for r in results if r.ok) == 250
    assert time.monotonic() - started < 15  # generous: one timeout plus scheduling on 2 cores


def test_checks_the_gateway_could_not_make_are_left_out(raw_server, checker, monkeypatch):
    good = raw_server(answer("200 OK"))
    real_connect = http.client.HTTPConnection.connect

    def connect(self):
        if self.port == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_connect(self)

    monkeypatch.setattr(http.client.HTTPConnection, "connect", connect)
    results = checker().check_all([Target("LOCAL", "http://127.0.0.1:1"), Target("B1", good.url)])
    assert [r.server_id for r in results] == ["B1"]


def test_a_closed_checker_checks_nothing(checker):
    item = checker()
    item.close()
    assert item.check_all([Target("B1", "http://127.0.0.1:1")]) == []
