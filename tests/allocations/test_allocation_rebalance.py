"""POST /allocations/rebalance (a dry run, and for real), and caps that hold under twenty allocations at once."""

from __future__ import annotations

import threading

import pytest
from allocating import ADMIN, add_servers, allocate, give_reading, history


@pytest.fixture
def crowded(app, manager):
    """B1 holds 8 keys of its 10, B2 (room for 10) none, B3 (room for 10) two; no readings."""
    add_servers(manager, B1={"max_allocations": 10}, B2={"max_allocations": 10}, B3={"max_allocations": 10})
    client = app.test_client()
    manager.set_draining("B2", True)
    manager.set_draining("B3", True)
    for n in range(8):
        assert allocate(client, f"k{n}").get_json()["data"]["server_id"] == "B1"
    manager.set_draining("B1", True)
    manager.set_draining("B3", False)
    for n in (8, 9):
        assert allocate(client, f"k{n}").get_json()["data"]["server_id"] == "B3"
    manager.set_draining("B1", False)
    manager.set_draining("B2", False)
    return client


def where(client) -> dict[str, str]:
    return {
        row["key"]: row["server_id"]
        for row in client.get("/allocations", headers=ADMIN).get_json()["data"]["allocations"]
    }


def test_a_dry_run_lists_the_moves_and_changes_nothing(crowded):
    before = where(crowded)
    reply = crowded.post("/allocations/rebalance", json={"dry_run": True}, headers=ADMIN)
    assert reply.status_code == 200
    data = reply.get_json()["data"]
    assert data["dry_run"] is True
    assert [(m["from_server_id"], m["to_server_id"], m["gap"], m["outcome"]) for m in data["moves"]] == [
        ("B1", "B2", 80.0, "planned"),
        ("B1", "B2", 60.0, "planned"),
        ("B1", "B2", 40.0, "planned"),
    ]
    assert data["scores_before"] == {"B1": 80.0, "B2": 0.0, "B3": 20.0}
    assert data["scores_after"] == {"B1": 50.0, "B2": 30.0, "B3": 20.0}
    assert (data["moved"], reply.get_json()["message"]) == (0, "rebalance would move 3 keys")
    assert where(crowded) == before
    assert all(entry["type"] != "rebalance" for key in before for entry in history(crowded, key))


def test_a_rebalance_moves_keys_and_records_each_move(crowded):
    reply = crowded.post("/allocations/rebalance", json={"threshold": 30}, headers=ADMIN).get_json()["data"]
    assert reply["moved"] == 3
    assert [m["outcome"] for m in reply["moves"]] == ["applied"] * 3
    counts = crowded.get("/allocations", headers=ADMIN).get_json()["data"]["counts"]
    assert counts == {"B1": 5, "B2": 3, "B3": 2}
    moved_key = reply["moves"][0]["key"]
    entry = history(crowded, moved_key)[-1]
    assert (entry["type"], entry["from_server_id"], entry["server_id"]) == ("rebalance", "B1", "B2")
    assert (entry["load_score"], entry["strategy"], entry["outcome"]) == (0.0, "load_balance", "applied")
    assert "load gap 80 over the threshold 30" in entry["reason"]
    # Balanced within the threshold now: a second run moves nothing.
    assert crowded.post("/allocations/rebalance", json={}, headers=ADMIN).get_json()["data"]["moves"] == []


def test_max_migrations_bounds_a_run_and_no_body_takes_the_defaults(crowded):
    one = crowded.post("/allocations/rebalance", json={"max_migrations": 1, "threshold": 0}, headers=ADMIN)
    assert one.get_json()["data"]["moved"] == 1
    defaults = crowded.post("/allocations/rebalance", headers=ADMIN).get_json()["data"]
    assert (defaults["threshold"], defaults["max_migrations"], defaults["dry_run"]) == (30.0, 10, False)


def test_a_loaded_host_sheds_keys_to_an_idle_one(app, manager):
    add_servers(manager, B1={}, B2={})
    client = app.test_client()
    give_reading(manager, "B1", cpu=0)
    give_reading(manager, "B2", cpu=100, memory=100)
    manager.set_draining("B1", True)
    for n in range(4):
        allocate(client, f"k{n}")
    manager.set_draining("B1", False)
    data = client.post("/allocations/rebalance", json={"dry_run": True, "threshold": 30}, headers=ADMIN).get_json()
    # B2: 60 from its reading + 0.3 x 100 (it holds every key); B1: 0. The readings stay as they are in a
    # dry run, so the gap stays over 30 (82.5 - 7.5, 75 - 15, 67.5 - 22.5) until every key is on B1.
    assert data["data"]["scores_before"] == {"B1": 0.0, "B2": 90.0}
    assert [m["to_server_id"] for m in data["data"]["moves"]] == ["B1"] * 4
    assert data["data"]["scores_after"] == {"B1": 30.0, "B2": 60.0}


def twenty_at_once(clients) -> tuple[list[int], list[int], list[object]]:
    """Allocate k0..k19 from twenty threads, each through the next client in turn."""
    created, refused, other = [], [], []

    def one(n: int) -> None:
        response = allocate(clients[n % len(clients)], f"k{n}")
        (created if response.status_code == 201 else refused if response.status_code == 503 else other).append(
            response.status_code
        )

    threads = [threading.Thread(target=one, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return created, refused, other


def test_twenty_allocations_at_once_never_pass_a_cap(app, manager):
    add_servers(manager, B1={"max_allocations": 4}, B2={"max_allocations": 3}, B3={"max_allocations": 5})
    created, refused, other = twenty_at_once([app.test_client() for _ in range(4)])
    assert other == []
    assert (len(created), len(refused)) == (12, 8)
    counts = app.test_client().get("/allocations", headers=ADMIN).get_json()["data"]["counts"]
    assert counts == {"B1": 4, "B2": 3, "B3": 5}


def test_twenty_allocations_at_once_through_two_gateways_on_one_redis_never_pass_a_cap(make_app, redis_server):
    first, second = (make_app(redis_url=redis_server.url, redis_timeout=2.0) for _ in range(2))
    add_servers(first.extensions["backend_manager"], B1={"max_allocations": 4}, B2={"max_allocations": 3})
    second.extensions["backend_manager"].follower.catch_up()
    assert len(second.extensions["backend_manager"].list_servers()) == 2
    created, refused, other = twenty_at_once([first.test_client(), second.test_client()])
    assert other == []
    assert (len(created), len(refused)) == (7, 13)
    for app in (first, second):
        assert app.test_client().get("/allocations", headers=ADMIN).get_json()["data"]["counts"] == {"B1": 4, "B2": 3}
