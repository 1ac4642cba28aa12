"""X-Allocation-Key through the proxy, over real HTTP, to real fake GPU servers on 127.0.0.1."""

from __future__ import annotations

import pytest
import requests
from allocating import history, mark_down, pin_to_b2
from conftest import wait_until


@pytest.fixture
def pinned(live_gateway, fake_servers):
    """A live gateway with B1, B2 and B3; key `conv-1` is pinned to B2."""

    def start(**overrides):
        gateway = live_gateway(**overrides)
        servers = {server_id: fake_servers(server_id) for server_id in ("B1", "B2", "B3")}
        for server in servers.values():
            gateway.register(server)
        pin_to_b2(gateway)
        return gateway, servers

    return start


def served(gateway, key: str | None, count: int = 1) -> list[str]:
    headers = {"X-Allocation-Key": key} if key is not None else {}
    return [
        requests.get(f"{gateway.url}/api/echo", headers=headers, timeout=5).headers.get("X-Backend-Server", "")
        for _ in range(count)
    ]


def test_a_pinned_keys_requests_all_go_to_its_server(pinned):
    gateway, _servers = pinned()
    assert served(gateway, "conv-1", 6) == ["B2"] * 6
    assert set(served(gateway, None, 6)) == {"B1", "B2", "B3"}  # the others rotate as ever
    echoed = requests.get(f"{gateway.url}/api/echo", headers={"X-Allocation-Key": "conv-1"}, timeout=5).json()
    assert echoed["server_id"] == "B2"


def test_an_unknown_key_is_routed_as_any_request_and_a_bad_one_is_refused(pinned):
    gateway, _ = pinned()
    assert set(served(gateway, "never-allocated", 6)) == {"B1", "B2", "B3"}
    bad = requests.get(f"{gateway.url}/api/echo", headers={"X-Allocation-Key": "has space"}, timeout=5)
    assert bad.status_code == 400
    assert "X-Allocation-Key" in bad.json()["message"]


def test_a_draining_server_still_serves_its_keys(pinned):
    gateway, _ = pinned()
    gateway.manager.set_draining("B2", True)
    assert served(gateway, "conv-1", 3) == ["B2"] * 3


def test_a_key_whose_server_left_fails_over_and_its_request_follows(pinned):
    gateway, servers = pinned()
    gateway.manager.unregister_server("B2")
    servers["B2"].stop()
    first = served(gateway, "conv-1")[0]
    assert first in ("B1", "B3")
    assert served(gateway, "conv-1", 3) == [first] * 3
    assert wait_until(lambda: not gateway.app.extensions["allocation_failover"].busy)
    client = gateway.app.test_client()
    entries = history(client, "conv-1")
    assert [(e["type"], e["from_server_id"], e["server_id"]) for e in entries][-1] == ("failover", "B2", first)
    assert len([e for e in entries if e["type"] == "failover"]) == 1  # moved once, by the request or the watcher


def test_a_server_down_a_moment_answers_503_and_one_down_past_the_failover_time_moves_its_key(pinned):
    gateway, servers = pinned()
    servers["B2"].stop()
    mark_down(gateway.manager, "B2")
    down = requests.get(f"{gateway.url}/api/echo", headers={"X-Allocation-Key": "conv-1"}, timeout=5)
    assert down.status_code == 503
    assert down.headers["Retry-After"]
    assert "server B2, which holds allocation conv-1, is unhealthy" in down.json()["message"]
    mark_down(gateway.manager, "B2", since="2020-01-01T00:00:00+00:00")
    moved = served(gateway, "conv-1")[0]
    assert moved in ("B1", "B3")
    entry = history(gateway.app.test_client(), "conv-1")[-1]
    assert entry["type"] == "failover" and "has been unhealthy for over 300s" in entry["reason"]


def test_a_key_that_has_nowhere_to_go_is_answered_503(pinned):
    gateway, _servers = pinned()
    for server_id in ("B1", "B3"):
        gateway.manager.set_draining(server_id, True)
    gateway.manager.unregister_server("B2")
    refused = requests.get(f"{gateway.url}/api/echo", headers={"X-Allocation-Key": "conv-1"}, timeout=5)
    assert refused.status_code == 503
    assert "allocation conv-1" in refused.json()["message"]
