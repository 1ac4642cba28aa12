"""Task affinity, in SQLite (TaskAffinity) and in Redis (RedisTaskAffinity): records survive reopening and expire."""

import logging
import threading

import pytest

from gateway.cluster.connection import Redis, RedisUnavailable
from gateway.routing.affinity import TaskAffinity
from gateway.routing.affinity_redis import RedisTaskAffinity
from tests.conftest import wait_until


@pytest.fixture(params=["sqlite", "redis"])
def open_affinity(request, tmp_path):
    """Open the store of the kind under test; a second call opens it again (a restart, or another process)."""
    opened = []

    def open_store(ttl: float = 86400.0):
        if request.param == "sqlite":
            store = TaskAffinity(tmp_path / "t.db", ttl=ttl)
        else:
            redis_server = request.getfixturevalue("redis_server")
            store = RedisTaskAffinity(Redis(redis_server.url, timeout=0.5), ttl=ttl)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()
        if isinstance(store, RedisTaskAffinity):
            store.redis.close()


def test_record_and_look_up(open_affinity):
    affinity = open_affinity()
    affinity.record("task-1", "B1")
    affinity.record("task-2", "B2")
    assert affinity.owner("task-1") == "B1"
    assert affinity.owner("nope") is None
    assert affinity.first_owned(["api", "status", "task-2", "task-1"]) == ("task-2", "B2")
    assert affinity.first_owned(["api", "x"]) is None
    assert affinity.first_owned([]) is None


def test_another_server_cannot_take_a_task_its_owner_holds(open_affinity):
    affinity = open_affinity()
    assert affinity.record("task-1", "B1")
    assert not affinity.record("task-1", "B2")
    assert affinity.record("task-1", "B1")  # the same owner again: its expiry moves on
    assert affinity.owner("task-1") == "B1"


def test_records_survive_reopening(open_affinity):
    affinity = open_affinity()
    affinity.record("task-1", "B1")
    affinity.close()
    assert open_affinity().owner("task-1") == "B1"


def test_records_expire(open_affinity):
    affinity = open_affinity(ttl=0.2)
    affinity.record("task-1", "B1")
    assert affinity.owner("task-1") == "B1"
    assert wait_until(lambda: affinity.owner("task-1") is None, timeout=5)
    assert affinity.first_owned(["task-1"]) is None
    assert affinity.record("task-1", "B2")  # an expired task may have a new owner


def test_sqlite_purges_expired_records(tmp_path):
    affinity = TaskAffinity(tmp_path / "t.db", ttl=0.2)
    affinity.record("task-1", "B1")
    assert wait_until(lambda: affinity.owner("task-1") is None, timeout=5)
    assert affinity.purge_expired() == 1
    affinity.close()


def test_overlong_candidates_are_ignored(open_affinity):
    affinity = open_affinity()
    assert affinity.first_owned(["x" * 10_000]) is None
    assert affinity.owner("x" * 10_000) is None
    assert not affinity.record("x" * 10_000, "B1")


def test_corrupt_store_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not a database" * 100)
    affinity = TaskAffinity(path)
    affinity.record("task-1", "B1")
    assert affinity.owner("task-1") == "B1"
    assert len(list(tmp_path.glob("t.db.corrupt-*"))) == 1
    assert "corrupt" in caplog.text
    affinity.close()


# -- Redis: several processes share the records --------------------------------------------------


@pytest.fixture
def two_processes(redis_server):
    stores = [RedisTaskAffinity(Redis(redis_server.url, timeout=0.5)) for _ in range(2)]
    yield stores
    for store in stores:
        store.redis.close()


def test_a_task_one_process_records_is_seen_by_another(two_processes):
    first, second = two_processes
    assert first.record("task-1", "B1")
    assert second.owner("task-1") == "B1"
    assert second.first_owned(["status", "task-1"]) == ("task-1", "B1")
    assert not second.record("task-1", "B2")
    assert first.owner("task-1") == "B1"


def test_only_one_owner_wins_a_race_between_processes(two_processes):
    won: list[str] = []
    start = threading.Barrier(20)

    def claim(store: RedisTaskAffinity, server_id: str) -> None:
        start.wait(timeout=10)
        if store.record("task-1", server_id):
            won.append(server_id)

    threads = [
        threading.Thread(target=claim, args=(two_processes[i % 2], f"B{i}")) for i in range(20)
    ]  # every claim from another server
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(won) == 1
    assert two_processes[0].owner("task-1") == won[0]


def test_with_redis_down_lookups_find_no_owner_and_records_raise(two_processes, redis_server, caplog):
    caplog.set_level(logging.WARNING)
    store = two_processes[0]
    store.record("task-1", "B1")
    redis_server.kill()
    assert store.owner("task-1") is None
    assert store.first_owned(["task-1"]) is None  # the request still goes somewhere
    assert caplog.text.count("task owners cannot be looked up") == 1
    with pytest.raises(RedisUnavailable):
        store.record("task-2", "B1")
    redis_server.start()  # the append-only file kept the record
    assert store.owner("task-1") == "B1"
