"""HealthChecker against real misbehaving servers on the loopback: deadlines, bounded reads, local errors."""

from __future__ import annotations

import errno
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import ROOT, free_port, wait_until

from gateway.fleet.health import MAX_BODY_BYTES, HealthChecker, HealthResult, NotChecked, Target

Handler = Callable[[socket.socket, threading.Event], None]

# Bounds on how long a test may take where the hazard is a check that never ends; never a speed claim.
GENEROUS_S = 5.0
DRIP_INTERVAL_S = 0.2
DRIP_LIMIT_S = 30.0  # a drip server gives up on its own after this, so no test can hang on one


class RawServer:
    """A TCP server on the loopback that runs `handle(conn, stopping)` in a thread per connection."""

    def __init__(self, handle: Handler, host: str = "127.0.0.1", family: socket.AddressFamily = socket.AF_INET):
        self.handle = handle
        self.host = host
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(512)
        self.listener.settimeout(0.05)  # so the accept loop notices `stopping`
        self.port = int(self.listener.getsockname()[1])
        self.accepted = 0
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_forever, daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    def _accept_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)  # every wait is short, so each handler notices `stopping`
        try:
            self.handle(conn, self.stopping)
        except OSError:
            pass  # the checker hung up or aborted: what most of these servers expect
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self._acceptor.join(GENEROUS_S)
        self.listener.close()
        for thread in self._threads:
            thread.join(GENEROUS_S)


def read_head(conn: socket.socket, stopping: threading.Event) -> bytes:
    """Read the request head, or what came before the peer hung up or the server stopped."""
    data = b""
    while b"\r\n\r\n" not in data and not stopping.is_set():
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
    return data


def hold(conn: socket.socket, stopping: threading.Event) -> None:
    """Wait, silent, until the peer hangs up or the server stops."""
    while not stopping.is_set():
        try:
            if not conn.recv(4096):
                return
        except TimeoutError:
            continue


def drip(conn: socket.socket, stopping: threading.Event, pieces: Iterator[bytes]) -> None:
    """Send one piece every DRIP_INTERVAL_S until the peer hangs up, the server stops, or DRIP_LIMIT_S."""
    give_up = time.monotonic() + DRIP_LIMIT_S
    for piece in pieces:
        if stopping.wait(DRIP_INTERVAL_S) or time.monotonic() > give_up:
            return
        conn.sendall(piece)


def answer(status: str, headers: str = "", body: bytes = b"ok", heads: list[bytes] | None = None) -> Handler:
    """Answer `status` with `body`; keep each request head in `heads` if given."""

    def handle(conn: socket.socket, stopping: threading.Event) -> None:
        request = read_head(conn, stopping)
        if heads is not None:
            heads.append(request)
        head = f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)

    return handle


def black_hole(conn: socket.socket, stopping: threading.Event) -> None:
    hold(conn, stopping)


def drip_status_line(conn: socket.socket, stopping: threading.Event) -> None:
    read_head(conn, stopping)
    drip(conn, stopping, (bytes([byte]) for byte in b"HTTP/1.1 200 OK" * 1000))


def drip_headers(conn: socket.socket, stopping: threading.Event) -> None:
    read_head(conn, stopping)
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    drip(conn, stopping, (f"X-Drip-{n}: 1\r\n".encode() for n in range(10**6)))


def drip_body(conn: socket.socket, stopping: threading.Event) -> None:
    read_head(conn, stopping)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    drip(conn, stopping, (b"x" for _ in range(100000)))


