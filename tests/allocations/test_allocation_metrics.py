"""The allocations' metrics over real HTTP: the keys on each server, the moves by type, and the refusals."""

from __future__ import annotations

import base64

import requests
from allocating import ADMIN
from conftest import SECRET, wait_until
from prometheus_client.parser import text_string_to_metric_families

SIGNING_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """The gateway_allocation* samples, by name, then by their sorted label values."""
    text = requests.get(url + "/metrics", timeout=5).text
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("gateway_allocation"):
                labels = tuple(value for _, value in sorted(sample.labels.items()))
                found.setdefault(sample.name, {})[labels] = sample.value
    return found


def keys_on(url: str) -> dict[str, float]:
    """gateway_allocations by server."""
    return {server: value for (server,), value in scrape(url).get("gateway_allocations", {}).items()}


def moves(url: str) -> dict[str, float]:
    """gateway_allocation_moves_total by type."""
    return {kind: value for (kind,), value in scrape(url).get("gateway_allocation_moves_total", {}).items()}


def refusals(url: str) -> dict[tuple[str, str], float]:
    """gateway_allocation_refusals_total by (reason, type)."""
    return scrape(url).get("gateway_allocation_refusals_total", {})


def counted(**made: float) -> dict[str, float]:
    return {"initial": 0.0, "rebalance": 0.0, "manual": 0.0, "failover": 0.0, **made}


def call(gateway, method: str, path: str, **body: object) -> requests.Response:
    return requests.request(method, gateway.url + path, json=body or None, headers=ADMIN, timeout=10)


def api_counts(gateway) -> dict[str, int]:
    return call(gateway, "GET", "/allocations").json()["data"]["counts"]


def fleet(live_gateway, fake_servers, *options: dict, **config: object):
    """A live gateway with B1, B2, ... (real fake servers), each registered with its options."""
    gateway = live_gateway(**config)
    for n, option in enumerate(options, start=1):
        server = fake_servers(f"B{n}")
        gateway.manager.register_server(f"B{n}", "127.0.0.1", server.port, options=option)
    return gateway


def settled(gateway) -> bool:
    return not gateway.app.extensions["allocation_failover"].busy


def test_the_gauge_follows_each_placement_manual_move_and_release(live_gateway, fake_servers):
    gateway = fleet(live_gateway, fake_servers, {}, {})
    assert keys_on(gateway.url) == {"B1": 0.0, "B2": 0.0}  # a registered server without keys shows 0
    assert moves(gateway.url) == counted()
    for key in ("k1", "k2", "k3"):  # by the lowest score, ties to the first: B1, B2, B1
        assert call(gateway, "POST", "/allocations", key=key).status_code == 201
    assert keys_on(gateway.url) == {"B1": 2.0, "B2": 1.0} == api_counts(gateway)
    assert call(gateway, "POST", "/allocations", key="k1").status_code == 200  # there already: no move
    assert moves(gateway.url) == counted(initial=3)
    assert call(gateway, "POST", "/allocations/k1/move", server_id="B2").status_code == 200
    assert keys_on(gateway.url) == {"B1": 1.0, "B2": 2.0}
    assert call(gateway, "POST", "/allocations/k1/move", server_id="B2").status_code == 200  # there already
    assert moves(gateway.url) == counted(initial=3, manual=1)
    assert call(gateway, "DELETE", "/allocations/k2").status_code == 200
    assert keys_on(gateway.url) == {"B1": 1.0, "B2": 1.0} == api_counts(gateway)
    assert moves(gateway.url) == counted(initial=3, manual=1)  # a release moves nothing


