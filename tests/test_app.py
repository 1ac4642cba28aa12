"""The gateway as it ships: gunicorn with deploy/gunicorn.conf.py, killed and restarted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import ROOT, SECRET, free_port


def register(url: str, server_id: str, port: int, session: requests.Session | None = None) -> requests.Response:
    body = {"server_id": server_id, "ip": "127.0.0.1", "port": port, "secret": SECRET}
    return (session or requests).post(url + "/webhook/register", json=body, timeout=30)


def listed(url: str) -> dict:
    response = requests.get(url + "/webhook/servers", headers={"X-Webhook-Secret": SECRET}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]


def test_acknowledged_registrations_survive_sigkill(gateway_process, fake_servers):
    gateway = gateway_process()
    servers = [fake_servers(f"B{i}") for i in (1, 2, 3)]
    for server in servers:
        assert register(gateway.url, server.server_id, server.port).json()["success"] is True
    gateway.kill()  # SIGKILL to master and worker, right after the last acknowledgement
    restarted = gateway_process()  # same folder, same state file
    data = listed(restarted.url)
    assert [s["server_id"] for s in data["servers"]] == ["B1", "B2", "B3"]
    assert data["health_check_running"] is True
    served = [requests.get(restarted.url + "/api/echo", timeout=5).headers["X-Backend-Server"] for _ in range(3)]
    assert served == ["B1", "B2", "B3"]


def test_50_threads_register_1000_servers_over_http_then_sigkill(gateway_process):
    gateway = gateway_process()

    def register_batch(first: int) -> list[int]:
        with requests.Session() as session:
            return [
                register(gateway.url, f"S{i:04d}", 20000 + i, session).status_code for i in range(first, first + 20)
            ]

    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = [code for batch in pool.map(register_batch, range(0, 1000, 20)) for code in batch]
    assert codes == [200] * 1000
    gateway.kill()
    restarted = gateway_process()
    data = listed(restarted.url)
    assert data["total_servers"] == 1000
    assert {s["server_id"] for s in data["servers"]} == {f"S{i:04d}" for i in range(1000)}


def test_secret_in_the_query_never_reaches_the_log(gateway_process):
    gateway = gateway_process(GATEWAY_ACCESS_LOG="-")  # off by default; on, it must not leak either
    response = requests.get(gateway.url + "/webhook/servers", params={"secret": SECRET}, timeout=5)
    assert response.status_code == 200
    register(gateway.url, "B1", 9000)
    requests.post(gateway.url + "/webhook/register", json={"secret": SECRET, "server_id": "bad id"}, timeout=5)
    gateway.kill(sig=15)
    log = gateway.log()
    assert "GET /webhook/servers" in log
    assert SECRET not in log


def test_missing_secret_stops_gunicorn_with_a_clear_message():
    env = {k: v for k, v in os.environ.items() if k != "WEBHOOK_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "app:app"],
        cwd=ROOT,
        env={**env, "GATEWAY_BIND": "127.0.0.1:0"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "WEBHOOK_SECRET is not set" in result.stderr


def test_bad_setting_stops_python_app_py_naming_the_variable(tmp_path):
    result = subprocess.run(
        [sys.executable, "app.py"],
        cwd=ROOT,
        env={**os.environ, "WEBHOOK_SECRET": SECRET, "HEALTH_CHECK_INTERVAL": "soon"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "HEALTH_CHECK_INTERVAL='soon' is not valid" in result.stderr


def test_seed_imports_share_the_default_manager(tmp_path):
    script = (
        "import json, app\n"
        "from backend_manager import backend_manager\n"
        "from webhook_routes import register_webhook_routes\n"
        "import flask\n"
        "assert 'app' not in vars(app)  # importing builds nothing\n"
        "gateway = app.app\n"
        "register_webhook_routes(gateway)  # the seed calls it; a second call changes nothing\n"
        "backend_manager.register_server('B1', '127.0.0.1', 9000)\n"
        "print(json.dumps([gateway.extensions['backend_manager'] is backend_manager,\n"
        "                  backend_manager.get_next_server().server_id]))\n"
        "gateway.extensions['gateway_shutdown']()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={
            **os.environ,
            "WEBHOOK_SECRET": SECRET,
            "BACKEND_SERVERS_FILE": str(tmp_path / "b.json"),
            "TASK_AFFINITY_FILE": str(tmp_path / "t.db"),
            "JOB_STORE_FILE": str(tmp_path / "j.db"),
            "ALLOCATION_STORE_FILE": str(tmp_path / "a.db"),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [True, "B1"]  # logs go to stdout first
    assert json.loads((tmp_path / "b.json").read_text())[0]["server_id"] == "B1"


def test_health_job_runs_under_the_gevent_worker(gateway_process, fake_servers):
    gateway = gateway_process(HEALTH_CHECK_INTERVAL="1", HEALTH_CHECK_TIMEOUT="0.5")
    alive, dying = fake_servers("B1"), fake_servers("B2")
    register(gateway.url, "B1", alive.port)
    register(gateway.url, "B2", dying.port)
    dying.stop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = {s["server_id"]: s["is_healthy"] for s in listed(gateway.url)["servers"]}
        if health == {"B1": True, "B2": False}:
            break
        time.sleep(0.2)
    assert health == {"B1": True, "B2": False}
    assert any(r["path"] == "/health" for r in alive.requests)


def test_streams_pass_through_the_gevent_worker_unbuffered(gateway_process, fake_servers):
    gateway = gateway_process()
    server = fake_servers("B1")
    register(gateway.url, "B1", server.port)
    with requests.get(gateway.url + "/api/stream?n=3&delay=0&gated=1", stream=True, timeout=10) as response:
        chunks = response.iter_content(chunk_size=None)
        assert b"B1 chunk 0" in next(chunks)  # the backend sends nothing more until the gate opens
        server.stream_gate.set()
        assert b"chunk 2" in b"".join(chunks)


def test_python_app_py_serves(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "WEBHOOK_SECRET": SECRET,
        "GATEWAY_BIND": f"127.0.0.1:{port}",
        "BACKEND_SERVERS_FILE": str(tmp_path / "b.json"),
        "TASK_AFFINITY_FILE": str(tmp_path / "t.db"),
        "JOB_STORE_FILE": str(tmp_path / "j.db"),
        "ALLOCATION_STORE_FILE": str(tmp_path / "a.db"),
    }
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        assert response.json()["status"] == "ok"
        assert register(f"http://127.0.0.1:{port}", "B1", 9000).json()["success"] is True
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_graceful_stop_logs_no_error(gateway_process, fake_servers):
    gateway = gateway_process(HEALTH_CHECK_INTERVAL="1", HEALTH_CHECK_TIMEOUT="0.5")
    register(gateway.url, "B1", fake_servers("B1").port)
    time.sleep(1.5)  # let a sweep or two run, so the job is live at the stop
    gateway.kill(sig=15)
    log = gateway.log()
    assert "Worker exiting" in log
    assert " ERROR " not in log
    assert "Traceback" not in log


def test_bad_worker_connections_stop_gunicorn_with_a_clear_message():
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "app:app"],
        cwd=ROOT,
        env={**os.environ, "WEBHOOK_SECRET": SECRET, "GATEWAY_WORKER_CONNECTIONS": "lots"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "GATEWAY_WORKER_CONNECTIONS='lots' is not valid" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "logged"),
    [
        ("--http-parser python", "parsing requests with gunicorn's Python parser (--http-parser python)"),
        ("", "parsing requests with "),
    ],
)
def test_the_start_log_names_the_parser_that_runs(gateway_process, args, logged):
    gateway = gateway_process(GUNICORN_CMD_ARGS=args)
    assert logged in gateway.log()
    if args:
        assert "gunicorn_h1c, gunicorn's C parser" not in gateway.log()
