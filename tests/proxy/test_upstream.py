"""The lean HTTP/1.1 client against scripted raw-socket servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable

import pytest
import requests
from conftest import SECRET, RawServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.proxy.upstream import ConnectFailed, IncompleteBody, SendFailed, UpstreamPool


class ScriptedServer:
    """Accepts connections and answers each request with the next scripted reply (bytes)."""

    def __init__(self, replies: list[bytes], close_after_each: bool = False) -> None:
        self.replies = list(replies)
        self.close_after_each = close_after_each
        self.requests: list[bytes] = []
        self.connections = 0
        self.pools: list[UpstreamPool] = []
        self.closed = threading.Event()  # set each time the server has closed a connection
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while self.replies:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self.replies:
                    data = conn.recv(65536)
                    if not data:
                        break
                    self.requests.append(data)
                    conn.sendall(self.replies.pop(0))
                    if self.close_after_each:
                        break
            self.closed.set()

    def pool(self) -> UpstreamPool:
        pool = UpstreamPool(f"http://127.0.0.1:{self.port}", 4, 2.0, 2.0)
        self.pools.append(pool)
        return pool

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
        self.sock.close()


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def start(replies: list[bytes], **kwargs) -> ScriptedServer:
        server = ScriptedServer(replies, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhello"


def test_a_request_is_sent_with_host_and_length_and_the_answer_read(scripted):
    server = scripted([OK])
    response = server.pool().request("POST", "/x?y=1", {"X-A": "1"}, b"body")
    assert response.status == 200
    assert response.read(100) == b"hello"
    assert response.headers.get("content-length") == "5"
    assert [v for k, v in response.headers.iteritems() if k == "Set-Cookie"] == ["a=1", "b=2"]
    response.release_conn()
    sent = server.requests[0]
    assert sent.startswith(b"POST /x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nX-A: 1\r\n" in sent and b"\r\nContent-Length: 4\r\n" in sent and sent.endswith(b"\r\n\r\nbody")


def test_a_drained_connection_is_kept_and_used_again(scripted):
    server = scripted([OK, OK])
    pool = server.pool()
    for _ in range(2):
        response = pool.request("GET", "/", {}, b"")
        assert response.read(100) == b"hello"
        response.release_conn()
    assert server.connections == 1


def test_a_connection_the_server_closed_while_idle_is_not_used(scripted):
    server = scripted([OK, OK], close_after_each=True)
    pool = server.pool()
    for _ in range(2):
        response = pool.request("POST", "/", {}, b"x")  # not idempotent: a stale socket must not be tried
        assert response.read(100) == b"hello"
        response.release_conn()
        assert server.closed.wait(5)
        server.closed.clear()
    assert server.connections == 2


def test_a_chunked_body_is_decoded_chunk_by_chunk(scripted):
    body = b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nTrailer: x\r\n\r\n"
    server = scripted([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, OK])
    pool = server.pool()
    response = pool.request("GET", "/", {}, b"")
    assert [response.read1(100), response.read1(100), response.read1(100)] == [b"abc", b"defg", b""]
    response.release_conn()
    again = pool.request("GET", "/", {}, b"")
    assert again.read(10) == b"hello"
    again.release_conn()
    assert server.connections == 1


@pytest.mark.parametrize(
    ("method", "reply"),
    [("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"), ("GET", b"HTTP/1.1 204 No Content\r\n\r\n")],
)
def test_answers_without_a_body(scripted, method, reply):
    server = scripted([reply])
    response = server.pool().request(method, "/", {}, b"")
    assert response.read1(10) == b""
    assert response.length_remaining == 0
    response.close()


def test_a_body_without_framing_runs_to_the_close_and_the_socket_is_not_kept(scripted):
    server = scripted([b"HTTP/1.1 200 OK\r\n\r\nall of it"], close_after_each=True)
    pool = server.pool()
    response = pool.request("GET", "/", {}, b"")
    assert response.read(100) == b"all of it"
    response.release_conn()
    assert len(pool._idle) == 0


def test_a_short_body_leaves_length_remaining(scripted):
    server = scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], close_after_each=True)
    response = server.pool().request("GET", "/", {}, b"")
    assert response.read(100) == b"abc"
    assert response.length_remaining == 7
    response.close()


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"garbage\r\n\r\n", IncompleteBody),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", IncompleteBody),
        (b"", SendFailed),
    ],
)
def test_a_broken_answer_is_an_error_not_a_hang(scripted, reply, error):
    server = scripted([reply], close_after_each=True)
    with pytest.raises(error):
        server.pool().request("GET", "/", {}, b"")


def test_a_broken_chunked_body_raises(scripted):
    server = scripted([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"], close_after_each=True)
    response = server.pool().request("GET", "/", {}, b"")
    with pytest.raises(IncompleteBody):
        response.read1(10)
    response.close()


def test_a_refused_connection_says_nothing_was_sent():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(ConnectFailed):
        UpstreamPool(f"http://127.0.0.1:{port}", 4, 2.0, 2.0).request("GET", "/", {}, b"")


def test_a_silent_server_times_out(scripted):
    server = scripted([])
    sock = socket.create_server(("127.0.0.1", 0))  # accepts (in the backlog) and never answers
    try:
        pool = UpstreamPool(f"http://127.0.0.1:{sock.getsockname()[1]}", 4, 1.0, 0.3)
        with pytest.raises(TimeoutError):
            pool.request("GET", "/", {}, b"")
    finally:
        sock.close()
    assert server.connections == 0


# -- response queue poisoning (issue 12, item 1): no byte past an answer's end reaches the next one --

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
NEXT = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine"


@pytest.mark.parametrize(
    ("method", "poisoned"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 43\r\n\r\n" + SMUGGLED),  # a body sent on HEAD
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n" + SMUGGLED),  # a body after a 204
        ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n" + SMUGGLED),
        ("GET", OK + SMUGGLED),  # two answers back to back
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello\r\n" + SMUGGLED),
    ],
    ids=["head-with-body", "204-with-body", "304-with-body", "two-answers", "crlf-then-answer"],
)
def test_bytes_after_an_answer_close_its_connection(scripted, method, poisoned):
    server = scripted([poisoned, NEXT])
    pool = server.pool()
    first = pool.request(method, "/", {}, b"")
    first.read(100)
    first.release_conn()
    assert len(pool._idle) == 0
    second = pool.request("GET", "/", {}, b"")
    assert second.read(100) == b"mine"  # not "forged"
    second.release_conn()
    assert server.connections == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello" + SMUGGLED,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello" + SMUGGLED,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\nhello".encode(),  # isdigit() is True, int() raises
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 600 Beyond\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
    ids=[
        "te-gzip-and-length",
        "two-lengths",
        "repeated-length",
        "superscript-length",
        "signed-length",
        "status-000",
        "status-600",
        "101-upgrade",
        "101-bare",
    ],
)
def test_an_ambiguous_or_impossible_head_is_refused_and_its_connection_closed(scripted, reply):
    server = scripted([reply], close_after_each=True)
    pool = server.pool()
    with pytest.raises(IncompleteBody):
        pool.request("GET", "/", {}, b"")
    assert len(pool._idle) == 0


@pytest.mark.parametrize(
    "chunk",
    [
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"0_5\r\nhello\r\n0\r\n\r\n",
        b"5;\x01\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["negative", "0x-prefix", "underscore", "control-in-extension"],
)
def test_a_bad_chunk_size_line_is_refused(scripted, chunk):
    server = scripted([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk], close_after_each=True)
    pool = server.pool()
    response = pool.request("GET", "/", {}, b"")
    with pytest.raises(IncompleteBody):
        response.read(100)
    response.release_conn()
    assert len(pool._idle) == 0


def test_a_coding_that_is_not_chunked_runs_to_the_close(scripted):
    server = scripted(
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunkedx\r\n\r\n5\r\nhello\r\n0\r\n\r\n"], close_after_each=True
    )
    pool = server.pool()
    response = pool.request("GET", "/", {}, b"")
    assert response.read(100) == b"5\r\nhello\r\n0\r\n\r\n"  # not taken as chunked: passed on as it came
    response.release_conn()
    assert len(pool._idle) == 0


FRAGMENTS = [
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.0 200 OK\r\n",
    b"HTTP/1.1 204 No Content\r\n",
    b"HTTP/1.1 100 Continue\r\n",
    b"HTTP/1.1 304 Not Modified\r\n",
    b"HTTP/1.1 101 Switching\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 40\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive\r\n",
    b"\r\n",
    b"hello",
    b"5\r\nhello\r\n",
    b"0\r\n\r\n",
    b"\n",
    b"\r",
    b" ",
    b":",
    NEXT,
    SMUGGLED,
]
SENTINEL = b"HTTP/1.1 299 Sentinel\r\nContent-Length: 8\r\n\r\nsentinel"


class FuzzServer(RawServer):
    """Answers the first request after `arm` with the bytes under test, every later one with SENTINEL."""

    def __init__(self) -> None:
        self.reply: bytes | None = None
        self.lock = threading.Lock()
        super().__init__(self.answer)

    def arm(self, reply: bytes) -> None:
        with self.lock:
            self.reply = reply

    def next_reply(self) -> bytes:
        with self.lock:
            reply, self.reply = self.reply, None
        return SENTINEL if reply is None else reply

    def answer(self, conn: socket.socket) -> None:
        while conn.recv(65536):
            conn.sendall(self.next_reply())


@pytest.fixture(scope="module")
def fuzz_server():
    server = FuzzServer()
    yield server
    server.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=12)), min_size=1, max_size=12),
    method=st.sampled_from(["GET", "HEAD"]),
)
def test_no_pooled_connection_carries_a_byte_of_an_earlier_answer(fuzz_server, parts, method):
    fuzz_server.arm(b"".join(parts))
    pool = UpstreamPool(f"http://127.0.0.1:{fuzz_server.port}", 4, 1.0, 0.1)
    try:
        with contextlib.suppress(OSError):  # refused, cut short or timed out: all fine, if it is not pooled
            response = pool.request(method, "/", {}, b"")
            with contextlib.suppress(OSError):
                response.read(1 << 16)
            response.release_conn()
        reused = list(pool._idle)
        pool.read_timeout = pool.head_timeout = 10.0  # short only for the bytes under test, not on a busy machine
        after = pool.request("GET", "/", {}, b"")
        assert (after.status, after.read(100)) == (299, b"sentinel")
        after.release_conn()
        assert not reused or pool._idle[-1] is reused[-1]  # a kept connection served the next answer cleanly
    finally:
        pool.close()


class CarelessHandler(http.server.BaseHTTPRequestHandler):
    """A common hand-written GPU server: HTTP/1.1, and HEAD answered as GET, body and all."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        body = query.get("msg", ["hello " + self.headers.get("X-User", "nobody")])[0].encode("latin-1")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def careless_backend():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CarelessHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_a_body_sent_on_head_never_reaches_the_next_client(gateway_process, careless_backend):
    gateway = gateway_process()
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": careless_backend.server_port, "secret": SECRET}
    requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 22\r\nX-Forged: yes\r\n\r\nalice's private answer"
    attacker = requests.head(gateway.url + "/api/echo", params={"msg": forged.decode()}, timeout=5)
    assert attacker.status_code == 200
    for _ in range(3):  # each on a new client connection, as another user's would be
        victim = requests.get(gateway.url + "/api/echo", headers={"X-User": "bob"}, timeout=5)
        assert (victim.status_code, victim.text) == (200, "hello bob")
        assert "X-Forged" not in victim.headers


