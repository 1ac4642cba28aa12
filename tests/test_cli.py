"""The command-line client, run as a user runs it, against real gateways on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, free_port

import test_b_client as b_client

ROOT = Path(__file__).resolve().parent.parent
WRONG_SECRET = "not-the-secret-93b1d7"


def run_cli(*args: str, secret: str | None = SECRET, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a subprocess; `secret` goes on the command line. No secret may reach its output."""
    clean_env = {k: v for k, v in os.environ.items() if k not in ("WEBHOOK_SECRET", "GATEWAY_URL")}
    command = [sys.executable, "test_b_client.py", *args]
    if secret is not None:
        command += ["--secret", secret]
    result = subprocess.run(command, cwd=ROOT, env={**clean_env, **env}, capture_output=True, text=True, timeout=30)
    for value in (SECRET, WRONG_SECRET):
        assert value not in result.stdout + result.stderr
    return result


def register_args(gateway_url: str, server_id: str, port: int, ip: str = "127.0.0.1") -> list[str]:
    return ["register", "--gateway", gateway_url, "--server-id", server_id, "--ip", ip, "--port", str(port)]


# -- the main flows -----------------------------------------------------------------------


def test_register_update_and_unregister(live_gateway, fake_servers):
    gateway, b1 = live_gateway(), fake_servers("B1")

    result = run_cli(*register_args(gateway.url, "B1", b1.port))
    assert (result.returncode, result.stdout, result.stderr) == (0, "server B1 registered\n", "")
    server = gateway.manager.get_server("B1")
    assert (server.ip, server.port) == ("127.0.0.1", b1.port)

    moved = fake_servers("B1")
    result = run_cli(*register_args(gateway.url, "B1", moved.port))
    assert (result.returncode, result.stdout) == (0, "server B1 updated\n")
    assert gateway.manager.get_server("B1").port == moved.port

    result = run_cli("unregister", "--gateway", gateway.url, "--server-id", "B1")
    assert (result.returncode, result.stdout, result.stderr) == (0, "server B1 unregistered\n", "")
    assert gateway.manager.get_server("B1") is None


def test_list_shows_a_table_and_a_summary(live_gateway, fake_servers):
    gateway = live_gateway()
    b1, b2 = fake_servers("B1"), fake_servers("B2")
    gateway.register(b1)
    gateway.register(b2)
    b2.stop()
    for _ in range(3):
        gateway.manager.run_health_sweep()

    result = run_cli("list", "--gateway", gateway.url)

    assert result.returncode == 0, result.stderr
    header, row1, row2, summary = result.stdout.splitlines()
    assert header.split() == ["ID", "ADDRESS", "HEALTH", "FAILS", "LAST", "CHECK", "LAST", "USED"]
    assert row1.split()[:4] == ["B1", f"127.0.0.1:{b1.port}", "healthy", "0"]
    assert row2.split()[:4] == ["B2", f"127.0.0.1:{b2.port}", "UNHEALTHY", "3"]
    assert row2.split()[-1] == "never"  # never chosen for a request
    assert row1.index("HEALTHY".lower()) == header.index("HEALTH")  # columns line up
    assert summary == "2 servers: 1 healthy, 1 unhealthy; health checks running"


def test_list_of_an_empty_fleet_is_one_line(live_gateway):
    result = run_cli("list", "--gateway", live_gateway().url)
    assert (result.returncode, result.stdout) == (0, "0 servers: 0 healthy, 0 unhealthy; health checks stopped\n")