def flood(status: str, chunked: bool) -> Handler:
    """Answer `status` with an endless body, sent as fast as the peer reads it."""

    def handle(conn: socket.socket, stopping: threading.Event) -> None:
        read_head(conn, stopping)
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {1 << 40}"
        conn.sendall(f"HTTP/1.1 {status}\r\n{framing}\r\n\r\n".encode())
        block = b"x" * 16384
        piece = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
        give_up = time.monotonic() + DRIP_LIMIT_S
        while not stopping.is_set() and time.monotonic() < give_up:
            try:
                conn.sendall(piece)
            except TimeoutError:
                continue  # the peer is not reading; it has stopped, or will hang up

    return handle


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    """Start RawServers; all are stopped at the end of the test."""
    servers: list[RawServer] = []

    def start(handle: Handler, **kwargs: object) -> RawServer:
        server = RawServer(handle, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def make_checker() -> Iterator[Callable[..., HealthChecker]]:
    """Build HealthCheckers; all are closed at the end of the test."""
    checkers: list[HealthChecker] = []

    def build(**kwargs: object) -> HealthChecker:
        checker = HealthChecker(**kwargs)  # type: ignore[arg-type]
        checkers.append(checker)
        return checker

    yield build
    for checker in checkers:
        checker.close()


def check_one(checker: HealthChecker, url: str) -> tuple[HealthResult, float]:
    started = time.monotonic()
    results = checker.check_all([Target("S1", url)])
    elapsed = time.monotonic() - started
    assert len(results) == 1
    assert (results[0].server_id, results[0].url) == ("S1", url)
    return results[0], elapsed


@pytest.mark.parametrize(
    ("handler", "ok", "detail"),
    [
        (answer("200 OK"), True, "HTTP 200"),
        (answer("204 No Content", body=b""), True, "HTTP 204"),
        (answer("503 Service Unavailable"), False, "HTTP 503"),
        (answer("404 Not Found"), False, "HTTP 404"),
    ],
)
def test_the_status_decides(serve, make_checker, handler, ok, detail):
    server = serve(handler)
    result, _ = check_one(make_checker(timeout=2.0), server.url)
    assert (result.ok, result.detail) == (ok, detail)


def test_a_redirect_fails_and_is_not_followed(serve, make_checker):
    elsewhere = serve(answer("200 OK"))
    redirect = serve(answer("302 Found", headers=f"Location: {elsewhere.url}/health\r\n"))
    result, _ = check_one(make_checker(timeout=2.0), redirect.url)
    assert (result.ok, result.detail) == (False, "HTTP 302")
    assert elsewhere.accepted == 0


def test_the_health_path_is_requested(serve, make_checker):
    heads: list[bytes] = []
    server = serve(answer("200 OK", heads=heads))
    result, _ = check_one(make_checker(path="/ready", timeout=2.0), server.url)
    assert result.ok
    assert heads[0].startswith(b"GET /ready HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}".encode() in heads[0]


def test_a_refused_connection_is_unreachable(make_checker):
    result, _ = check_one(make_checker(timeout=2.0), f"http://127.0.0.1:{free_port()}")
    assert (result.ok, result.detail) == (False, "unreachable: Connection refused")


def test_a_bad_url_fails_without_a_connection(make_checker):
    result, _ = check_one(make_checker(timeout=2.0), "http://127.0.0.1:99999")
    assert not result.ok
    assert result.detail.startswith("bad url:")


def test_a_black_hole_times_out(serve, make_checker):
    server = serve(black_hole)
    result, elapsed = check_one(make_checker(timeout=1.0), server.url)
    assert (result.ok, result.detail) == (False, "timed out")
    assert elapsed < GENEROUS_S


@pytest.mark.parametrize("handler", [drip_status_line, drip_headers, drip_body], ids=["status", "headers", "body"])
def test_a_server_that_drips_is_cut_off_at_the_deadline(serve, make_checker, handler):
    # The regression: a per-read timeout let a server dripping a header line every 0.2 s hold a
    # check (and so every later sweep) open for as long as it dripped, then pass it.
    server = serve(handler)
    result, elapsed = check_one(make_checker(timeout=1.0), server.url)
    assert (result.ok, result.detail) == (False, "timed out")
    assert elapsed < GENEROUS_S


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("status", "ok"), [("200 OK", True), ("503 Service Unavailable", False)])
def test_an_endless_body_is_read_only_in_part(serve, make_checker, monkeypatch, chunked, status, ok):
    from http.client import HTTPResponse

    asked: list[int | None] = []
    real_read = HTTPResponse.read

    def read(self, amt=None):
        asked.append(amt)
        return real_read(self, amt)

    monkeypatch.setattr(HTTPResponse, "read", read)
    server = serve(flood(status, chunked))
    result, elapsed = check_one(make_checker(timeout=2.0), server.url)
    assert (result.ok, result.detail) == (ok, f"HTTP {status.split()[0]}")
    assert asked == [MAX_BODY_BYTES]
    assert elapsed < GENEROUS_S


def test_ipv6_loopback(serve, make_checker):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support")
    try:
        server = serve(answer("200 OK"), host="::1", family=socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"cannot listen on ::1: {exc}")
    result, _ = check_one(make_checker(timeout=2.0), server.url)
    assert server.url.startswith("http://[::1]:")
    assert (result.ok, result.detail) == (True, "HTTP 200")


def test_a_queued_check_gets_its_full_time(serve, make_checker):
    # With one pool thread the healthy check waits a whole timeout behind the black hole; its
    # deadline starts when it starts, so it still passes.
    hole, healthy = serve(black_hole), serve(answer("200 OK"))
    checker = make_checker(timeout=1.0, concurrency=1)
    results = checker.check_all([Target("H", hole.url), Target("OK", healthy.url)])
    assert [(r.server_id, r.ok, r.detail) for r in results] == [("H", False, "timed out"), ("OK", True, "HTTP 200")]


def test_300_servers_with_50_black_holes(serve, make_checker):
    healthy, hole = serve(answer("200 OK")), serve(black_hole)
    targets = [Target(f"S{i:03d}", hole.url if i % 6 == 0 else healthy.url) for i in range(300)]
    black_holed = {t.server_id for t in targets if t.url == hole.url}
    assert len(black_holed) == 50
    started = time.monotonic()
    results = make_checker(timeout=1.0, concurrency=256).check_all(targets)
    elapsed = time.monotonic() - started
    assert [r.server_id for r in results] == [t.server_id for t in targets]
    assert {r.server_id for r in results if r.detail == "timed out" and not r.ok} == black_holed
    assert all(r.ok and r.detail == "HTTP 200" for r in results if r.server_id not in black_holed)
    assert elapsed < 10 * GENEROUS_S


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL])
def test_the_gateways_own_errors_do_not_count_against_a_server(serve, make_checker, monkeypatch, caplog, code):
    first, victim, last = serve(answer("200 OK")), serve(answer("200 OK")), serve(answer("200 OK"))
    real_create_connection = socket.create_connection

    def create_connection(address, *args, **kwargs):
        if address[1] == victim.port:
            raise OSError(code, "the gateway is out of something")
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    targets = [Target("A", first.url), Target("V", victim.url), Target("Z", last.url)]
    with caplog.at_level(logging.WARNING, logger="gateway.fleet.health"):
        results = make_checker(timeout=2.0).check_all(targets)
    assert [(r.server_id, r.ok) for r in results] == [("A", True), ("Z", True)]
    warnings = [record for record in caplog.records if record.name == "gateway.fleet.health"]
    assert len(warnings) == 1
    assert "1 of 3 servers could not be checked" in warnings[0].getMessage()
    with pytest.raises(NotChecked):
        make_checker(timeout=2.0).check(Target("V", victim.url))


