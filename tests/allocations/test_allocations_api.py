"""/allocations through the app: each endpoint, its credential, its validation, and the strategies on a real fleet."""

from __future__ import annotations

import pytest
from allocating import ADMIN, add_servers, allocate, give_reading, history, server_of
from conftest import SECRET

ADMIN_TOKEN = "admin-token-0123456789abcdef"


@pytest.fixture
def fleet(app, manager):
    """B1 (eu, room for 2), B2 (us, room for 3), B3 (eu, unlimited)."""
    add_servers(
        manager,
        B1={"max_allocations": 2, "labels": {"location": "eu"}},
        B2={"max_allocations": 3, "labels": {"location": "us"}},
        B3={"labels": {"location": "eu"}},
    )
    return app.test_client()


ROUTES = [
    ("post", "/allocations", {"key": "k"}),
    ("get", "/allocations", None),
    ("get", "/allocations/history?key=k", None),
    ("post", "/allocations/rebalance", {}),
    ("get", "/allocations/k", None),
    ("delete", "/allocations/k", None),
    ("post", "/allocations/k/move", {"server_id": "B1"}),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_needs_the_admin_credential(make_app, method, path, body):
    client = make_app().test_client()
    assert getattr(client, method)(path, json=body).status_code == 401
    assert getattr(client, method)(path, json=body, headers={"X-Webhook-Secret": "wrong" * 4}).status_code == 401
    # With ADMIN_TOKEN set, the webhook secret every GPU server holds opens nothing here.
    guarded = make_app(admin_token=ADMIN_TOKEN).test_client()
    assert getattr(guarded, method)(path, json=body, headers={"X-Webhook-Secret": SECRET}).status_code == 401
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert getattr(guarded, method)(path, json=body, headers=bearer).status_code != 401


def test_a_key_is_placed_once_and_the_same_key_again_stays_where_it_is(fleet):
    first = allocate(fleet, "conv-1")
    assert first.status_code == 201
    assert first.headers["Location"] == "/allocations/conv-1"
    placed = first.get_json()
    assert placed["changed"] is True
    assert placed["data"]["server_id"] == "B1"  # all idle: the first registered
    assert placed["data"]["load_score"] == 0.0
    assert "lowest load score" in placed["data"]["reason"]
    again = allocate(fleet, "conv-1", strategy="isolation", group="g")
    assert again.status_code == 200
    assert (again.get_json()["changed"], again.get_json()["data"]["server_id"]) == (False, "B1")
    assert again.get_json()["data"]["strategy"] == "load_balance"  # as it was placed
    assert server_of(fleet, "conv-1") == "B1"


def test_load_balance_spreads_by_score_and_never_past_a_cap(fleet, manager):
    give_reading(manager, "B1", cpu=10)
    give_reading(manager, "B2", cpu=90)
    give_reading(manager, "B3", cpu=50)
    placed = [allocate(fleet, f"k{n}").get_json()["data"] for n in range(4)]
    # CPU at 0.3: B1 3, B2 27, B3 15; plus 0.3 x the share: B1's of its 2, B3's (uncapped) of every key.
    # k0: 3 < 15 < 27; k1: B3 15 < B1 18; k2: B1 18 < B3 30; k3: B1 is full, B3 25 < B2 27.
    assert [row["server_id"] for row in placed] == ["B1", "B3", "B1", "B3"]
    assert [row["load_score"] for row in placed] == [3.0, 15.0, 18.0, 25.0]
    listed = fleet.get("/allocations", headers=ADMIN).get_json()["data"]
    assert listed["counts"] == {"B1": 2, "B3": 2}
    assert listed["total"] == 4


def test_location_picks_among_servers_with_that_label_and_names_one_nobody_has(fleet):
    assert allocate(fleet, "eu-1", strategy="location", location="eu").get_json()["data"]["server_id"] == "B1"
    assert allocate(fleet, "us-1", strategy="location", location="us").get_json()["data"]["server_id"] == "B2"
    assert allocate(fleet, "eu-2", strategy="location", location="eu").get_json()["data"]["server_id"] == "B3"
    unknown = allocate(fleet, "x", strategy="location", location="mars")
    assert unknown.status_code == 400
    assert "location" in unknown.get_json()["errors"]
    assert "'mars'" in unknown.get_json()["message"] and "known: eu, us" in unknown.get_json()["message"]


def test_affinity_joins_its_group_and_isolation_spreads_one(fleet):
    assert allocate(fleet, "a1", strategy="affinity", group="script-1").get_json()["data"]["server_id"] == "B1"
    assert allocate(fleet, "a2", strategy="affinity", group="script-1").get_json()["data"]["server_id"] == "B1"
    third = allocate(fleet, "a3", strategy="affinity", group="script-1").get_json()["data"]
    assert third["server_id"] == "B2"  # B1 is full: the lowest score among the rest
    fourth = allocate(fleet, "a4", strategy="affinity", group="script-1").get_json()["data"]
    assert fourth["server_id"] == "B2"  # it holds one of the group now, and has room
    assert "holds the most keys of group 'script-1' (1)" in fourth["reason"]


def test_isolation_spreads_one_group_over_the_fleet(fleet):
    spread = [allocate(fleet, f"i{n}", strategy="isolation", group="shard").get_json()["data"] for n in range(3)]
    assert [row["server_id"] for row in spread] == ["B1", "B2", "B3"]
    assert "fewest keys of group 'shard' (0)" in spread[2]["reason"]


def test_only_healthy_servers_that_are_not_draining_take_keys(fleet, manager):
    manager.set_draining("B1", True)
    manager.set_draining("B2", True)
    assert allocate(fleet, "k1").get_json()["data"]["server_id"] == "B3"
    manager.set_draining("B3", True)
    refused = allocate(fleet, "k2")
    assert refused.status_code == 503
    assert refused.headers["Retry-After"]
    assert "no healthy server" in refused.get_json()["message"]


def test_a_full_fleet_answers_503(make_app):
    app = make_app()
    add_servers(app.extensions["backend_manager"], B1={"max_allocations": 1})
    client = app.test_client()
    assert allocate(client, "k1").status_code == 201
    full = allocate(client, "k2")
    assert full.status_code == 503
    assert "max_allocations" in full.get_json()["message"]
    assert client.delete("/allocations/k1", headers=ADMIN).status_code == 200
    assert allocate(client, "k2").status_code == 201  # the release freed its room


def test_get_delete_and_list_by_server(fleet):
    for key in ("a", "b", "c"):
        allocate(fleet, key)
    row = fleet.get("/allocations/a", headers=ADMIN).get_json()["data"]
    assert (row["key"], row["server_id"], row["strategy"], row["group"]) == ("a", "B1", "load_balance", None)
    on_b1 = fleet.get("/allocations?server_id=B1", headers=ADMIN).get_json()["data"]
    assert [a["key"] for a in on_b1["allocations"]] == [k for k in "abc" if server_of(fleet, k) == "B1"]
    assert on_b1["total"] == len(on_b1["allocations"])
    assert set(on_b1["scores"]) == {"B1", "B2", "B3"}
    assert fleet.get("/allocations?limit=1", headers=ADMIN).get_json()["data"]["total"] == 3
    released = fleet.delete("/allocations/a", headers=ADMIN)
    assert released.status_code == 200
    assert released.get_json()["data"]["key"] == "a"
    assert fleet.get("/allocations/a", headers=ADMIN).status_code == 404
    assert fleet.delete("/allocations/a", headers=ADMIN).status_code == 404
    assert [entry["type"] for entry in history(fleet, "a")] == ["initial"]  # it outlives the release


def test_a_manual_move_is_recorded_and_held_to_health_and_room(fleet, manager):
    allocate(fleet, "k1")
    moved = fleet.post("/allocations/k1/move", json={"server_id": "B2"}, headers=ADMIN)
    assert moved.status_code == 200
    assert moved.get_json()["data"]["server_id"] == "B2"
    assert moved.get_json()["changed"] is True
    same = fleet.post("/allocations/k1/move", json={"server_id": "B2"}, headers=ADMIN).get_json()
    assert same["changed"] is False
    manager.set_draining("B3", True)
    assert fleet.post("/allocations/k1/move", json={"server_id": "B3"}, headers=ADMIN).status_code == 409
    allocate(fleet, "k2", strategy="location", location="eu")  # B3, also in eu, is draining
    allocate(fleet, "k3", strategy="location", location="eu")
    assert server_of(fleet, "k2") == server_of(fleet, "k3") == "B1"
    full = fleet.post("/allocations/k1/move", json={"server_id": "B1"}, headers=ADMIN)
    assert full.status_code == 409
    assert "max_allocations" in full.get_json()["message"]
    assert fleet.post("/allocations/nope/move", json={"server_id": "B1"}, headers=ADMIN).status_code == 404
    entries = history(fleet, "k1")
    assert [(e["type"], e["from_server_id"], e["server_id"]) for e in entries] == [
        ("initial", None, "B1"),
        ("manual", "B1", "B2"),
    ]
    assert entries[1]["reason"] == "moved by the operator"
    assert entries[1]["outcome"] == "applied"


def test_max_allocations_is_a_server_option_kept_with_the_fleet(make_app, tmp_path):
    app = make_app()
    client = app.test_client()
    add_servers(app.extensions["backend_manager"], B1={})
    bad = client.patch("/admin/servers/B1", json={"max_allocations": -1}, headers=ADMIN)
    assert bad.status_code == 400 and "max_allocations" in bad.get_json()["errors"]
    ok = client.patch("/admin/servers/B1", json={"max_allocations": 7}, headers=ADMIN)
    assert ok.get_json()["data"]["max_allocations"] == 7
    app.extensions["gateway_shutdown"]()
    again = make_app().extensions["backend_manager"].get_server("B1")
    assert again.max_allocations == 7


# -- every body and query, checked ------------------------------------------------------------

ALLOCATE_BODIES = [
    ({}, "key"),
    ({"key": ""}, "key"),
    ({"key": "has space"}, "key"),
    ({"key": "-leading-dash"}, "key"),
    ({"key": "x" * 201}, "key"),
    ({"key": "a/b"}, "key"),
    ({"key": "history"}, "key"),
    ({"key": "rebalance"}, "key"),
    ({"key": 5}, "key"),
    ({"key": "k", "strategy": "round_robin"}, "strategy"),
    ({"key": "k", "strategy": 1}, "strategy"),
    ({"key": "k", "strategy": "location"}, "location"),
    ({"key": "k", "strategy": "location", "location": ""}, "location"),
    ({"key": "k", "strategy": "location", "location": "mars"}, "location"),
    ({"key": "k", "strategy": "affinity"}, "group"),
    ({"key": "k", "strategy": "isolation"}, "group"),
    ({"key": "k", "group": "has space"}, "group"),
    ({"key": "k", "group": ""}, "group"),
    ({"key": "k", "location": "x" * 201}, "location"),
    ({"key": "k", "server_id": "B1"}, "server_id"),
]


@pytest.mark.parametrize(("body", "field"), ALLOCATE_BODIES)
def test_a_bad_allocation_is_a_400_naming_the_field(fleet, body, field):
    response = fleet.post("/allocations", json=body, headers=ADMIN)
    assert response.status_code == 400
    assert field in response.get_json()["errors"]


MOVE_BODIES = [
    ({}, "server_id"),
    ({"server_id": ""}, "server_id"),
    ({"server_id": "has space"}, "server_id"),
    ({"server_id": 3}, "server_id"),
    ({"server_id": "B9"}, "server_id"),  # not registered
    ({"server_id": "B2", "key": "k"}, "key"),
]


@pytest.mark.parametrize(("body", "field"), MOVE_BODIES)
def test_a_bad_move_is_a_400_naming_the_field(fleet, body, field):
    allocate(fleet, "k1")
    response = fleet.post("/allocations/k1/move", json=body, headers=ADMIN)
    assert response.status_code == 400
    assert field in response.get_json()["errors"]


REBALANCE_BODIES = [
    ({"threshold": -1}, "threshold"),
    ({"threshold": 100.5}, "threshold"),
    ({"threshold": "30"}, "threshold"),
    ({"threshold": True}, "threshold"),
    ({"max_migrations": 0}, "max_migrations"),
    ({"max_migrations": 1001}, "max_migrations"),
    ({"max_migrations": 2.5}, "max_migrations"),
    ({"max_migrations": "3"}, "max_migrations"),
    ({"dry_run": "yes"}, "dry_run"),
    ({"dry_run": 1}, "dry_run"),
    ({"dryrun": True}, "dryrun"),
]


@pytest.mark.parametrize(("body", "field"), REBALANCE_BODIES)
def test_a_bad_rebalance_is_a_400_naming_the_field(fleet, body, field):
    response = fleet.post("/allocations/rebalance", json=body, headers=ADMIN)
    assert response.status_code == 400
    assert field in response.get_json()["errors"]


QUERIES = [
    ("/allocations?server_id=has%20space", "server_id"),
    ("/allocations?limit=0", "limit"),
    ("/allocations?limit=10001", "limit"),
    ("/allocations?limit=many", "limit"),
    ("/allocations?sort=key", "sort"),
    ("/allocations/history", "key"),
    ("/allocations/history?key=a%20b", "key"),
    ("/allocations/history?key=k&limit=101", "limit"),
]


@pytest.mark.parametrize(("path", "field"), QUERIES)
def test_a_bad_query_is_a_400_naming_the_parameter(fleet, path, field):
    response = fleet.get(path, headers=ADMIN)
    assert response.status_code == 400
    assert field in response.get_json()["errors"]


@pytest.mark.parametrize("path", ["/allocations", "/allocations/k1/move"])
@pytest.mark.parametrize("data", [b"", b"not json", b"[1, 2]"])
def test_a_body_that_is_not_a_json_object_is_a_400(fleet, path, data):
    allocate(fleet, "k1")
    response = fleet.post(path, data=data, content_type="application/json", headers=ADMIN)
    assert response.status_code == 400