def test_rebalance_and_failover_moves_are_counted(live_gateway, fake_servers):
    gateway = fleet(live_gateway, fake_servers, {"max_allocations": 10}, {"max_allocations": 10})
    gateway.manager.set_draining("B2", True)
    for n in range(6):
        assert call(gateway, "POST", "/allocations", key=f"k{n}").status_code == 201
    gateway.manager.set_draining("B2", False)
    assert keys_on(gateway.url) == {"B1": 6.0, "B2": 0.0}
    reply = call(gateway, "POST", "/allocations/rebalance", threshold=30).json()["data"]
    assert reply["moved"] == 2  # scores 60 against 0, 50 against 10, then 40 against 20: within 30
    assert keys_on(gateway.url) == {"B1": 4.0, "B2": 2.0}
    assert moves(gateway.url) == counted(initial=6, rebalance=2)
    assert call(gateway, "POST", "/allocations/rebalance", threshold=30, dry_run=True).status_code == 200
    assert moves(gateway.url) == counted(initial=6, rebalance=2)  # a dry run moves nothing
    body = {"server_id": "B1", "secret": SECRET}
    assert requests.post(gateway.url + "/webhook/unregister", json=body, timeout=5).status_code == 200
    assert wait_until(lambda: settled(gateway) and keys_on(gateway.url) == {"B2": 6.0})  # B1 went, and its keys
    assert moves(gateway.url) == counted(initial=6, rebalance=2, failover=4)
    assert refusals(gateway.url) == {}


def test_refusals_are_counted_by_type_and_reason_and_a_gone_servers_keys_stay_in_the_gauge(live_gateway, fake_servers):
    gateway = fleet(live_gateway, fake_servers, {"max_allocations": 1}, {"max_allocations": 1})
    for key in ("k1", "k2"):
        assert call(gateway, "POST", "/allocations", key=key).status_code == 201
    assert call(gateway, "POST", "/allocations", key="k3").status_code == 503  # every server is full
    assert refusals(gateway.url) == {("no_room", "initial"): 1.0}
    assert call(gateway, "POST", "/allocations/k1/move", server_id="B2").status_code == 409
    assert call(gateway, "POST", "/allocations/k1/move", server_id="B9").status_code == 400  # not a refusal of room
    assert refusals(gateway.url) == {("no_room", "initial"): 1.0, ("no_room", "manual"): 1.0}
    body = {"server_id": "B2", "secret": SECRET}
    assert requests.post(gateway.url + "/webhook/unregister", json=body, timeout=5).status_code == 200
    assert wait_until(lambda: settled(gateway) and ("no_room", "failover") in refusals(gateway.url))
    # k2 found no room on B1: it stays on B2, which left, and the gauge says so.
    assert keys_on(gateway.url) == {"B1": 1.0, "B2": 1.0}
    assert refusals(gateway.url)[("no_room", "failover")] == 1.0
    assert moves(gateway.url) == counted(initial=2)


def test_a_move_the_migrate_url_refuses_is_counted_as_refused_not_as_moved(live_gateway, fake_servers):
    receiver = fake_servers("APP")  # the application's end, answering every announcement with a 409
    gateway = fleet(
        live_gateway,
        fake_servers,
        {},
        {},
        allocation_migrate_url=f"http://127.0.0.1:{receiver.port}/api/status-code?code=409",
        job_callback_secret=SIGNING_SECRET,
    )
    assert call(gateway, "POST", "/allocations", key="k1").status_code == 201  # placements are not announced
    assert call(gateway, "POST", "/allocations/k1/move", server_id="B2").status_code == 502
    assert keys_on(gateway.url) == {"B1": 1.0, "B2": 0.0}
    assert moves(gateway.url) == counted(initial=1)
    assert refusals(gateway.url) == {("migrate_refused", "manual"): 1.0}


def test_in_redis_mode_every_gateway_shows_the_clusters_keys_and_counts_its_own_moves(
    live_gateway, make_app, fake_servers, redis_server
):
    first, second = (live_gateway(make_app(redis_url=redis_server.url, redis_timeout=2.0)) for _ in range(2))
    for name in ("B1", "B2"):
        first.register(fake_servers(name))
    assert wait_until(lambda: len(second.manager.list_servers()) == 2)  # the fleet reaches it through Redis
    for key in ("k1", "k2", "k3"):
        assert call(first, "POST", "/allocations", key=key).status_code == 201
    assert call(second, "POST", "/allocations/k1/move", server_id="B2").status_code == 200
    # The gauge is read from Redis at scrape time: the same in each process, never a sum of them.
    assert keys_on(first.url) == keys_on(second.url) == {"B1": 1.0, "B2": 2.0}
    assert call(second, "DELETE", "/allocations/k2").status_code == 200
    assert keys_on(first.url) == keys_on(second.url) == {"B1": 1.0, "B2": 1.0}
    # Each process counts the moves it made; Prometheus sums them (and gunicorn's workers share files).
    assert moves(first.url) == counted(initial=3)
    assert moves(second.url) == counted(manual=1)
