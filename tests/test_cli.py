"""The command-line client, run as a user runs it, against real gateways on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from cli_running import ADMIN, WRONG_SECRET, admin_cli, run_cli
from conftest import SECRET, free_port

from gateway import cli as b_client
from gateway.client import field_messages


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
    assert header.split() == [
        "ID", "ADDRESS", "TYPE", "HEALTH", "DRAINING", "PRIORITY", "WEIGHT", "MODELS", "LOADED", "FAILS",
        "LAST", "CHECK", "LAST", "USED",
    ]  # fmt: skip
    assert row1.split()[:10] == ["B1", f"127.0.0.1:{b1.port}", "gpu", "healthy", "no", "1", "1", "unknown", "-", "0"]
    assert row2.split()[:10] == ["B2", f"127.0.0.1:{b2.port}", "gpu", "UNHEALTHY", "no", "1", "1", "unknown", "-", "3"]
    assert row2.split()[-1] == "never"  # never chosen for a request
    assert row1.index("HEALTHY".lower()) == header.index("HEALTH")  # columns line up
    assert summary == "2 servers: 1 healthy, 1 unhealthy; health checks running"


def test_list_shows_each_servers_draining_priority_weight_and_models(live_gateway, fake_servers):
    gateway = live_gateway()
    gateway.register(fake_servers("B1"))
    gateway.register(fake_servers("B2"))
    gateway.manager.update_server("B2", {"weight": 70, "priority": 2, "models": ["qwen3:14b", "llama3:8b"]})
    gateway.manager.set_draining("B2", True)

    result = run_cli("list", "--gateway", gateway.url)

    assert result.returncode == 0, result.stderr
    header, row1, row2, _ = result.stdout.splitlines()
    assert row1.split()[3:8] == ["healthy", "no", "1", "1", "unknown"]
    assert row2.split()[3:8] == ["healthy", "yes", "2", "70", "qwen3:14b,llama3:8b"]
    assert row2.index("yes") == header.index("DRAINING")  # columns line up


def test_list_shows_each_servers_type_and_the_models_it_has_loaded(live_gateway, fake_servers):
    gateway = live_gateway()
    b1, b2 = fake_servers("B1"), fake_servers("B2")
    gateway.register(b1)
    gateway.register(b2)
    gateway.manager.update_server("B2", {"type": "cpu", "models": ["qwen3:14b", "llama3:8b"]})
    gateway.manager.apply_loaded([("B2", f"http://127.0.0.1:{b2.port}", [("qwen3:14b", 9 * 1024**3)])])

    result = run_cli("list", "--gateway", gateway.url)

    assert result.returncode == 0, result.stderr
    header, row1, row2, _ = result.stdout.splitlines()
    assert row1.split()[2:3] + row1.split()[7:9] == ["gpu", "unknown", "-"]  # nothing read: nothing shown
    assert row2.split()[2:3] + row2.split()[7:9] == ["cpu", "qwen3:14b,llama3:8b", "qwen3:14b"]
    assert row2.index("cpu") == header.index("TYPE")  # columns line up
    assert row2.rindex("qwen3:14b") == header.index("LOADED")


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

    do_POST = do_PATCH = do_GET


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
    assert field_messages(errors) == lines


def test_table_brackets_ipv6_and_shows_never():
    server = {"server_id": "B6", "ip": "::1", "port": 8000, "is_healthy": True, "fail_count": 0, "draining": False}
    server |= {"priority": 1, "weight": 1, "served_models": []}
    server |= {"type": "gpu", "loaded_models": []}
    row = ("B6", "[::1]:8000", "gpu", "healthy", "no", "1", "1", "unknown", "-", "0", "never", "never")
    assert b_client.server_row(server) == row


def test_table_shows_a_question_mark_for_what_the_gateway_does_not_say():
    server = {"server_id": "B6", "ip": "127.0.0.1", "port": 8000, "is_healthy": True, "fail_count": 0}
    row = b_client.server_row(server)
    assert (row[2], *row[4:9]) == ("?", "?", "?", "?", "?", "?")


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


# -- routing options at registration ------------------------------------------------------


def test_register_sends_the_routing_options(live_gateway):
    gateway = live_gateway()
    options = ["--weight", "5", "--priority", "2", "--max-concurrent", "3", "--model", "a", "--model", "b:7b"]
    options += ["--model-map", "v=b:7b", "--model-map", "w=a", "--label", "zone=eu", "--label", "spare="]

    result = run_cli(*register_args(gateway.url, "B1", 8000), *options)

    assert (result.returncode, result.stdout, result.stderr) == (0, "server B1 registered\n", "")
    assert gateway.manager.get_server("B1").options() == {
        "weight": 5,
        "priority": 2,
        "max_concurrent": 3,
        "models": ["a", "b:7b"],
        "model_map": {"v": "b:7b", "w": "a"},
        "labels": {"zone": "eu", "spare": ""},
        "model_memory_gb": {},
        "type": "gpu",
        "description": "",
        "skip_resource_check": False,
        "max_allocations": 0,
    }


def test_register_sends_only_the_options_given(stub_gateway):
    stub_gateway.answer(200, {"success": True, "message": "ok"})

    assert run_cli(*register_args(stub_gateway.url, "B1", 8000), "--priority", "2").returncode == 0

    (sent,) = stub_gateway.received
    assert sent["body"] == {"server_id": "B1", "ip": "127.0.0.1", "port": 8000, "priority": 2}


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--weight", "heavy", "Invalid value for '--weight': 'heavy' is not a valid integer"),
        ("--priority", "1.5", "Invalid value for '--priority': '1.5' is not a valid integer"),
        ("--max-concurrent", "", "Invalid value for '--max-concurrent': '' is not a valid integer"),
        ("--model-map", "qwen3", "Invalid value for '--model-map': 'qwen3' is not of the form VIRTUAL=ACTUAL"),
        ("--model-map", "=qwen3:14b", "Invalid value for '--model-map': '=qwen3:14b' is not of the form"),
        ("--model-map", "qwen3=", "Invalid value for '--model-map': 'qwen3=' is not of the form VIRTUAL=ACTUAL"),
        ("--label", "zone", "Invalid value for '--label': 'zone' is not of the form KEY=VALUE"),
        ("--label", "=eu", "Invalid value for '--label': '=eu' is not of the form KEY=VALUE"),
    ],
)
def test_bad_option_forms_are_usage_errors(live_gateway, option, value, expected):
    gateway = live_gateway()

    result = run_cli(*register_args(gateway.url, "B1", 8000), option, value)

    assert result.returncode == 2
    assert expected in result.stderr
    assert gateway.manager.list_servers() == []


@pytest.mark.parametrize("option", ["--model-map", "--label"])
def test_a_repeated_name_is_a_usage_error(live_gateway, option):
    gateway = live_gateway()

    result = run_cli(*register_args(gateway.url, "B1", 8000), option, "a=1", option, "a=2")

    assert result.returncode == 2
    assert f"Invalid value for '{option}': 'a' is given twice" in result.stderr
    assert gateway.manager.list_servers() == []


def test_an_option_out_of_range_is_the_gateways_refusal(live_gateway):
    gateway = live_gateway()

    result = run_cli(*register_args(gateway.url, "B1", 8000), "--weight", "0")

    assert result.returncode == 1
    assert result.stderr.startswith("error 400: invalid fields: weight\n  weight: must be an integer from 1 to 1000.")
    assert gateway.manager.list_servers() == []


def stored(gateway, server_id: str = "B1", token: str | None = None) -> dict[str, Any]:
    """The server as the admin API shows it: what the gateway kept."""
    headers = {"Authorization": f"Bearer {token}"} if token else {"X-Webhook-Secret": SECRET}
    response = requests.get(f"{gateway.url}/admin/servers/{server_id}", headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_register_sends_seed_001s_fields_the_cap_the_location_and_the_monitor(live_gateway):
    gateway = live_gateway()
    options = ["--model-memory", "qwen3:14b=24", "--model-memory", "llama3:8b=7.5", "--type", "CPU"]
    options += ["--description", "A100 80GB, rack 3", "--skip-resource-check", "--max-allocations", "4"]
    options += ["--location", "eu-west", "--label", "zone=a", "--monitor-port", "9100"]

    result = run_cli(*register_args(gateway.url, "B1", 8000), *options)

    assert (result.returncode, result.stdout, result.stderr) == (0, "server B1 registered\n", "")
    server = stored(gateway)
    assert server["model_memory_gb"] == {"qwen3:14b": 24, "llama3:8b": 7.5}
    assert (server["type"], server["description"]) == ("cpu", "A100 80GB, rack 3")
    assert (server["skip_resource_check"], server["max_allocations"]) == (True, 4)
    assert server["labels"] == {"zone": "a", "location": "eu-west"}
    assert server["monitor_url"] == "http://127.0.0.1:9100"


def test_register_takes_a_monitor_url(live_gateway):
    gateway = live_gateway()

    result = run_cli(*register_args(gateway.url, "B1", 8000), "--monitor-url", "http://127.0.0.1:9200/")

    assert result.returncode == 0, result.stderr
    assert stored(gateway)["monitor_url"] == "http://127.0.0.1:9200"


def test_register_sends_the_new_options_as_the_schema_has_them(stub_gateway):
    stub_gateway.answer(200, {"success": True, "message": "ok"})
    options = ["--model-memory", "a=24", "--model-memory", "b=0.5", "--type", "GPU", "--check-resources"]
    options += ["--description", "", "--max-allocations", "0", "--location", "us", "--monitor-url", "http://h:1"]

    assert run_cli(*register_args(stub_gateway.url, "B1", 8000), *options).returncode == 0

    (sent,) = stub_gateway.received
    assert sent["body"] == {
        "server_id": "B1",
        "ip": "127.0.0.1",
        "port": 8000,
        "monitor_url": "http://h:1",
        "model_memory_gb": {"a": 24, "b": 0.5},
        "type": "gpu",
        "description": "",
        "skip_resource_check": False,
        "max_allocations": 0,
        "labels": {"location": "us"},
    }
    assert isinstance(sent["body"]["model_memory_gb"]["a"], int)  # 24 as written, not 24.0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model-memory", "qwen3"], "Invalid value for '--model-memory': 'qwen3' is not of the form MODEL=GB"),
        (["--model-memory", "q=0"], "Invalid value for '--model-memory': the GB of q must be a number above 0"),
        (["--model-memory", "q=-2"], "Invalid value for '--model-memory': the GB of q must be a number above 0"),
        (["--model-memory", "q=nan"], "Invalid value for '--model-memory': the GB of q must be a number above 0"),
        (["--model-memory", "q=inf"], "Invalid value for '--model-memory': the GB of q must be a number above 0"),
        (["--model-memory", "q=100001"], "Invalid value for '--model-memory': the GB of q must be a number above 0"),
        (["--model-memory", "q=24GB"], "Invalid value for '--model-memory': the GB of q is not a number: '24GB'"),
        (["--model-memory", "q=1", "--model-memory", "q=2"], "Invalid value for '--model-memory': 'q' is given twice"),
        (["--type", "tpu"], "Invalid value for '--type': 'tpu' is not one of 'cpu', 'gpu'"),
        (["--max-allocations", "many"], "Invalid value for '--max-allocations': 'many' is not a valid integer"),
        (["--monitor-port", "0"], "Invalid value for '--monitor-port': 0 is not in the range 1<=x<=65535"),
        (["--monitor-port", "1", "--monitor-url", "http://h:1"], "Invalid value for '--monitor-url': give"),
        (["--location", "eu", "--label", "location=us"], "Invalid value for '--location': give the location once"),
    ],
    ids=[
        "memory-form", "memory-zero", "memory-negative", "memory-nan", "memory-inf", "memory-too-much",
        "memory-not-a-number", "memory-twice", "type", "max-allocations", "monitor-port", "monitor-both",
        "location-twice",
    ],
)  # fmt: skip
def test_bad_new_option_values_are_usage_errors_naming_the_option(live_gateway, args, expected):
    gateway = live_gateway()

    result = run_cli(*register_args(gateway.url, "B1", 8000), *args)

    assert result.returncode == 2
    assert expected in result.stderr
    assert gateway.manager.list_servers() == []


# -- operator commands: drain, enable, set, priority ---------------------------------------


@pytest.fixture
def admin_gateway(live_gateway, fake_servers):
    """A live gateway with ADMIN_TOKEN set and B1 registered, serving model m1."""
    gateway = live_gateway(admin_token=ADMIN)
    gateway.register(fake_servers("B1"))
    gateway.manager.update_server("B1", {"models": ["m1"]})
    return gateway


def test_drain_and_enable(admin_gateway):
    url = admin_gateway.url

    result = admin_cli("drain", "B1", "--gateway", url)
    assert (result.returncode, result.stdout, result.stderr) == (0, "server B1 draining\n", "")
    assert admin_gateway.manager.get_server("B1").draining is True
    assert admin_cli("drain", "B1", "--gateway", url).returncode == 0  # idempotent

    result = admin_cli("enable", "B1", "--gateway", url)
    assert (result.returncode, result.stdout, result.stderr) == (0, "server B1 enabled\n", "")
    assert admin_gateway.manager.get_server("B1").draining is False


def test_set_changes_only_the_options_given(admin_gateway):
    result = admin_cli("set", "B1", "--gateway", admin_gateway.url, "--weight", "40", "--label", "zone=eu")

    assert (result.returncode, result.stdout, result.stderr) == (0, "server B1 updated: weight, labels\n", "")
    server = admin_gateway.manager.get_server("B1")
    assert (server.weight, server.labels, server.models, server.priority) == (40, {"zone": "eu"}, ["m1"], 1)


def test_set_changes_the_new_options_and_turns_the_resource_check_back_on(admin_gateway):
    url = admin_gateway.url
    options = ["--model-memory", "m1=12", "--type", "cpu", "--description", "spare box", "--skip-resource-check"]
    options += ["--max-allocations", "8", "--location", "eu-west"]

    result = admin_cli("set", "B1", "--gateway", url, *options)

    assert result.returncode == 0, result.stderr
    message, _, changed = result.stdout.rstrip("\n").partition(": ")
    assert message == "server B1 updated"
    assert sorted(changed.split(", ")) == sorted(
        ["max_allocations", "model_memory_gb", "labels", "type", "description", "skip_resource_check"]
    )
    server = stored(admin_gateway, token=ADMIN)
    assert (server["model_memory_gb"], server["type"], server["description"]) == ({"m1": 12}, "cpu", "spare box")
    assert (server["skip_resource_check"], server["max_allocations"]) == (True, 8)
    assert (server["labels"], server["models"]) == ({"location": "eu-west"}, ["m1"])

    result = admin_cli("set", "B1", "--gateway", url, "--check-resources")
    assert (result.returncode, result.stdout) == (0, "server B1 updated: skip_resource_check\n")
    server = stored(admin_gateway, token=ADMIN)
    assert (server["skip_resource_check"], server["type"], server["max_allocations"]) == (False, "cpu", 8)


def test_set_refuses_what_the_gateway_refuses(admin_gateway):
    result = admin_cli("set", "B1", "--gateway", admin_gateway.url, "--max-allocations", "-1")

    assert result.returncode == 1
    assert result.stderr.startswith("error 400: invalid fields: max_allocations\n  max_allocations: must be")
    assert stored(admin_gateway, token=ADMIN)["max_allocations"] == 0


def test_set_without_options_is_a_usage_error(admin_gateway):
    result = admin_cli("set", "B1", "--gateway", admin_gateway.url)

    assert result.returncode == 2
    assert "Nothing to change: give --weight" in result.stderr
    for flag in ("--model-memory", "--type", "--description", "--skip-resource-check", "--max-allocations"):
        assert flag in result.stderr


@pytest.mark.parametrize(
    "args",
    [["drain", "B9"], ["enable", "B9"], ["set", "B9", "--weight", "2"]],
    ids=["drain", "enable", "set"],
)
def test_an_unknown_server_is_refused(admin_gateway, args):
    result = admin_cli(*args, "--gateway", admin_gateway.url)

    assert (result.returncode, result.stdout, result.stderr) == (1, "", "error 404: server B9 is not registered\n")


def test_priority_prints_the_check(admin_gateway, fake_servers):
    admin_gateway.register(fake_servers("B2"))
    admin_gateway.manager.update_server("B2", {"models": ["m1"], "priority": 2, "max_concurrent": 4})
    admin_gateway.manager.set_draining("B1", True)

    result = admin_cli("priority", "m1", "--gateway", admin_gateway.url)

    assert result.returncode == 0, result.stderr
    first, header, b1, b2 = result.stdout.splitlines()
    assert first == "m1: tier 2 serves it now"
    assert header.split() == ["TIER", "ID", "STATE", "MODEL", "WEIGHT", "IN", "FLIGHT"]
    assert b1.split() == ["1", "B1", "draining", "m1", "1", "0/unlimited"]
    assert b2.split() == ["2", "B2", "available", "m1", "1", "0/4"]
    as_json = admin_cli("priority", "m1", "--gateway", admin_gateway.url, "--json")
    assert json.loads(as_json.stdout)["data"] == admin_gateway.manager.priority_check("m1")


def test_priority_of_an_unknown_model(admin_gateway):
    result = admin_cli("priority", "nope", "--gateway", admin_gateway.url)

    assert (result.returncode, result.stdout) == (0, "nope: no registered server serves this model\n")


@pytest.mark.parametrize(
    "args",
    [["drain", "B1"], ["enable", "B1"], ["set", "B1", "--weight", "2"], ["priority", "m1"], ["status"]],
    ids=["drain", "enable", "set", "priority", "status"],
)
def test_the_webhook_secret_is_refused_when_an_admin_token_is_set(admin_gateway, args):
    before = admin_gateway.manager.get_server("B1")

    result = run_cli(*args, "--gateway", admin_gateway.url)  # --secret SECRET only

    assert result.returncode == 1
    assert result.stderr.startswith("error 401: missing or invalid admin token")
    assert admin_gateway.manager.get_server("B1") == before


def test_the_admin_token_comes_from_the_environment(admin_gateway):
    result = run_cli("drain", "B1", secret=None, ADMIN_TOKEN=ADMIN, GATEWAY_URL=admin_gateway.url)

    assert result.returncode == 0, result.stderr
    assert admin_gateway.manager.get_server("B1").draining is True


def test_without_an_admin_token_the_secret_is_used(live_gateway, fake_servers):
    gateway = live_gateway()  # ADMIN_TOKEN unset: the webhook secret opens /admin
    gateway.register(fake_servers("B1"))

    result = run_cli("drain", "B1", "--gateway", gateway.url)

    assert (result.returncode, result.stdout) == (0, "server B1 draining\n")
    assert gateway.manager.get_server("B1").draining is True


def test_an_operator_command_without_a_credential_is_a_usage_error(admin_gateway):
    result = run_cli("drain", "B1", "--gateway", admin_gateway.url, secret=None)

    assert result.returncode == 2
    assert "Missing option '--admin-token'" in result.stderr
    assert admin_gateway.manager.get_server("B1").draining is False


def test_status_takes_the_admin_token(admin_gateway):
    result = admin_cli("status", "--gateway", admin_gateway.url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1] == "1 server: 1 healthy, 0 unhealthy; health checks running"


@pytest.mark.parametrize(
    ("args", "method", "path"),
    [
        (["drain", "B1"], "POST", "/admin/servers/B1/drain"),
        (["enable", "B1"], "POST", "/admin/servers/B1/enable"),
        (["reset-token", "B1"], "POST", "/admin/servers/B1/reset-token"),
        (["set", "B1", "--priority", "2"], "PATCH", "/admin/servers/B1"),
        (["drain", "a/b?c"], "POST", "/admin/servers/a%2Fb%3Fc/drain"),
        (["priority", "org/model:7b"], "GET", "/admin/server-priority/check/org%2Fmodel%3A7b"),
    ],
)
def test_the_admin_token_travels_as_a_bearer_token(stub_gateway, args, method, path):
    stub_gateway.answer(200, {"success": True, "message": "ok", "data": {}})

    assert admin_cli(*args, "--gateway", stub_gateway.url).returncode == 0

    (sent,) = stub_gateway.received
    assert (sent["method"], sent["path"]) == (method, path)
    assert sent["headers"]["Authorization"] == f"Bearer {ADMIN}"
    assert "X-Webhook-Secret" not in sent["headers"]
    if method == "PATCH":
        assert sent["body"] == {"priority": 2}


# -- server tokens (REGISTRATION_BINDING=token) ---------------------------------------------------


def test_a_bound_id_registers_with_its_token_and_an_operator_resets_it(live_gateway):
    gateway = live_gateway(admin_token=ADMIN, registration_binding="token")
    url = gateway.url

    first = run_cli(*register_args(url, "B1", 9001))
    assert first.returncode == 0, first.stderr
    message, shown = first.stdout.splitlines()
    assert message == "server B1 registered"
    token = shown.rpartition(": ")[2]
    assert "shown once" in shown

    refused = run_cli(*register_args(url, "B1", 9002))
    assert refused.returncode == 1
    assert "error 403: server B1 is bound to a server token" in refused.stderr
    moved = run_cli(*register_args(url, "B1", 9002), SERVER_TOKEN=token)
    assert (moved.returncode, moved.stdout) == (0, "server B1 updated\n")

    reset = admin_cli("reset-token", "B1", "--gateway", url)
    assert (reset.returncode, reset.stderr) == (0, "")
    assert "next registration binds a new one" in reset.stdout
    again = run_cli(*register_args(url, "B1", 9002), "--server-token", token)
    assert again.returncode == 0
    new = again.stdout.splitlines()[-1].rpartition(": ")[2]
    assert new != token

    gone = run_cli("unregister", "--gateway", url, "--server-id", "B1", "--server-token", new)
    assert (gone.returncode, gone.stdout) == (0, "server B1 unregistered\n")


def test_the_server_token_travels_in_a_header(stub_gateway):
    stub_gateway.answer(200, {"success": True, "message": "ok"})

    assert run_cli(*register_args(stub_gateway.url, "B1", 9001), "--server-token", "tok-123").returncode == 0

    (sent,) = stub_gateway.received
    assert sent["headers"]["X-Server-Token"] == "tok-123"
    assert "tok-123" not in json.dumps(sent["body"])


# -- jobs ---------------------------------------------------------------------------------


def test_jobs_list_show_cancel_and_retry(live_gateway):
    gateway = live_gateway(admin_token=ADMIN)
    submitted = [
        requests.get(f"{gateway.url}/api/echo?n={n}", headers={"Prefer": "respond-async"}, timeout=5).json()["job_id"]
        for n in range(2)
    ]
    listed = admin_cli("jobs", "list", "--gateway", gateway.url)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["JOB", "STATUS", "PRIORITY", "TASK", "TYPE", "ATTEMPTS", "SERVER", "AGE", "ERROR"]
    assert sorted(line.split()[0] for line in lines[1:3]) == sorted(submitted)
    assert all(line.split()[1:5] == ["queued", "5", "/api/", "0"] for line in lines[1:3])
    assert lines[3] == "2 queued, 0 running, 0 succeeded, 0 failed, 0 cancelled, 0 expired"
    shown = admin_cli("jobs", "show", submitted[0], "--gateway", gateway.url)
    assert json.loads(shown.stdout)["position"] == 1
    cancelled = admin_cli("jobs", "cancel", submitted[0], "--gateway", gateway.url)
    assert (cancelled.returncode, cancelled.stdout) == (0, f"job {submitted[0]} cancelled\n")
    again = admin_cli("jobs", "retry", submitted[0], "--gateway", gateway.url)
    assert (again.returncode, again.stdout) == (0, f"job {submitted[0]} queued again\n")
    only_queued = admin_cli("jobs", "list", "--status", "queued", "--json", "--gateway", gateway.url)
    assert len(json.loads(only_queued.stdout)["data"]["jobs"]) == 2
    unknown = admin_cli("jobs", "show", "f" * 32, "--gateway", gateway.url)
    assert unknown.returncode == 1 and "no job" in unknown.stderr
    assert admin_cli("jobs", "list", "--status", "lost", "--gateway", gateway.url).returncode == 2
