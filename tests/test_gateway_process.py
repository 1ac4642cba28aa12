"""The gateway as it ships: gunicorn with deploy/gunicorn.conf.py, killed and restarted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import requests
from conftest import ROOT, SECRET


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
    restarted = gateway_process(BACKEND_SERVERS_FILE=str(gateway.log_path.parent / "backend_servers.json"))
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
    gateway = gateway_process()
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
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [True, "B1"]
    assert json.loads((tmp_path / "b.json").read_text())[0]["server_id"] == "B1"
