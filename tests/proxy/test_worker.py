"""The shipped worker: a response's head goes out with its first body bytes, and nothing waits or breaks."""

from __future__ import annotations

import http.client
import json
import socket
from email.utils import parsedate_to_datetime
from types import SimpleNamespace

import pytest
from conftest import SECRET
from gunicorn.config import Config

from gateway.proxy.worker import CoalescingResponse, date_line, send_all


@pytest.fixture
def wire_response():
    """Make a CoalescingResponse writing to one end of a socket pair; read the other end."""
    pairs: list[tuple[socket.socket, socket.socket]] = []

    def make(method: str = "GET") -> tuple[CoalescingResponse, socket.socket]:
        ours, theirs = socket.socketpair()
        pairs.append((ours, theirs))
        request = SimpleNamespace(version=(1, 1), method=method, should_close=lambda: False)
        return CoalescingResponse(request, ours, Config()), theirs

    yield make
    for pair in pairs:
        for sock in pair:
            sock.close()


def received(sock: socket.socket) -> bytes:
    """Whatever has arrived so far (waits up to 0.2 s for the first bytes)."""
    sock.settimeout(0.2)
    parts = []
    try:
        while chunk := sock.recv(65536):
            parts.append(chunk)
    except TimeoutError:
        pass
    return b"".join(parts)


def test_the_head_rides_with_the_first_body_bytes(wire_response):
    response, theirs = wire_response()
    response.start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "7")])
    response.send_headers()
    assert received(theirs) == b""  # held back, not sent alone
    response.write(b'{"a":1}')
    head, _, body = received(theirs).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Length: 7" in head and b"\r\nConnection: keep-alive" in head
    assert body == b'{"a":1}'
    response.close()
    assert received(theirs) == b""


def test_an_empty_first_chunk_sends_the_head_at_once(wire_response):
    response, theirs = wire_response()
    response.start_response("200 OK", [("Content-Type", "text/event-stream")])
    response.write(b"")  # a stream whose first token has not come yet
    head = received(theirs)
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head and head.endswith(b"\r\n\r\n")
    response.write(b"data: 1\n\n")
    assert received(theirs) == b"9\r\ndata: 1\n\n\r\n"
    response.close()
    assert received(theirs) == b"0\r\n\r\n"


def test_a_chunked_answer_with_no_body_ends_with_its_head(wire_response):
    response, theirs = wire_response()
    response.start_response("200 OK", [("Content-Type", "text/plain")])
    response.close()
    head, _, rest = received(theirs).partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert rest == b"0\r\n\r\n"


@pytest.mark.parametrize(("method", "status"), [("HEAD", "200 OK"), ("GET", "204 NO CONTENT")])
def test_an_answer_without_a_body_sends_its_head_when_it_closes(wire_response, method, status):
    response, theirs = wire_response(method)
    response.start_response(status, [("Content-Type", "application/json"), ("Content-Length", "7")])
    response.write(b'{"a":1}')  # dropped: HEAD and 204 carry no body
    response.close()
    data = received(theirs)
    assert data.startswith(f"HTTP/1.1 {status}\r\n".encode()) and data.endswith(b"\r\n\r\n")
    assert (b"Content-Length: 7" in data) is (method == "HEAD")  # 204 may not carry one


def test_body_bytes_a_head_answer_may_not_carry_do_not_hold_its_head_back(wire_response):
    response, theirs = wire_response("HEAD")
    response.start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "7")])
    response.write(b'{"a":1}')  # dropped, as HEAD carries no body: the head goes out now, not at close
    data = received(theirs)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\n")
    response.close()
    assert received(theirs) == b""


def test_the_date_header_is_now_in_imf_fixdate():
    line = date_line()
    assert line.startswith("Date: ") and line.endswith(" GMT\r\n")
    assert parsedate_to_datetime(line[6:-2]).tzinfo is not None


def test_the_shipped_gateway_keeps_framing_over_one_connection(gateway_process, fake_servers):
    """HEAD, 204, streams, a 2 MiB body, 1xx before an answer, a wrong length: in turn on one socket."""
    gateway = gateway_process()
    server = fake_servers("B1")
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": server.port, "secret": SECRET}
    connection = http.client.HTTPConnection("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]), timeout=10)
    connection.request("POST", "/webhook/register", body=json.dumps(body), headers={"Content-Type": "application/json"})
    registered = connection.getresponse()
    assert registered.status in (200, 201), registered.read()
    registered.read()
    payload = bytes(range(256)) * 8192
    steps = [
        ("HEAD", "/api/echo", None, 200, b""),
        ("GET", "/api/status-code?code=204", None, 204, b""),
        ("GET", "/api/stream?n=0", None, 200, b""),
        ("GET", "/api/stream?n=2&delay=0", None, 200, None),
        ("PUT", "/api/echo-bytes", payload, 200, payload),
        ("GET", "/api/interim", None, 200, None),
        ("POST", "/api/chunked-json?lying_length=1", None, 200, None),
        ("GET", "/api/echo", None, 200, None),
    ]
    for method, path, sent, status, expected in steps:
        connection.request(method, path, body=sent)
        response = connection.getresponse()
        data = response.read()
        assert response.status == status, (method, path)
        assert response.getheader("Date") and response.getheader("X-Backend-Server") == "B1"
        if expected is not None:
            assert data == expected, (method, path)
        elif path.startswith("/api/stream"):
            assert data.count(b"B1 chunk") == 2
        else:
            assert b'"server_id": "B1"' in data
    connection.close()


def test_what_one_send_leaves_goes_out_with_sendall():
    class Partial:
        """A socket that takes at most 3 bytes a send, as a full send buffer does."""

        def __init__(self) -> None:
            self.wire = b""

        def send(self, data) -> int:
            self.wire += bytes(data[:3])
            return min(3, len(data))

        def sendall(self, data) -> None:
            self.wire += bytes(data)

    sock = Partial()
    send_all(sock, b"HTTP/1.1 200 OK\r\n\r\nbody")
    assert sock.wire == b"HTTP/1.1 200 OK\r\n\r\nbody"
