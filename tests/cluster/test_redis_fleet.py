"""The fleet on Redis: two gateways (in-process apps, as two processes would be) on one real redis-server."""

from __future__ import annotations

import threading

import pytest
from conftest import SECRET, wait_until

from gateway.cluster.connection import Redis
from gateway.fleet.health import HealthResult
from gateway.fleet.redis_store import Conflict, RedisFleetStore


def register(client, server_id="B1", port=8000, **extra):
    body = {"server_id": server_id, "ip": "127.0.0.1", "port": port, "secret": SECRET, **extra}
    return client.post("/webhook/register", json=body)


@pytest.fixture
def pair(make_app, redis_server):
    """Gateways A and B sharing one Redis."""

    def build(**overrides):
        return make_app(redis_url=redis_server.url, redis_timeout=0.5, **overrides)

    return build(), build()


def ids(app):
    return [s.server_id for s in app.extensions["backend_manager"].list_servers()]


def test_a_registration_at_one_gateway_is_seen_at_the_other(pair):
    a, b = pair
    assert register(a.test_client(), "B1").status_code == 200
    assert wait_until(lambda: ids(b) == ["B1"], timeout=2)
    assert b.extensions["backend_manager"].get_server("B1").port == 8000


def test_registration_order_holds_in_every_gateway(pair):
    a, b = pair
    for n, client in enumerate([a.test_client(), b.test_client(), a.test_client()]):
        assert register(client, f"B{n + 1}", 8000 + n).status_code == 200
    assert wait_until(lambda: ids(a) == ids(b) == ["B1", "B2", "B3"], timeout=2)


def test_a_drain_at_one_gateway_survives_a_heartbeat_through_the_other(pair):
    a, b = pair
    manager_a, manager_b = a.extensions["backend_manager"], b.extensions["backend_manager"]
    register(a.test_client(), "B1")
    assert wait_until(lambda: ids(b) == ["B1"], timeout=2)
    manager_b.follower.stop()  # B's copy goes stale, as a lost message would leave it
    manager_a.set_draining("B1", True)
    # B's stale record is refused by Redis, B catches up and makes the change on the newer one
    assert register(b.test_client(), "B1", 8001).status_code == 200
    manager_a.follower.catch_up()
    server = manager_a.get_server("B1")
    assert (server.draining, server.port) == (True, 8001)


def test_an_unregistration_is_seen_everywhere(pair):
    a, b = pair
    register(a.test_client(), "B1")
    register(a.test_client(), "B2", 8001)
    assert wait_until(lambda: ids(b) == ["B1", "B2"], timeout=2)
    assert b.extensions["backend_manager"].unregister_server("B1")
    assert wait_until(lambda: ids(a) == ["B2"], timeout=2)


def test_a_new_gateway_starts_with_the_fleet(pair, make_app, redis_server):
    a, _ = pair
    register(a.test_client(), "B1")
    late = make_app(redis_url=redis_server.url)
    assert ids(late) == ["B1"]


def test_concurrent_registrations_through_both_gateways_all_land(pair):
    a, b = pair
    errors = []

    def run(app, start):
        client = app.test_client()
        for n in range(start, start + 20):
            response = register(client, f"S{n}", 9000 + n)
            if response.status_code != 200:
                errors.append(response.get_json())

    threads = [threading.Thread(target=run, args=(app, start)) for app, start in ((a, 0), (b, 20), (a, 40))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    expected = {f"S{n}" for n in range(60)}
    assert wait_until(lambda: set(ids(a)) == set(ids(b)) == expected, timeout=3)


def test_a_write_on_a_stale_revision_is_refused(redis_server):
    store = RedisFleetStore(Redis(redis_server.url))
    entry = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000}
    rev = store.put("B1", entry, 0)
    store.put("B1", {**entry, "port": 8001}, rev)
    with pytest.raises(Conflict):
        store.put("B1", {**entry, "port": 8002}, rev)
    with pytest.raises(Conflict):
        store.put("B1", entry, 0)  # a second "new" server of the same id
    [(server_id, _, text)] = store.snapshot().records
    assert store.entry(server_id, text)["port"] == 8001


def test_only_one_gateway_leads_the_sweep(pair):
    leaders = [app.extensions["backend_manager"].health_job.leader for app in pair]
    assert sorted(lease.is_leader for lease in leaders) == [False, True]


def test_the_lease_passes_when_the_leader_stops(pair):
    a, b = pair
    first, second = (app.extensions["backend_manager"].health_job.leader for app in (a, b))
    leader, other = (first, second) if first.is_leader else (second, first)
    leader.stop()
    assert other.try_lead()
    assert not leader.is_leader


def test_while_redis_is_down_registrations_answer_503_and_routing_goes_on(pair, redis_server):
    a, b = pair
    register(a.test_client(), "B1")
    assert wait_until(lambda: ids(b) == ["B1"], timeout=2)
    redis_server.kill()
    response = register(b.test_client(), "B2", 8001)
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert "Redis" in response.get_json()["message"]
    assert ids(b) == ["B1"]  # the refused registration left nothing behind
    assert b.extensions["backend_manager"].get_next_server().server_id == "B1"
    assert b.extensions["redis"].up is False
    redis_server.start()
    assert wait_until(lambda: register(b.test_client(), "B2", 8001).status_code == 200, timeout=10)
    assert wait_until(lambda: ids(a) == ["B1", "B2"], timeout=5)
    assert b.extensions["redis"].up is True


def test_an_ejection_at_one_gateway_holds_at_the_other_until_a_check_passes(make_app, redis_server):
    a, b = (make_app(redis_url=redis_server.url, outlier_consecutive_failures=2) for _ in range(2))
    manager_a, manager_b = a.extensions["backend_manager"], b.extensions["backend_manager"]
    register(a.test_client(), "B1")
    register(a.test_client(), "B2", 8001)
    assert wait_until(lambda: ids(b) == ["B1", "B2"], timeout=2)
    manager_a.report_result("B1", False, "502")
    assert not manager_b.outliers.is_ejected("B1")
    manager_a.report_result("B1", False, "502")
    assert wait_until(lambda: manager_b.outliers.is_ejected("B1"), timeout=2)
    assert {manager_b.get_next_server().server_id for _ in range(4)} == {"B2"}
    server = manager_a.get_server("B1")
    manager_a.apply_health_results([HealthResult("B1", server.url, True, "ok")])
    assert wait_until(lambda: not manager_b.outliers.is_ejected("B1"), timeout=2)


def test_status_says_where_the_fleet_is_and_who_sweeps(make_app, redis_server):
    token = "admin-token-0123456789abcdef"
    a, b = (make_app(redis_url=redis_server.url, admin_token=token) for _ in range(2))
    states = [
        app.test_client().get("/status", headers={"Authorization": f"Bearer {token}"}).get_json()["data"]["state"]
        for app in (a, b)
    ]
    assert {state["store"] for state in states} == {"redis"}
    assert sorted(state["leads_here"] for state in states) == [False, True]
    assert states[0]["sweep_leader"] == states[1]["sweep_leader"] is not None
    assert "@" not in states[0]["redis"]  # no password, were there one
    embedded = make_app(admin_token=token).test_client().get("/status", headers={"Authorization": f"Bearer {token}"})
    assert embedded.get_json()["data"]["state"]["store"] == "embedded"