class LateCarelessHandler(CarelessHandler):
    """A body where none may be (HEAD, 304), sent a while after the head, as a busy server's thread may."""

    def do_HEAD(self) -> None:
        self.send_late(200)

    def do_GET(self) -> None:
        if self.path.startswith("/api/not-modified"):
            return self.send_late(304)
        return super().do_GET()

    def send_late(self, status: int) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        body = query.get("msg", [""])[0].encode("latin-1")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        time.sleep(0.3)  # the gateway has the whole head, and its next request, by then
        self.wfile.write(body)


@pytest.mark.slow
@pytest.mark.parametrize("status", ["head", "304"])
def test_a_body_sent_late_after_a_bodiless_head_never_reaches_the_next_client(gateway_process, status):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LateCarelessHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gateway = gateway_process()
        body = {"server_id": "B1", "ip": "127.0.0.1", "port": server.server_port, "secret": SECRET}
        requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()
        forged = b"HTTP/1.1 200 OK\r\nContent-Length: 22\r\nX-Forged: yes\r\n\r\nalice's private answer"
        if status == "head":
            assert requests.head(gateway.url + "/api/echo", params={"msg": forged.decode()}, timeout=5).ok
        else:  # a 304, its body sent late: the same doubt
            assert (
                requests.get(gateway.url + "/api/not-modified", params={"msg": forged.decode()}, timeout=5).status_code
                == 304
            )
        victim = requests.get(gateway.url + "/api/echo", headers={"X-User": "bob"}, timeout=5)
        assert (victim.status_code, victim.text) == (200, "hello bob")
        assert "X-Forged" not in victim.headers
    finally:
        server.shutdown()
        server.server_close()


def answering(reply: bytes) -> Callable[[socket.socket], None]:
    """A backend's handler that answers every request with `reply` and closes."""

    def answer(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(reply)

    return answer


@pytest.mark.slow
def test_a_refused_answer_frees_its_slot_for_good(gateway_process):
    gateway = gateway_process()
    backend = RawServer(answering("HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\nhi".encode()))
    try:
        body = {"server_id": "B1", "ip": "127.0.0.1", "port": backend.port, "secret": SECRET}
        body |= {"max_concurrent": 2}
        requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()
        for _ in range(3):  # one more than the cap: a leaked slot would make the last a 503
            answer = requests.post(gateway.url + "/api/x", data=b"x", timeout=5)
            assert answer.status_code == 502, answer.text
            assert "Content-Length" in answer.json()["message"]
        status = requests.get(gateway.url + "/webhook/servers", headers={"X-Webhook-Secret": SECRET}, timeout=5)
        assert status.json()["data"]["servers"][0]["in_flight"] == 0
    finally:
        backend.close()
