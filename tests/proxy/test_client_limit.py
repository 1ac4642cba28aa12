"""CLIENT_MAX_CONNECTIONS: one address holds at most so many requests in progress."""

from __future__ import annotations

import socket

import pytest
import requests
from conftest import wait_until

from gateway.proxy.client_limit import ClientLimit


def slow_body(gateway, headers: bytes = b"") -> socket.socket:
    """A request whose body never comes: it stays in progress until closed."""
    port = int(gateway.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n" + headers + b"\r\nx")
    return sock


def limiter(app) -> ClientLimit:
    layer = app.wsgi_app
    while not isinstance(layer, ClientLimit):
        layer = layer.app
    return layer


def test_a_client_at_its_cap_gets_429_at_once_and_its_slots_come_back(live_gateway, fake_servers):
    gateway = live_gateway(client_max_connections=3)
    gateway.register(fake_servers("B1"))
    held = [slow_body(gateway) for _ in range(3)]
    try:
        assert wait_until(lambda: limiter(gateway.app).active.get("127.0.0.1") == 3)
        refused = requests.get(gateway.url + "/api/echo", timeout=5)
        assert refused.status_code == 429
        assert "3 requests in progress" in refused.json()["message"]
        assert refused.headers["Retry-After"] == "1"
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: "127.0.0.1" not in limiter(gateway.app).active)  # freed whatever their ending
    assert requests.get(gateway.url + "/api/echo", timeout=5).status_code == 200
    for path in ("/health", "/api/status-code?code=500", "/api/nope/../x", "/webhook/servers"):
        requests.get(gateway.url + path, timeout=5)
    assert wait_until(lambda: limiter(gateway.app).active == {})


def test_behind_a_trusted_proxy_each_client_is_counted_apart(live_gateway, fake_servers):
    gateway = live_gateway(client_max_connections=2, trusted_proxy_count=1)
    gateway.register(fake_servers("B1"))
    held = [slow_body(gateway, b"X-Forwarded-For: 203.0.113.7\r\n") for _ in range(2)]
    try:
        assert wait_until(lambda: limiter(gateway.app).active.get("203.0.113.7") == 2)
        other = requests.get(gateway.url + "/api/echo", headers={"X-Forwarded-For": "198.51.100.2"}, timeout=5)
        assert other.status_code == 200  # the proxy's own address is not what is counted
        same = requests.get(gateway.url + "/api/echo", headers={"X-Forwarded-For": "203.0.113.7"}, timeout=5)
        assert same.status_code == 429
    finally:
        for sock in held:
            sock.close()


class Boom(Exception):
    pass


@pytest.mark.parametrize("where", ["call", "iterate", "close"])
def test_the_count_comes_back_whatever_breaks(where):
    class Answer:
        def __iter__(self):
            if where == "iterate":
                raise Boom()
            yield b"x"

        def close(self):
            if where == "close":
                raise Boom()

    def app(environ, start_response):
        if where == "call":
            raise Boom()
        return Answer()

    limit = ClientLimit(app, 1)
    with pytest.raises(Boom):
        answer = limit({"REMOTE_ADDR": "192.0.2.1"}, lambda *a: None)
        try:
            list(answer)
        finally:
            answer.close()
    assert limit.active == {}
