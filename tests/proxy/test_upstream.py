"""The lean HTTP/1.1 client against scripted raw-socket servers on 127.0.0.1."""

from __future__ import annotations

import socket
import threading

import pytest

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
