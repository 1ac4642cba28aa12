"""Logs: one structured line per event, five files under LOG_DIR with rotation, no secret anywhere."""

from __future__ import annotations

import http.client
import json
import logging
import sys
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
import requests
from conftest import SECRET, wait_until

from gateway.observability.logs import StructuredFormatter
from gateway.observability.redaction import REDACTED


def record(msg: str, *args, fields=None) -> logging.LogRecord:
    made = logging.LogRecord("gateway.request", logging.INFO, __file__, 1, msg, args, None)
    if fields is not None:
        made.fields = fields
    return made


def test_key_value_lines():
    line = StructuredFormatter("kv").format(record("server %s moved", "B1", fields={"ms": 1.5, "path": "/a b"}))
    assert line.startswith("ts=")
    assert ' level=INFO logger=gateway.request msg="server B1 moved" ms=1.5 path="/a b"' in line
    assert "\n" not in line


@pytest.mark.parametrize(
    "created",
    [
        *(0.0, 1.0005, 1.0004999, 1.9995, 1.9999994, 1.9999996),
        *(1_795_000_000.0, 1_795_000_000.9999999, 2_675_993_906.8559995),  # the last once came out 1 ms off
    ],
)
def test_timestamps_read_as_datetime_writes_them(created):
    made = record("request")
    made.created = created
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert StructuredFormatter("kv").format(made).startswith(f"ts={expected} ")
    assert json.loads(StructuredFormatter("json").format(made))["ts"] == expected


def test_json_lines():
    document = json.loads(StructuredFormatter("json").format(record("request", fields={"status": 200})))
    assert (document["level"], document["msg"], document["status"]) == ("INFO", "request", 200)


def test_exceptions_stay_on_one_line_of_json():
    try:
        raise ValueError("boom")
    except ValueError:
        failing = record("failed")
        failing.exc_info = sys.exc_info()
    document = json.loads(StructuredFormatter("json").format(failing))
    assert "ValueError: boom" in document["exc"]


def use_the_secret_everywhere(url: str, port: int) -> None:
    """Every place the secret is accepted, plus wrong tries that echo secret-like strings."""
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": port}
    requests.post(url + "/webhook/register", json={**body, "secret": SECRET}, timeout=5).raise_for_status()
    requests.post(url + "/webhook/register", json=body, headers={"X-Webhook-Secret": SECRET}, timeout=5)
    requests.get(url + "/webhook/servers", headers={"Authorization": f"Bearer {SECRET}"}, timeout=5)
    requests.get(url + "/webhook/servers", params={"secret": SECRET}, timeout=5).raise_for_status()
    requests.get(url + "/status", headers={"X-Webhook-Secret": SECRET}, timeout=5)
    requests.post(url + "/webhook/register", json={**body, "secret": SECRET + "x"}, timeout=5)
    requests.post(url + "/webhook/register", json={**body, "port": 0, "secret": SECRET}, timeout=5)
    requests.get(url + "/api/echo?secret=" + SECRET, timeout=5)
    requests.post(url + "/api/echo", data=SECRET, headers={"Authorization": f"Bearer {SECRET}"}, timeout=5)


def test_five_files_and_no_secret_in_any_of_them(gateway_process, fake_servers, tmp_path):
    log_dir = tmp_path / "logs"
    gateway = gateway_process(LOG_DIR=str(log_dir), HEALTH_CHECK_INTERVAL="1", HEALTH_CHECK_TIMEOUT="0.5")
    server = fake_servers("B1")
    use_the_secret_everywhere(gateway.url, server.port)
    for _ in range(3):
        requests.get(gateway.url + "/api/echo", timeout=5)
    server.stop()
    assert wait_until(lambda: "marked unhealthy" in (log_dir / "health.log").read_text(), timeout=20)
    requests.post(gateway.url + "/webhook/unregister", json={"server_id": "B1", "secret": SECRET}, timeout=5)
    gateway.kill(sig=15)

    files = {path.name: path.read_text() for path in log_dir.iterdir()}
    assert {"app.log", "request.log", "error.log", "performance.log", "health.log"} <= set(files)
    for name, text in {**files, "stdout": gateway.log()}.items():
        assert SECRET not in text, f"the secret is in {name}"
    requests_logged = [line for line in files["request.log"].splitlines() if "server=B1" in line]
    assert any("method=GET path=/api/echo server=B1 status=200 ms=" in line for line in requests_logged)
    assert "marked unhealthy" in files["health.log"]
    assert 'msg="health sweep"' in files["performance.log"]
    assert "registered server B1" in files["app.log"]
    assert "unregistered server B1" in files["app.log"]
    assert all(" level=ERROR " in line or line.startswith("exc") for line in files["error.log"].splitlines() if line)


