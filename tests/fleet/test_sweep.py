"""The health job's checks at once (fleet/sweep.py): a server is checked as it registers, moves, or comes back.

Real servers on 127.0.0.1: fake GPU servers, closed loopback ports, and a server that holds its
health answer until the test lets it go. HEALTH_CHECK_INTERVAL is an hour (conftest's default),
so no sweep can do what these tests see; each poll has a bounded budget, never a speed claim.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest
import requests
from conftest import ROOT, SECRET, free_port, wait_until

from gateway.fleet.health import HealthChecker
from gateway.fleet.store import JsonFileStore
from gateway.manager import BackendManager

BUDGET_S = 10.0  # how long a poll may wait for a background check: a bound, not a speed


def register(gateway, server_id: str, port: int, ip: str = "127.0.0.1") -> requests.Response:
    """POST /webhook/register over HTTP, without waiting for the check it starts (LiveGateway.register waits)."""
    body = {"server_id": server_id, "ip": ip, "port": port, "secret": SECRET}
    response = requests.post(gateway.url + "/webhook/register", json=body, timeout=5)
    assert response.status_code == 200, response.text
    return response


def health(gateway, server_id: str) -> tuple[bool, int]:
    server = gateway.manager.get_server(server_id)
    return server.is_healthy, server.fail_count


class HeldHealth:
    """A server on 127.0.0.1 that holds every request until `release()`, then answers: `statuses` in turn, then 503."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.released = threading.Event()
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                conn.recv(65536)
                self.released.wait(30)
                status = self.statuses.pop(0) if self.statuses else 503
                conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            except OSError:
                pass

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.listener.close()


@pytest.fixture
def held():
    servers: list[HeldHealth] = []

    def start(*statuses: int) -> HeldHealth:
        servers.append(HeldHealth(*statuses))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_closed_port_that_registers_is_unhealthy_soon_after_the_webhook_answered(live_gateway):
    gateway = live_gateway(check_on_register=True)
    port = free_port()  # nothing listens here

    response = register(gateway, "B1", port)

    assert response.json()["message"] == "server B1 registered"
    assert wait_until(lambda: health(gateway, "B1") == (False, 1), timeout=BUDGET_S)
    assert gateway.manager.get_server("B1").last_check_time is not None
    assert gateway.manager.last_sweep == {}  # no sweep ran: the registration's check did it
    assert requests.get(gateway.url + "/api/echo", timeout=5).status_code == 503  # no failed connect to pay


def test_a_live_server_passes_its_first_check_and_takes_traffic(live_gateway, fake_servers):
    gateway = live_gateway(check_on_register=True)
    server = fake_servers("B1")

    gateway.register(server)  # waits for the registration's check

    checked = gateway.manager.get_server("B1")
    assert (checked.is_healthy, checked.fail_count) == (True, 0)
    assert checked.last_check_time is not None
    assert [r["path"] for r in server.requests] == ["/health"]
    assert requests.get(gateway.url + "/api/echo", timeout=5).json()["server_id"] == "B1"


def test_the_webhook_answers_before_the_check_and_the_server_is_routable_until_it_fails(live_gateway, held):
    gateway = live_gateway(check_on_register=True, health_check_timeout=30.0)
    backend = held(503)

    register(gateway, "B1", backend.port)  # answered while the check waits on the backend

    assert wait_until(lambda: backend.accepted == 1, timeout=BUDGET_S)
    assert gateway.manager.health_job.checking_soon
    server = gateway.manager.get_server("B1")
    assert (server.is_healthy, server.last_check_time) == (True, None)  # not yet checked: it stays routable
    backend.release()
    assert wait_until(lambda: not gateway.manager.health_job.checking_soon, timeout=BUDGET_S)
    assert health(gateway, "B1") == (False, 1)  # its first check failed: out at once
    assert backend.accepted == 1


def test_a_registration_while_its_check_runs_is_checked_again_after_it(live_gateway, held):
    # The check in flight began before the box came back: its failure must not be the last word.
    gateway = live_gateway(check_on_register=True, health_check_timeout=30.0)
    backend = held(503, 200)
    register(gateway, "B1", backend.port)
    assert wait_until(lambda: backend.accepted == 1, timeout=BUDGET_S)

    register(gateway, "B1", backend.port)  # the box restarted meanwhile and says so
    register(gateway, "B1", backend.port)  # twice before the next check starts: one check
    backend.release()

    assert wait_until(lambda: not gateway.manager.health_job.checking_soon, timeout=BUDGET_S)
    assert health(gateway, "B1") == (True, 0)
    assert backend.accepted == 2


def test_a_move_to_a_closed_port_is_checked_at_once(live_gateway, fake_servers):
    gateway = live_gateway(check_on_register=True)
    gateway.register(fake_servers("B1"))
    assert health(gateway, "B1") == (True, 0)

    response = register(gateway, "B1", free_port())

    assert response.json()["message"] == "server B1 updated"
    assert wait_until(lambda: health(gateway, "B1") == (False, 1), timeout=BUDGET_S)


