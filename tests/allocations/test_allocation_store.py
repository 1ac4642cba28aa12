"""The allocation stores, SQLite (embedded) and Redis, held to the same tests: places, moves, caps, history."""

from __future__ import annotations

import threading

import pytest

from gateway.allocations.records import HISTORY_LIMIT, Allocation, Move, NoRoom, stamp
from gateway.allocations.redis_store import RedisAllocationStore
from gateway.allocations.store import SQLiteAllocationStore
from gateway.cluster.connection import Redis


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request, tmp_path):
    """Open the store of the kind under test; each call opens another (a restart, or another process)."""
    opened = []

    def open_one():
        if request.param == "sqlite":
            store = SQLiteAllocationStore(tmp_path / "allocations.db")
        else:
            store = RedisAllocationStore(Redis(request.getfixturevalue("redis_server").url, timeout=2.0))
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()
        if isinstance(store, RedisAllocationStore):
            store.redis.close()


def new(key: str, server_id: str = "B1", group: str | None = None) -> tuple[Allocation, Move]:
    now = stamp()
    allocation = Allocation(key, server_id, "isolation" if group else "load_balance", group, None, now, now)
    return allocation, Move(key, "initial", server_id, load_score=0.0, reason="test", created_at=now)


def put(store, key: str, server_id: str = "B1", capacity: int = 0, group: str | None = None):
    allocation, entry = new(key, server_id, group)
    return store.place(allocation, capacity, entry)


def moving(key: str, from_id: str, to_id: str) -> Move:
    return Move(key, "manual", to_id, from_id, 10.0, reason="by hand", created_at=stamp())


def test_a_placed_key_is_kept_and_a_second_placement_returns_the_first(open_store):
    store = open_store()
    first, created = put(store, "k1", "B1")
    assert created and first.server_id == "B1"
    again, created = put(store, "k1", "B2")
    assert (again.server_id, created) == ("B1", False)
    assert open_store().get("k1") == first  # it survives a reopening, and another process sees it
    assert store.get("nope") is None


def test_a_server_at_its_cap_takes_no_more_and_a_release_frees_its_room(open_store):
    store = open_store()
    for key in ("k1", "k2"):
        put(store, key, capacity=2)
    with pytest.raises(NoRoom, match="B1 is at its max_allocations"):
        put(store, "k3", capacity=2)
    assert store.get("k3") is None
    assert store.release("k1").key == "k1"
    assert store.release("k1") is None
    put(store, "k3", capacity=2)
    assert (store.counts(), store.total(), store.total("B1")) == ({"B1": 2}, 2, 2)


def test_a_move_happens_only_from_where_the_key_is_and_into_room(open_store):
    store = open_store()
    put(store, "k1", "B1")
    put(store, "k2", "B2")
    assert store.move("k1", "B3", "B2", 0, moving("k1", "B3", "B2")) is None  # it is not on B3
    assert store.move("gone", "B1", "B2", 0, moving("gone", "B1", "B2")) is None
    with pytest.raises(NoRoom):
        store.move("k1", "B1", "B2", 1, moving("k1", "B1", "B2"))
    moved = store.move("k1", "B1", "B2", 2, moving("k1", "B1", "B2"))
    assert moved is not None and moved.server_id == "B2"
    assert store.get("k1").server_id == "B2"
    assert store.counts() == {"B2": 2}
    assert [a.key for a in store.allocations("B2")] == ["k1", "k2"]
    assert store.allocations("B1") == []
    assert [(m.type, m.from_server_id, m.server_id) for m in store.history("k1")] == [
        ("initial", None, "B1"),
        ("manual", "B1", "B2"),
    ]


def test_group_counts_follow_places_moves_and_releases(open_store):
    store = open_store()
    for key, server_id in (("a", "B1"), ("b", "B1"), ("c", "B2")):
        put(store, key, server_id, group="g")
    put(store, "other", "B2", group="h")
    assert store.group_counts("g") == {"B1": 2, "B2": 1}
    store.move("a", "B1", "B2", 0, moving("a", "B1", "B2"))
    store.release("b")
    assert store.group_counts("g") == {"B2": 2}
    assert store.group_counts("h") == {"B2": 1}
    assert store.group_counts("none") == {}


def test_the_history_keeps_the_newest_entries_oldest_first_and_outlives_a_release(open_store):
    store = open_store()
    put(store, "k1")
    for n in range(HISTORY_LIMIT + 5):
        store.record(Move("k1", "rebalance", "B2", "B1", float(n), outcome="refused", created_at=stamp()))
    history = store.history("k1")
    assert len(history) == HISTORY_LIMIT
    assert [m.load_score for m in history[-2:]] == [float(HISTORY_LIMIT + 3), float(HISTORY_LIMIT + 4)]
    assert [m.load_score for m in store.history("k1", limit=1)] == [float(HISTORY_LIMIT + 4)]
    store.release("k1")
    assert len(store.history("k1")) == HISTORY_LIMIT


def test_one_move_of_a_key_at_a_time(open_store):
    store, other = open_store(), open_store()
    token = store.claim("k1", 30)
    assert token is not None
    assert store.claim("k1", 30) is None
    if isinstance(store, RedisAllocationStore):
        assert other.claim("k1", 30) is None  # another process's move waits too
    store.unclaim("k1", "not-the-token")
    assert store.claim("k1", 30) is None
    store.unclaim("k1", token)
    assert store.claim("k1", 30) is not None
    assert store.claim("k2", 30) is not None


def test_twenty_concurrent_placements_never_pass_the_cap(open_store):
    # In Redis mode they go through two stores, as two gateway processes would.
    stores = [open_store(), open_store()]
    placed, refused, errors = [], [], []

    def place(n: int) -> None:
        try:
            put(stores[n % 2], f"k{n}", capacity=5)
            placed.append(n)
        except NoRoom:
            refused.append(n)
        except Exception as exc:  # any other failure fails the test below
            errors.append(exc)

    threads = [threading.Thread(target=place, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert (len(placed), len(refused)) == (5, 15)
    assert stores[0].counts() == {"B1": 5}
    assert sorted(a.key for a in stores[1].allocations("B1")) == sorted(f"k{n}" for n in placed)