GUESSES = ("matrix-7c41e0", "matrix-9b2d53", "matrix-e5a86f", "matrix-0f3c9a")  # secrets the gateway never knew
SECRET_PATHS = (
    f"/api/{SECRET}",
    f"/api/x;secret={SECRET}",
    f"/api/x;secret={GUESSES[0]}",
    f"/api/echo;token={GUESSES[1]}/more",
    f"/api/%3Bsecret={GUESSES[2]}",
    f"/api/slow/x;secret={GUESSES[3]}?delay=1.05",  # over a second: also a line in performance.log
)


def get_raw(url: str, target: str) -> int:
    """Send `GET <target>` byte for byte, as a client that put a secret in the path would."""
    connection = http.client.HTTPConnection(urlsplit(url).netloc, timeout=10)
    try:
        connection.request("GET", target)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("style", ["kv", "json"])
def test_secrets_in_the_path_are_in_no_log(gateway_process, fake_servers, tmp_path, style):
    log_dir = tmp_path / "logs"
    gateway = gateway_process(LOG_DIR=str(log_dir), LOG_FORMAT=style)
    server = fake_servers("B1")
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": server.port, "secret": SECRET}
    requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()
    assert [get_raw(gateway.url, target) for target in SECRET_PATHS] == [200] * len(SECRET_PATHS)
    gateway.kill(sig=15)

    files = {path.name: path.read_text() for path in log_dir.iterdir()}
    for name, text in {**files, "stdout": gateway.log()}.items():
        for leaked in (SECRET, *GUESSES):
            assert leaked not in text, f"{leaked} is in {name}"
    for name in ("request.log", "app.log", "performance.log"):
        assert f"/api/slow/x;secret={REDACTED}" in files[name]
    assert files["request.log"].count(REDACTED) == len(SECRET_PATHS)


def test_json_format_and_rotation(gateway_process, fake_servers, tmp_path):
    log_dir = tmp_path / "logs"
    gateway = gateway_process(LOG_DIR=str(log_dir), LOG_FORMAT="json", LOG_MAX_BYTES="2048", LOG_BACKUPS="2")
    server = fake_servers("B1")
    requests.post(
        gateway.url + "/webhook/register",
        json={"server_id": "B1", "ip": "127.0.0.1", "port": server.port, "secret": SECRET},
        timeout=5,
    ).raise_for_status()
    with requests.Session() as session:
        for _ in range(60):
            session.get(gateway.url + "/api/echo", timeout=5)
    gateway.kill(sig=15)
    names = sorted(path.name for path in log_dir.iterdir() if path.name.startswith("request.log"))
    assert names == ["request.log", "request.log.1", "request.log.2"]
    for line in (log_dir / "request.log.1").read_text().splitlines():
        document = json.loads(line)
        assert document["msg"] == "request" and document["server"] == "B1"


def test_a_path_full_of_control_characters_stays_on_one_line():
    path = "/api/b\x85x/c\u2028y/d\x1b[31m/e\rf"
    for style in ("kv", "json"):
        line = StructuredFormatter(style).format(record("request", fields={"path": path}))
        assert len(line.splitlines()) == 1
        assert not any(c in line for c in "\x85\u2028\x1b\r")


def test_a_stream_is_slow_by_its_first_byte_and_an_answer_by_its_last(live_gateway, fake_servers, caplog):
    caplog.set_level(logging.INFO, logger="gateway.performance")
    gateway = live_gateway()
    gateway.register(fake_servers("B1"))
    stream = requests.get(gateway.url + "/api/stream?n=6&delay=0.25", timeout=10)  # over 1 s, its start at once
    assert stream.status_code == 200 and stream.text.count("data:") == 6
    assert requests.get(gateway.url + "/api/slow?delay=1.05", timeout=10).status_code == 200

    def slow_paths() -> list[str]:
        return [r.fields["path"] for r in caplog.records if r.name == "gateway.performance" and r.msg == "slow request"]

    assert wait_until(lambda: "/api/slow" in slow_paths())
    assert slow_paths() == ["/api/slow"]
