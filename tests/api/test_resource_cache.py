"""GET /admin/resource-cache/stats and POST /admin/resource-cache/clear, against real monitors on 127.0.0.1."""

from __future__ import annotations

import threading

import pytest
import requests
from conftest import SECRET, wait_until
from fake_monitor import gpu_report

from gateway.api.routing_replies import ResourceCacheClearedReplySchema, ResourceCacheReplySchema

ADMIN = {"X-Webhook-Secret": SECRET}  # opens /admin while ADMIN_TOKEN is unset


def register(gateway, server_id: str, port: int, monitor=None) -> None:
    body = {"server_id": server_id, "ip": "127.0.0.1", "port": port, "secret": SECRET}
    if monitor is not None:
        body["monitor_url"] = monitor.url
    requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()


def stats(gateway) -> dict:
    reply = requests.get(gateway.url + "/admin/resource-cache/stats", headers=ADMIN, timeout=5)
    assert reply.status_code == 200, reply.text
    assert ResourceCacheReplySchema().validate(reply.json()) == {}
    return reply.json()["data"]


def rows(gateway) -> dict[str, dict]:
    return {row["server_id"]: row for row in stats(gateway)["servers"]}


def served(gateway, count: int, required_gb: float) -> list[str]:
    headers = {"X-Required-GPU-Memory-GB": str(required_gb)}
    answers = [requests.get(gateway.url + "/api/echo", headers=headers, timeout=5) for _ in range(count)]
    return [answer.headers.get("X-Backend-Server", str(answer.status_code)) for answer in answers]


@pytest.fixture
def fleet(live_gateway, fake_servers, fake_monitors):
    """A gateway with B1 (62 GiB usable), B2 (1.6 GiB) and B3 (no monitor); sweeps run by hand."""
    gateway = live_gateway(health_check_interval=3600.0, health_check_timeout=2.0)
    monitors = {"B1": fake_monitors(gpu_report(80, 10)), "B2": fake_monitors(gpu_report(24, 20))}
    for server_id in ("B1", "B2", "B3"):
        register(gateway, server_id, fake_servers(server_id).port, monitors.get(server_id))
    return gateway, monitors


def test_stats_show_each_reading_its_age_freshness_and_hits(fleet):
    gateway, _ = fleet
    assert {k: stats(gateway)[k] for k in ("readings", "fresh", "stale", "hits")} == dict.fromkeys(
        ("readings", "fresh", "stale", "hits"), 0
    )
    assert {row["server_id"]: row["state"] for row in rows(gateway).values()} == {"B1": "none", "B2": "none"}

    gateway.manager.run_health_sweep()
    assert served(gateway, 3, required_gb=10) == ["B1"] * 3  # B2 is too small; B3, unknown, is the last resort
    requests.get(gateway.url + "/api/echo", timeout=5)  # a plain request reads no reading

    found = rows(gateway)
    assert [(found[i]["state"], found[i]["hits"]) for i in ("B1", "B2")] == [("fresh", 3), ("fresh", 3)]
    assert found["B1"]["age_s"] >= 0 and found["B1"]["resources"]["usable_bytes"] > 0
    assert found["B1"]["monitor_url"].startswith("http://127.0.0.1:")
    totals = stats(gateway)
    assert (totals["readings"], totals["fresh"], totals["stale"], totals["hits"]) == (2, 2, 0, 6)
    assert totals["stale_after_s"] == 3 * 3600.0


def test_clear_drops_the_readings_and_reads_every_monitor_again_in_the_background(fleet):
    gateway, monitors = fleet
    gateway.manager.run_health_sweep()
    served(gateway, 2, required_gb=10)
    monitors["B1"].document = gpu_report(80, 79)  # B1 fills up: only a fresh read sees it
    monitors["B1"].gate = threading.Event()  # and that read waits until the test has looked

    reply = requests.post(gateway.url + "/admin/resource-cache/clear", headers=ADMIN, timeout=5)

    assert reply.status_code == 202, reply.text
    assert ResourceCacheClearedReplySchema().validate(reply.json()) == {}
    assert reply.json()["data"]["cleared"] == 2
    assert sorted(reply.json()["data"]["reading"]) == ["B1", "B2"]
    found = rows(gateway)
    assert (found["B1"]["state"], found["B1"]["hits"], found["B2"]["hits"]) == ("none", 0, 0)
    monitors["B1"].gate.set()
    assert wait_until(lambda: stats(gateway)["fresh"] == 2)
    assert (monitors["B1"].reads, monitors["B2"].reads) == (2, 2)
    assert served(gateway, 2, required_gb=10) == ["B3", "B3"]  # no monitored server has 10 GB now


@pytest.mark.parametrize(
    ("method", "path"), [("get", "/admin/resource-cache/stats"), ("post", "/admin/resource-cache/clear")]
)
def test_the_cache_endpoints_need_the_admin_credential(client, method, path):
    assert getattr(client, method)(path).status_code == 401
    assert getattr(client, method)(path, headers={"X-Webhook-Secret": "wrong" * 4}).status_code == 401


def test_clear_with_no_monitors_asks_nothing(client):
    reply = client.post("/admin/resource-cache/clear", headers=ADMIN)

    assert reply.status_code == 202
    assert reply.get_json()["data"] == {"cleared": 0, "reading": []}