def test_a_server_that_comes_back_is_healthy_again_without_a_sweep(live_gateway, fake_servers):
    gateway = live_gateway(check_on_register=True)
    box = fake_servers("B2")
    gateway.register(box)
    port = box.port
    box.stop()  # the box goes down; three sweeps (HEALTH_CHECK_FAILURES) take it out
    for _ in range(3):
        gateway.manager.run_health_sweep()
    assert health(gateway, "B2") == (False, 3)
    swept = gateway.manager.last_sweep
    assert requests.get(gateway.url + "/api/echo", timeout=5).status_code == 503

    restarted = fake_servers("B2-again", port=port)  # restarted at the same address
    response = register(gateway, "B2", port)

    assert response.json()["message"] == "server B2 updated"
    assert wait_until(lambda: health(gateway, "B2") == (True, 0), timeout=BUDGET_S)
    assert gateway.manager.last_sweep == swept  # the re-registration's check brought it back
    assert [r["path"] for r in restarted.requests] == ["/health"]
    assert requests.get(gateway.url + "/api/echo", timeout=5).json()["server_id"] == "B2-again"


def test_a_healthy_server_that_was_checked_is_not_checked_on_each_heartbeat(live_gateway, fake_servers):
    gateway = live_gateway(check_on_register=True)
    server = fake_servers("B1")
    gateway.register(server)

    for _ in range(3):
        gateway.register(server)  # an agent's heartbeats

    assert [r["path"] for r in server.requests] == ["/health"]


def test_many_registrations_at_once_are_all_checked(live_gateway):
    gateway = live_gateway(check_on_register=True)
    ports = [free_port() for _ in range(40)]

    for index, port in enumerate(ports):
        register(gateway, f"B{index}", port)

    assert wait_until(lambda: not any(s.is_healthy for s in gateway.manager.list_servers()), timeout=BUDGET_S)
    assert gateway.manager.last_sweep == {}


def test_the_seeds_register_server_leaves_the_check_to_the_sweep(tmp_path):
    manager = BackendManager(JsonFileStore(tmp_path / "servers.json"), health_checker=HealthChecker(timeout=1.0))
    try:
        manager.register_server("B1", "127.0.0.1", free_port())
        assert not manager.health_job.checking_soon  # nothing was started
        manager.register("B2", "127.0.0.1", free_port())
        assert wait_until(lambda: not manager.get_server("B2").is_healthy, timeout=BUDGET_S)
        assert manager.get_server("B1").is_healthy and manager.get_server("B1").last_check_time is None
    finally:
        manager.shutdown()


def test_a_check_in_flight_when_the_gateway_stops_counts_neither_way(live_gateway, held):
    gateway = live_gateway(check_on_register=True, health_check_timeout=30.0)
    backend = held(200)
    register(gateway, "B1", backend.port)
    assert wait_until(lambda: backend.accepted == 1, timeout=BUDGET_S)

    gateway.app.extensions["gateway_shutdown"]()

    assert wait_until(lambda: not gateway.manager.health_job.checking_soon, timeout=BUDGET_S)
    assert health(gateway, "B1") == (True, 0)


GEVENT_SCRIPT = """
import json, sys, time
from gevent import monkey
monkey.patch_all()
from demo.fake_gpu_server import FakeGPUServer
from gateway.app import create_app
from gateway.config import Config

workdir, closed = sys.argv[1], int(sys.argv[2])
config = Config.from_env(
    {"WEBHOOK_SECRET": "s" * 24},
    backend_servers_file=workdir + "/servers.json",
    task_affinity_file=workdir + "/tasks.db",
    job_store_file=workdir + "/jobs.db",
    allocation_store_file=workdir + "/allocations.db",
    health_check_interval=3600.0,
    health_check_timeout=1.0,
)
app = create_app(config)
manager = app.extensions["backend_manager"]
live = FakeGPUServer("UP").start()
client = app.test_client()
for server_id, port in (("DOWN", closed), ("UP", live.port)):
    body = {"server_id": server_id, "ip": "127.0.0.1", "port": port, "secret": "s" * 24}
    assert client.post("/webhook/register", json=body).status_code == 200
deadline = time.monotonic() + 10
while manager.health_job.checking_soon and time.monotonic() < deadline:
    time.sleep(0.05)
found = {s.server_id: [s.is_healthy, s.last_check_time is not None] for s in manager.list_servers()}
app.extensions["gateway_shutdown"]()
live.stop()
print(json.dumps(found))
"""


def test_registration_checks_run_under_gevent(tmp_path):
    pytest.importorskip("gevent")
    done = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, str(tmp_path), str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"DOWN": [False, True], "UP": [True, True]}
