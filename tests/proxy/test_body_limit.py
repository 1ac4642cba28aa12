"""Request bodies through the gateway as deployed: cut short, badly chunked, or sent too slowly."""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import time

import pytest
import requests
from conftest import SECRET

pytestmark = pytest.mark.slow


def register(gateway, server) -> None:
    body = {"server_id": server.server_id, "ip": "127.0.0.1", "port": server.port, "secret": SECRET}
    requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()


def raw(gateway, data: bytes, half_close: bool = False, timeout: float = 10) -> bytes:
    """Send `data` on a new connection and return everything the gateway answers before it closes."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def test_a_body_cut_short_is_a_400_and_never_forwarded(gateway_process, fake_servers):
    gateway, server = gateway_process(), fake_servers("B1")
    register(gateway, server)
    head = b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n"
    answer = raw(gateway, head + b"only 13 bytes", half_close=True)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"the request body ended after 13 of its 100 bytes" in answer
    assert not [r for r in server.requests if r["path"] == "/api/echo"]


@pytest.mark.parametrize(
    "chunks",
    [
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"0_5\r\nhello\r\n0\r\n\r\n",
        b"5;\x01\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\nContent-Length: 9\r\n\r\n",  # a length smuggled in as a trailer
    ],
    ids=["0x-prefix", "negative", "underscore", "control-in-extension", "length-trailer"],
)
def test_a_badly_chunked_body_is_a_400_not_a_500(gateway_process, fake_servers, chunks):
    gateway, server = gateway_process(), fake_servers("B1")
    register(gateway, server)
    answer = raw(gateway, b"POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"the request body is badly framed" in answer
    assert answer.count(b"HTTP/1.1 ") == 1  # one answer, then the connection closes
    assert "Traceback" not in gateway.log()
    assert not [r for r in server.requests if r["path"] == "/api/echo"]


@pytest.mark.parametrize("path", ["/api/echo", "/webhook/register"])
def test_a_body_that_trickles_in_gets_408_at_its_deadline(gateway_process, fake_servers, path):
    gateway, server = gateway_process(CLIENT_BODY_TIMEOUT="1"), fake_servers("B1")
    register(gateway, server)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode())
        for _ in range(25):  # a byte every 0.2 s: each read is quick, the whole body never comes
            if select.select([sock], [], [], 0.2)[0]:
                break
            sock.sendall(b"x")
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"did not all arrive within 1s" in answer
    assert not [r for r in server.requests if r["path"] == "/api/echo"]


def test_two_thousand_slow_bodies_leave_the_gateway_answering(gateway_process, fake_servers):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4500:
        pytest.skip(f"needs 4,500 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4500), hard))
    gateway = gateway_process(CLIENT_BODY_TIMEOUT="30", CLIENT_MAX_CONNECTIONS="0")
    server = fake_servers("B1")
    register(gateway, server)
    slow: list[socket.socket] = []
    try:
        for _ in range(2000):
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
            sock.sendall(b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nx")
            slow.append(sock)
        time.sleep(0.5)  # every one of them has its head read and waits in its body
        for _ in range(3):  # a bound on the wait, not a measurement: each must be answered within a second
            assert requests.get(gateway.url + "/health", timeout=1).status_code == 200
            assert requests.get(gateway.url + "/api/echo", timeout=1).json()["server_id"] == "B1"
    finally:
        for sock in slow:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
