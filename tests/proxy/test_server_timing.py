"""Server-Timing on proxied answers: what the gateway itself took, apart from the servers and the client."""

from __future__ import annotations

import re
import socket
import time

import pytest
import requests
from conftest import SECRET, RawServer

TIMING = re.compile(r"^gateway;dur=(\d+\.\d\d)(?:, upstream;dur=(\d+\.\d\d))?(?:, client;dur=(\d+\.\d\d))?$")


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def slow_answer(conn: socket.socket) -> None:
    """Answer after 0.25 s, with a Server-Timing of its own; chunked when the path says /stream."""
    head = read_head(conn)
    time.sleep(0.25)
    if head.startswith(b"GET /api/stream"):
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nServer-Timing: db;dur=3\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )
    else:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer-Timing: db;dur=3\r\n\r\nok")


def timings(response: requests.Response) -> list[str]:
    return response.raw.headers.getlist("Server-Timing")


def ours(response: requests.Response) -> tuple[float, float | None, float | None]:
    match = TIMING.match(timings(response)[-1])
    assert match, timings(response)
    gateway, upstream, client = match.groups()
    return float(gateway), upstream and float(upstream), client and float(client)  # type: ignore[return-value]


@pytest.fixture
def slow_backend():
    backend = RawServer(slow_answer)
    yield backend
    backend.close()


def register(gateway, port: int) -> None:
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": port, "secret": SECRET}
    requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()


@pytest.mark.parametrize("path", ["/api/x", "/api/stream"])
def test_an_answer_says_what_the_gateway_and_the_server_took(gateway_process, slow_backend, path):
    gateway = gateway_process()
    register(gateway, slow_backend.port)
    response = requests.get(gateway.url + path, timeout=10)
    assert response.status_code == 200
    assert response.content == b"ok"
    assert timings(response)[0] == "db;dur=3"  # the server's own is kept; ours is one more
    gateway_ms, upstream_ms, client_ms = ours(response)
    assert upstream_ms is not None and upstream_ms >= 250  # the server's wait is the server's, not ours
    assert gateway_ms >= 0
    assert client_ms is None  # a GET sends no body


def test_a_body_the_client_sends_slowly_is_the_clients_time(gateway_process, slow_backend):
    gateway = gateway_process()
    register(gateway, slow_backend.port)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as conn:
        conn.sendall(b"POST /api/x HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\nConnection: close\r\n\r\nab")
        time.sleep(0.5)
        conn.sendall(b"cd")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    values = [line.split(b": ", 1)[1].decode() for line in answer.split(b"\r\n") if line.startswith(b"Server-Timing")]
    match = TIMING.match(values[-1])
    assert match and match.group(3), values
    # Most of the client's 0.5 s pause (the gateway began to wait a little after the first bytes came).
    assert float(match.group(3)) >= 250
    assert float(match.group(2)) >= 250  # the server's


def test_an_answer_of_the_gateways_own_has_no_upstream_part(live_gateway):
    gateway = live_gateway()
    response = requests.get(gateway.url + "/api/x", timeout=5)  # no server registered
    assert response.status_code == 503
    gateway_ms, upstream_ms, _ = ours(response)
    assert gateway_ms >= 0 and upstream_ms is None


def hang_up_late(conn: socket.socket) -> None:
    """Read the request, wait 0.3 s, and close without an answer."""
    read_head(conn)
    time.sleep(0.3)


def test_every_try_counts_as_the_servers_time(live_gateway, slow_backend):
    """A GET that a first server dropped is tried on a second: both waits are the servers' time."""
    gateway, dropping = live_gateway(), RawServer(hang_up_late)
    try:
        for server_id, port in (("B0", dropping.port), ("B1", slow_backend.port)):
            body = {"server_id": server_id, "ip": "127.0.0.1", "port": port, "secret": SECRET}
            requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()
        response = requests.get(gateway.url + "/api/x", timeout=10)  # B0's turn first
        assert response.headers["X-Backend-Server"] == "B1"
        assert ours(response)[1] >= 550  # type: ignore[operator]
    finally:
        dropping.close()