def test_list_json_prints_the_gateway_reply(live_gateway, fake_servers):
    gateway = live_gateway()
    gateway.register(fake_servers("B1"))

    result = run_cli("list", "--gateway", gateway.url, "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"success": True, "data": gateway.manager.get_status()}
    assert result.stdout.startswith('{\n  "success": true,')


def test_secret_and_gateway_come_from_the_environment(live_gateway, fake_servers):
    gateway, b1 = live_gateway(), fake_servers("B1")
    env = {"WEBHOOK_SECRET": SECRET, "GATEWAY_URL": gateway.url + "/"}

    result = run_cli("register", "--server-id", "B1", "--ip", "127.0.0.1", "--port", str(b1.port), secret=None, **env)
    assert result.returncode == 0, result.stderr
    assert gateway.manager.get_server("B1") is not None

    result = run_cli("list", secret=None, **env)
    assert (result.returncode, result.stdout.splitlines()[-1]) == (
        0,
        "1 server: 1 healthy, 0 unhealthy; health checks running",
    )


# -- usage errors: exit status 2, and nothing is sent -------------------------------------


def test_missing_secret_is_a_usage_error(live_gateway):
    gateway = live_gateway()
    result = run_cli(*register_args(gateway.url, "B1", 8000), secret=None)
    assert result.returncode == 2
    assert "Missing option '--secret'" in result.stderr
    assert "WEBHOOK_SECRET" in result.stderr
    assert gateway.manager.list_servers() == []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (("--port", "70000"), "Invalid value for '--port': 70000 is not in the range 1<=x<=65535"),
        (("--port", "0"), "Invalid value for '--port': 0 is not in the range"),
        (("--port", "http"), "Invalid value for '--port': 'http' is not a valid integer"),
        (("--gateway", "127.0.0.1:5000"), "Invalid value for '--gateway' (env var: 'GATEWAY_URL'): must be a URL"),
        (("--gateway", "ftp://127.0.0.1"), "Invalid value for '--gateway' (env var: 'GATEWAY_URL'): must be a URL"),
        (("--timeout", "0"), "Invalid value for '--timeout': 0.0 is not in the range x>0"),
    ],
    ids=["port-too-high", "port-zero", "port-not-a-number", "gateway-no-scheme", "gateway-ftp", "timeout-zero"],
)
def test_bad_options_are_usage_errors(live_gateway, override, expected):
    gateway = live_gateway()
    args = register_args(gateway.url, "B1", 8000)
    option, value = override
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]

    result = run_cli(*args)

    assert result.returncode == 2
    assert expected in result.stderr
    assert gateway.manager.list_servers() == []


# -- refusals: exit status 1, the gateway's message on stderr -----------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["register", "--server-id", "B1", "--ip", "127.0.0.1", "--port", "8000"],
        ["unregister", "--server-id", "B1"],
        ["list"],
        ["list", "--json"],
    ],
)
def test_wrong_secret_is_refused(live_gateway, args):
    gateway = live_gateway()
    result = run_cli(*args, "--gateway", gateway.url, secret=WRONG_SECRET)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "error 401: missing or invalid secret\n")
    assert gateway.manager.list_servers() == []


@pytest.mark.parametrize(
    ("server_id", "ip", "expected"),
    [
        ("B1", "169.254.169.254", "error 400: invalid fields: ip\n  ip: 169.254.169.254 is a link-local"),
        ("no spaces", "127.0.0.1", "error 400: invalid fields: server_id\n  server_id: must be 1-64 characters"),
        ("no spaces", "224.0.0.1", "error 400: invalid fields: ip, server_id\n  ip: 224.0.0.1 is a link-local"),
    ],
)
def test_invalid_fields_are_listed(live_gateway, server_id, ip, expected):
    gateway = live_gateway()
    result = run_cli(*register_args(gateway.url, server_id, 8000, ip=ip))
    assert result.returncode == 1
    assert result.stderr.startswith(expected)
    assert gateway.manager.list_servers() == []


def test_unregister_of_an_unknown_server_is_refused(live_gateway):
    result = run_cli("unregister", "--gateway", live_gateway().url, "--server-id", "B9")
    assert (result.returncode, result.stderr) == (1, "error 404: server B9 is not registered\n")


def test_a_gpu_server_is_not_taken_for_the_gateway(fake_servers):
    gpu = fake_servers("B1")  # answers any path with 200 JSON, but not the gateway's
    result = run_cli("list", "--gateway", f"http://127.0.0.1:{gpu.port}")
    assert result.returncode == 1
    assert "error 200: the reply does not say success; is --gateway the gateway's address?" in result.stderr


# -- an unreachable or silent gateway: exit status 3 --------------------------------------


