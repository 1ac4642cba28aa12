"""Resource-aware routing end to end: real monitors, real fake GPU servers, a real gateway."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import threading
from pathlib import Path

import pytest
import requests
from conftest import SECRET, wait_until
from werkzeug.serving import make_server

from resource_monitor.app import close_app, create_app
from resource_monitor.settings import Settings

FAKE_NVML = Path(__file__).resolve().parent.parent / "fakes" / "pynvml.py"
GIB = 1024**3
_loaded = itertools.count()


class LiveMonitor:
    """A gpu-mode resource monitor over a private fake NVML, served on 127.0.0.1."""

    def __init__(self, total_gib: int, used_gib: int) -> None:
        name = f"fake_pynvml_routing_{next(_loaded)}"
        spec = importlib.util.spec_from_file_location(name, FAKE_NVML)
        assert spec is not None and spec.loader is not None
        self.nvml = importlib.util.module_from_spec(spec)
        sys.modules[name] = self.nvml
        spec.loader.exec_module(self.nvml)
        self.nvml.GPUS[:] = [self.nvml.FakeGPU("Fake GPU", f"GPU-{name}", total_gib * GIB, used_gib * GIB)]
        self.app = create_app(Settings(device_type="gpu", cache_expire_time=0), nvml=self.nvml)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.name = name

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            close_app(self.app)
            sys.modules.pop(self.name, None)


@pytest.fixture
def monitors():
    started: list[LiveMonitor] = []

    def start(total_gib: int, used_gib: int) -> LiveMonitor:
        monitor = LiveMonitor(total_gib, used_gib)
        started.append(monitor)
        return monitor

    yield start
    for monitor in started:
        monitor.stop()


def register(gateway, server_id: str, port: int, monitor_port: int | None) -> None:
    body = {"server_id": server_id, "ip": "127.0.0.1", "port": port, "secret": SECRET}
    if monitor_port is not None:
        body["monitor_port"] = monitor_port
    requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()


def listed(gateway) -> dict[str, dict]:
    reply = requests.get(gateway.url + "/webhook/servers", headers={"X-Webhook-Secret": SECRET}, timeout=5)
    return {server["server_id"]: server for server in reply.json()["data"]["servers"]}


def served(gateway, count: int, required_gb: float) -> list[str]:
    headers = {"X-Required-GPU-Memory-GB": str(required_gb)}
    return [
        requests.get(gateway.url + "/api/echo", headers=headers, timeout=5).headers.get("X-Backend-Server", "-")
        for _ in range(count)
    ]


def test_gateway_routes_by_the_monitors_free_memory(live_gateway, fake_servers, monitors):
    # Sweeps run by hand. The score counts GPU memory alone: both monitors read this host's
    # real CPU, whose percent swings between two reads by more than the GPU terms differ.
    gateway = live_gateway(health_check_interval=3600.0, health_check_timeout=5.0, load_score_weights={"gpu": 1.0})
    small, big = fake_servers("SMALL"), fake_servers("BIG")
    register(gateway, "SMALL", small.port, monitors(24, 20).port)  # 24*0.9-20 = 1.6 GiB usable
    register(gateway, "BIG", big.port, monitors(80, 10).port)  # 80*0.9-10 = 62 GiB usable
    gateway.manager.run_health_sweep()
    assert all(s["resources"] for s in listed(gateway).values())

    fleet = listed(gateway)
    assert fleet["BIG"]["resources"]["gpu_memory_free"] == 70 * GIB
    assert fleet["SMALL"]["resources"]["stale"] is False
    assert served(gateway, 4, required_gb=10) == ["BIG"] * 4
    assert sorted(served(gateway, 4, required_gb=1)) == ["BIG", "BIG", "SMALL", "SMALL"]
    too_much = requests.get(gateway.url + "/api/echo", headers={"X-Required-GPU-Memory-GB": "100"}, timeout=5)
    assert too_much.status_code == 503
    assert "100 GB" in too_much.json()["message"]

    ranked = requests.get(gateway.url + "/admin/rankings", headers={"X-Webhook-Secret": SECRET}, timeout=5).json()
    assert next(row["server_id"] for row in ranked["data"]["servers"]) == "BIG"  # less GPU memory in use


def test_a_killed_monitor_goes_stale_and_routing_ignores_it(live_gateway, fake_servers, monitors):
    gateway = live_gateway(health_check_interval=1.0, health_check_timeout=0.9)  # stale after 3 s
    first, second = fake_servers("B1"), fake_servers("B2")
    dying = monitors(80, 0)
    register(gateway, "B1", first.port, dying.port)
    register(gateway, "B2", second.port, monitors(80, 0).port)
    assert wait_until(lambda: all(s["resources"] for s in listed(gateway).values()))
    assert sorted(served(gateway, 2, required_gb=10)) == ["B1", "B2"]

    dying.stop()
    assert wait_until(lambda: listed(gateway)["B1"]["resources"]["stale"])
    # B1's capacity is unknown now; B2's fresh reading fits, so B1 gets nothing that needs memory.
    assert served(gateway, 4, required_gb=10) == ["B2"] * 4
    assert listed(gateway)["B1"]["is_healthy"] is True  # the GPU service itself is fine