def test_check_returns_one_result(serve, make_checker):
    server = serve(answer("200 OK"))
    assert make_checker(timeout=2.0).check(Target("S1", server.url)) == HealthResult("S1", server.url, True, "HTTP 200")


def test_check_all_after_close_returns_nothing(serve, make_checker, caplog):
    server = serve(answer("200 OK"))
    checker = make_checker(timeout=2.0)
    checker.close()
    with caplog.at_level(logging.DEBUG, logger="gateway.fleet.health"):
        assert checker.check_all([Target("S1", server.url)]) == []
    assert all(record.levelno <= logging.DEBUG for record in caplog.records if record.name == "gateway.fleet.health")
    assert server.accepted == 0
    with pytest.raises(NotChecked):
        checker.check(Target("S1", server.url))


def test_close_aborts_checks_in_flight_and_they_count_neither_way(serve, make_checker):
    hole = serve(black_hole)
    checker = make_checker(timeout=60.0)
    results: list[list[HealthResult]] = []
    sweep = threading.Thread(target=lambda: results.append(checker.check_all([Target("H", hole.url)])))
    sweep.start()
    assert wait_until(lambda: hole.accepted == 1)
    checker.close()
    sweep.join(GENEROUS_S)
    assert not sweep.is_alive()
    assert results == [[]]


def test_deadlines_hold_under_gevent(serve):
    pytest.importorskip("gevent")
    script = """
import json, sys, time
from gevent import monkey
monkey.patch_all()
from gateway.fleet.health import HealthChecker, Target
checker = HealthChecker(timeout=1.0)
started = time.monotonic()
results = checker.check_all([Target(str(i), url) for i, url in enumerate(sys.argv[1:])])
checker.close()
print(json.dumps({"elapsed": time.monotonic() - started, "details": [r.detail for r in results]}))
"""
    urls = [serve(answer("200 OK")).url, serve(drip_headers).url, serve(black_hole).url]
    urls.append(f"http://127.0.0.1:{free_port()}")
    done = subprocess.run(
        [sys.executable, "-c", script, *urls], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["details"] == ["HTTP 200", "timed out", "timed out", "unreachable: Connection refused"]
    assert report["elapsed"] < GENEROUS_S