def test_unreachable_gateway(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("list", "--gateway", url)
    assert (result.returncode, result.stdout) == (3, "")
    assert result.stderr == f"cannot reach gateway at {url}: Connection refused\n"


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A socket that accepts connections (in the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_gateway_that_does_not_answer_times_out(silent_listener):
    result = run_cli("list", "--gateway", silent_listener, "--timeout", "0.5")
    assert result.returncode == 3
    assert result.stderr == f"gateway at {silent_listener} did not answer within 0.5 s\n"


# -- replies a proxy in front of the gateway might give -----------------------------------


class StubGateway(ThreadingHTTPServer):
    """Answers every request with one canned reply and records what it was sent."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.reply: tuple[int, dict[str, str], bytes] = (200, {}, b"")
        self.received: list[dict[str, Any]] = []

    def answer(self, status: int, body: Any, content_type: str = "application/json", **headers: str) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.reply = (status, {"Content-Type": content_type, **headers}, data)


class StubHandler(BaseHTTPRequestHandler):
    server: StubGateway

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.received.append({"method": self.command, "path": self.path, "headers": self.headers, "body": body})
        status, headers, data = self.server.reply
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET


@pytest.fixture
def stub_gateway() -> Iterator[StubGateway]:
    server = StubGateway()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_secret_travels_in_a_header_never_in_the_url_or_body(stub_gateway):
    stub_gateway.answer(200, {"success": True, "message": "ok", "data": {"servers": []}})

    assert run_cli("list", "--gateway", stub_gateway.url).returncode == 0
    assert run_cli(*register_args(stub_gateway.url, "B1", 8000)).returncode == 0

    listed, registered = stub_gateway.received
    assert (listed["method"], listed["path"]) == ("GET", "/webhook/servers")
    assert listed["headers"]["X-Webhook-Secret"] == SECRET
    assert (registered["method"], registered["path"]) == ("POST", "/webhook/register")
    assert registered["headers"]["X-Webhook-Secret"] == SECRET
    assert registered["body"] == {"server_id": "B1", "ip": "127.0.0.1", "port": 8000}


def test_a_non_json_reply_is_reported(stub_gateway):
    stub_gateway.answer(502, b"<html><body>502 Bad Gateway</body></html>", "text/html")
    result = run_cli("list", "--gateway", stub_gateway.url)
    assert result.returncode == 1
    assert result.stderr == (
        f"error 502: the reply from {stub_gateway.url} is not the gateway's JSON (text/html); check --gateway\n"
    )


def test_a_redirect_is_reported_not_followed(stub_gateway):
    stub_gateway.answer(301, b"", "text/html", Location="https://gateway.example.com/webhook/register")
    result = run_cli(*register_args(stub_gateway.url, "B1", 8000))
    assert result.returncode == 1
    assert "error 301: the gateway redirects to https://gateway.example.com/webhook/register" in result.stderr
    assert len(stub_gateway.received) == 1


def test_a_busy_gateway_says_when_to_retry(stub_gateway):
    body = {"success": False, "message": "could not save the server list: No space left on device; try again"}
    stub_gateway.answer(503, {**body, "errors": None}, **{"Retry-After": "5"})
    result = run_cli(*register_args(stub_gateway.url, "B1", 8000))
    assert (result.returncode, result.stderr) == (
        1,
        "error 503: could not save the server list: No space left on device; try again\n"
        "  the gateway asks to retry after 5 s\n",
    )


# -- formatting, in-process ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("errors", "lines"),
    [
        (None, []),
        ({}, []),
        ({"port": ["must be an integer from 1 to 65535."]}, ["port: must be an integer from 1 to 65535."]),
        ({"ip": ["a", "b"], "server_id": ["c"]}, ["ip: a b", "server_id: c"]),
        ({"servers": {"0": {"port": ["bad"]}}}, ["servers.0.port: bad"]),
        ("something broke", ["something broke"]),
        ({"n": [1, 2]}, ["n: [1, 2]"]),
    ],
)
def test_field_messages(errors, lines):
    assert b_client.field_messages(errors) == lines


def test_table_brackets_ipv6_and_shows_never():
    server = {"server_id": "B6", "ip": "::1", "port": 8000, "is_healthy": True, "fail_count": 0}
    assert b_client.server_row(server) == ("B6", "[::1]:8000", "healthy", "0", "never", "never")


def test_status_summarises_the_gateway(live_gateway, fake_servers):
    gateway = live_gateway()
    gateway.register(fake_servers("B1"))
    gateway.manager.run_health_sweep()
    result = run_cli("status", "--gateway", gateway.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("version ")
    assert "routing round_robin" in lines[0]
    assert lines[1] == "1 server: 1 healthy, 0 unhealthy; health checks running"
    assert lines[2].startswith("last sweep ")
    assert lines[3] == "0 requests proxied"
    as_json = run_cli("status", "--gateway", gateway.url, "--json")
    assert json.loads(as_json.stdout)["data"]["servers"]["total_servers"] == 1


def test_status_with_a_wrong_secret_fails(live_gateway):
    result = run_cli("status", "--gateway", live_gateway().url, secret=WRONG_SECRET)
    assert result.returncode == 1
    assert "error 401" in result.stderr
