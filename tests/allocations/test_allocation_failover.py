"""Failure recovery: the keys of a server that left, or stayed down past ALLOCATION_FAILOVER_SECONDS, move."""

from __future__ import annotations

import pytest
from allocating import ADMIN, add_servers, allocate, history, mark_down, server_of
from conftest import wait_until

LONG_AGO = "2020-01-01T00:00:00+00:00"


def counts(client) -> dict[str, int]:
    return client.get("/allocations", headers=ADMIN).get_json()["data"]["counts"]


@pytest.fixture
def pinned(app, manager):
    """B1 (eu) holds a1, a2 and eu-1; B2 (eu) and B3 (us) have room."""
    add_servers(
        manager,
        B1={"labels": {"location": "eu"}},
        B2={"labels": {"location": "eu"}},
        B3={"labels": {"location": "us"}},
    )
    client = app.test_client()
    manager.set_draining("B2", True)
    manager.set_draining("B3", True)
    allocate(client, "a1")
    allocate(client, "a2", strategy="affinity", group="g")
    allocate(client, "eu-1", strategy="location", location="eu")
    manager.set_draining("B2", False)
    manager.set_draining("B3", False)
    assert counts(client) == {"B1": 3}
    return client


def settled(app) -> bool:
    return not app.extensions["allocation_failover"].busy


def test_an_unregistered_servers_keys_move_by_their_own_strategy(app, manager, pinned):
    assert manager.unregister_server("B1")
    assert wait_until(lambda: settled(app) and "B1" not in counts(pinned))
    assert server_of(pinned, "eu-1") == "B2"  # its location, eu
    # a1 to B2 (both idle: the first); a2 (affinity, its group nowhere else) to B3, now the freer
    assert (server_of(pinned, "a1"), server_of(pinned, "a2")) == ("B2", "B3")
    entry = history(pinned, "eu-1")[-1]
    assert (entry["type"], entry["from_server_id"], entry["server_id"]) == ("failover", "B1", "B2")
    assert entry["strategy"] == "location"
    assert entry["reason"].startswith("server B1 was unregistered; at location 'eu'")
    assert entry["load_score"] is not None


def test_a_key_nowhere_else_can_take_stays_and_the_next_sweep_tries_again(app, manager, pinned):
    manager.set_draining("B2", True)
    manager.unregister_server("B1")
    assert wait_until(lambda: settled(app))
    assert server_of(pinned, "eu-1") == "B1"  # no other eu server takes keys now
    assert server_of(pinned, "a1") == "B3"
    manager.set_draining("B2", False)
    watcher = app.extensions["allocation_failover"]
    watcher.health_checked([], 0.0)  # B1 is missing once: it may be new elsewhere (Redis mode)
    assert wait_until(lambda: settled(app))
    assert server_of(pinned, "eu-1") == "B1"
    watcher.health_checked([], 0.0)  # and twice: gone
    assert wait_until(lambda: settled(app) and server_of(pinned, "eu-1") == "B2")


def test_a_server_down_past_the_failover_time_loses_its_keys_at_the_sweep(make_app):
    app = make_app(allocation_failover_seconds=600)
    manager, client = app.extensions["backend_manager"], app.test_client()
    add_servers(manager, B1={}, B2={})
    manager.set_draining("B2", True)
    for key in ("k1", "k2"):
        allocate(client, key)
    manager.set_draining("B2", False)
    mark_down(manager, "B1")  # just now: it may be back soon
    for observer in manager.observers:  # as the sweep tells them
        observer.health_checked([], 0.0)
    assert wait_until(lambda: settled(app))
    assert counts(client) == {"B1": 2}
    mark_down(manager, "B1", since=LONG_AGO)
    for observer in manager.observers:
        observer.health_checked([], 0.0)
    assert wait_until(lambda: settled(app) and counts(client) == {"B2": 2})
    assert "has been unhealthy for over 600s" in history(client, "k1")[-1]["reason"]


def test_the_health_sweep_itself_fails_keys_over(make_app, fake_servers):
    app = make_app(allocation_failover_seconds=0, health_check_failures=1)
    manager, client = app.extensions["backend_manager"], app.test_client()
    b1, b2 = fake_servers("B1"), fake_servers("B2")
    manager.register_server("B1", "127.0.0.1", b1.port)
    manager.register_server("B2", "127.0.0.1", b2.port, options={"max_allocations": 1})
    allocate(client, "k1")
    allocate(client, "k2")
    assert counts(client) == {"B1": 1, "B2": 1}
    b2.stop()
    manager.run_health_sweep()
    assert not manager.get_server("B2").is_healthy
    assert wait_until(lambda: settled(app) and counts(client) == {"B1": 2})


def test_in_redis_mode_only_the_sweeps_leader_fails_keys_over(make_app, redis_server):
    leader, other = (make_app(redis_url=redis_server.url, redis_timeout=2.0) for _ in range(2))
    assert leader.extensions["backend_manager"].health_job.leader.is_leader
    assert not other.extensions["backend_manager"].health_job.leader.is_leader
    add_servers(leader.extensions["backend_manager"], B1={}, B2={})
    client = leader.test_client()
    leader.extensions["backend_manager"].set_draining("B2", True)
    allocate(client, "k1")
    leader.extensions["backend_manager"].set_draining("B2", False)
    other_manager = other.extensions["backend_manager"]
    other_manager.follower.catch_up()
    assert other_manager.unregister_server("B1")  # told to the other process's observers, which do not lead
    assert wait_until(lambda: settled(other) and len(leader.extensions["backend_manager"].list_servers()) == 1)
    assert server_of(client, "k1") == "B1"
    watcher = leader.extensions["allocation_failover"]
    watcher.health_checked([], 0.0)
    watcher.health_checked([], 0.0)
    assert wait_until(lambda: settled(leader) and server_of(client, "k1") == "B2")
    assert history(other.test_client(), "k1")[-1]["type"] == "failover"
