"""What the allocation tests share: the admin headers, a fleet in a few words, a fresh monitor reading, a pinned key."""

from __future__ import annotations

import time
from typing import Any

import requests
from conftest import SECRET

from gateway.fleet.health import HealthResult
from gateway.fleet.resources import Reading

ADMIN = {"X-Webhook-Secret": SECRET}  # the admin credential while ADMIN_TOKEN is unset
GIB = 1024**3


def add_servers(manager: Any, **servers: dict[str, Any]) -> None:
    """Register B1=dict(options), B2=... on 127.0.0.1, each on a port of its own, with a monitor URL."""
    for n, (server_id, options) in enumerate(servers.items()):
        port = 9001 + n
        manager.register_server(server_id, "127.0.0.1", port, f"http://127.0.0.1:{port + 100}", options)


def give_reading(manager: Any, server_id: str, cpu: float, memory: float = 0.0, disk: float = 0.0) -> None:
    """A fresh reading from the server's monitor, as the sweep would keep it."""
    server = manager.get_server(server_id)
    reading = Reading(time.monotonic(), "cpu", cpu, 16 * GIB, 8 * GIB, memory, disk)
    manager.apply_readings([(server_id, server.monitor_url, reading)])


def allocate(client: Any, key: str, **body: Any) -> Any:
    """POST /allocations for `key`; the response."""
    return client.post("/allocations", json={"key": key, **body}, headers=ADMIN)


def server_of(client: Any, key: str) -> str:
    return client.get(f"/allocations/{key}", headers=ADMIN).get_json()["data"]["server_id"]


def history(client: Any, key: str) -> list[dict[str, Any]]:
    return client.get(f"/allocations/history?key={key}", headers=ADMIN).get_json()["data"]["history"]


def mark_down(manager: Any, server_id: str, since: str | None = None) -> None:
    """Mark a server unhealthy, as failed checks would (and, given `since`, say when it went down)."""
    server = manager.get_server(server_id)
    manager.apply_health_results([HealthResult(server_id, server.url, False, "test: down")] * manager.failure_threshold)
    if since is not None:
        with manager._lock:  # the record's own clock, set back as hours of downtime would
            manager.registry.servers[server_id].health_changed_time = since


def pin_to_b2(gateway: Any) -> None:
    """Pin `conv-1` to B2: the only server that takes keys while B1 and B3 drain."""
    manager = gateway.manager
    manager.set_draining("B1", True)
    manager.set_draining("B3", True)
    reply = requests.post(f"{gateway.url}/allocations", json={"key": "conv-1"}, headers=ADMIN, timeout=5)
    assert reply.json()["data"]["server_id"] == "B2"
    manager.set_draining("B1", False)
    manager.set_draining("B3", False)
