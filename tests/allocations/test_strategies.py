"""Seed 003's score and strategies, and the rebalance's next move: tables of fleets and the server each picks."""

from __future__ import annotations

import pytest

from gateway.allocations.records import Allocation, NoRoom
from gateway.allocations.strategies import Place, choose, moved, next_move, reading_load, score, scores
from gateway.fleet.resources import GPU, Reading

GIB = 1024**3


def reading(cpu: float, memory: float, disk: float, gpu_used: float = 0.0) -> Reading:
    gpus = (GPU(0, 10 * GIB, int(gpu_used * GIB), int((10 - gpu_used) * GIB)),)
    return Reading(0.0, "gpu", cpu, 100 * GIB, 50 * GIB, memory, disk, gpus)


def fleet(*rows: tuple) -> list[Place]:
    """(id, keys, capacity, load, location, in_group) rows, in registration order."""
    return [Place(row[0], *row[1:], order=n) for n, row in enumerate(rows)]


def test_the_score_is_seed_003s_with_the_allocation_share_in_the_accounts_place():
    # cpu 50, memory 40, disk 20; 3 of 10 keys: 0.3*50 + 0.3*40 + 0.3*30 + 0.1*20 = 38
    load = reading_load(reading(50, 40, 20, gpu_used=9))  # GPU memory in use counts no more: the keys do
    assert load == pytest.approx(29.0)
    assert score(Place("B1", allocations=3, capacity=10, load=load), total=3) == 38.0


@pytest.mark.parametrize(
    ("place", "total", "expected"),
    [
        (Place("B1", allocations=2, capacity=4), 2, 50.0),  # no reading: the share alone
        (Place("B1", allocations=2, capacity=0), 8, 25.0),  # uncapped: its share of every key compared
        (Place("B1", allocations=0, capacity=0), 0, 0.0),
        (Place("B1", allocations=4, capacity=4, load=10.0), 4, 40.0),  # full: 10 + 0.3 * 100
    ],
)
def test_how_each_server_scores(place, total, expected):
    assert score(place, total) == expected


LOAD_BALANCE = [
    # (places, expected): the lowest score; ties by fewer keys, then registration order
    (fleet(("B1", 0, 0, 60.0), ("B2", 0, 0, 20.0), ("B3", 0, 0, 40.0)), "B2"),
    (fleet(("B1", 3, 4), ("B2", 1, 4), ("B3", 2, 4)), "B2"),
    (fleet(("B1", 4, 4, 0.0), ("B2", 1, 4, 50.0)), "B2"),  # B1 is full, however idle
    (fleet(("B1", 0, 0), ("B2", 0, 0)), "B1"),
    (fleet(("B1", 5, 0), ("B2", 1, 0), ("B3", 2, 0)), "B2"),  # uncapped: by their share of all keys
    (fleet(("B1", 1, 2, 10.0), ("B2", 0, 0, 24.0)), "B2"),  # 10 + 0.3*50 = 25 against 24 + 0
]


@pytest.mark.parametrize(("places", "expected"), LOAD_BALANCE)
def test_load_balance_takes_the_lowest_score_with_room(places, expected):
    assert choose("load_balance", places).server_id == expected


LOCATION = [
    (fleet(("B1", 0, 0, 10.0, "us"), ("B2", 0, 0, 50.0, "eu"), ("B3", 0, 0, 30.0, "eu")), "eu", "B3"),
    (fleet(("B1", 0, 0, 10.0, "us"), ("B2", 2, 2, 0.0, "eu"), ("B3", 0, 0, 90.0, "eu")), "eu", "B3"),
    (fleet(("B1", 0, 0, 10.0, "us"), ("B2", 0, 0, 50.0, "eu")), "us", "B1"),
]


@pytest.mark.parametrize(("places", "location", "expected"), LOCATION)
def test_location_takes_the_lowest_score_at_that_location(places, location, expected):
    choice = choose("location", places, location=location)
    assert choice.server_id == expected
    assert repr(location) in choice.reason


AFFINITY = [
    # (places, expected): most keys of the group among those with room, then the lowest score
    (fleet(("B1", 1, 0, 10.0, None, 1), ("B2", 3, 0, 80.0, None, 3), ("B3", 0, 0, 0.0)), "B2"),
    (fleet(("B1", 1, 0, 10.0, None, 1), ("B2", 3, 3, 0.0, None, 3), ("B3", 0, 0, 0.0)), "B1"),  # B2 is full
    (fleet(("B1", 2, 0, 70.0), ("B2", 0, 0, 20.0)), "B2"),  # nobody holds the group: the lowest score
    (fleet(("B1", 2, 0, 70.0, None, 2), ("B2", 2, 0, 20.0, None, 2)), "B2"),  # a tie: the lower score
]


@pytest.mark.parametrize(("places", "expected"), AFFINITY)
def test_affinity_joins_the_server_with_most_of_its_group(places, expected):
    assert choose("affinity", places, group="g").server_id == expected


ISOLATION = [
    # (places, expected): fewest keys of the group, then the lowest score
    (fleet(("B1", 0, 0, 0.0, None, 2), ("B2", 5, 0, 80.0, None, 0), ("B3", 1, 0, 10.0, None, 1)), "B2"),
    (fleet(("B1", 0, 0, 0.0, None, 1), ("B2", 1, 1, 0.0, None, 0), ("B3", 1, 0, 50.0, None, 1)), "B1"),
    (fleet(("B1", 1, 0, 30.0, None, 1), ("B2", 1, 0, 20.0, None, 1)), "B2"),
]


@pytest.mark.parametrize(("places", "expected"), ISOLATION)
def test_isolation_spreads_one_group(places, expected):
    assert choose("isolation", places, group="g").server_id == expected


@pytest.mark.parametrize(
    ("strategy", "places", "location", "says"),
    [
        ("load_balance", [], None, "no healthy server"),
        ("load_balance", fleet(("B1", 2, 2), ("B2", 1, 1)), None, "max_allocations"),
        ("location", fleet(("B1", 0, 0, None, "us")), "eu", "location 'eu'"),
        ("location", fleet(("B1", 1, 1, None, "eu")), "eu", "location 'eu'"),
        ("affinity", fleet(("B1", 1, 1, None, None, 1)), None, "max_allocations"),
    ],
)
def test_no_room_says_where_none_was(strategy, places, location, says):
    with pytest.raises(NoRoom, match=says):
        choose(strategy, places, group="g", location=location)


def keys_of(server_id: str, count: int, strategy: str = "load_balance", location: str | None = None) -> list:
    return [
        Allocation(f"{server_id}-{n}", server_id, strategy, location=location, updated_at=f"{n:03}")
        for n in range(count)
    ]


def test_a_rebalance_moves_from_the_most_to_the_least_loaded_until_the_gap_is_within_the_threshold():
    places = fleet(("B1", 8, 10), ("B2", 0, 10), ("B3", 2, 10))
    keys = {"B1": keys_of("B1", 8), "B3": keys_of("B3", 2)}
    plan = []
    while (move := next_move(places, keys, threshold=30)) is not None:
        plan.append((move.from_server_id, move.to_server_id, move.gap))
        places, keys = moved(places, keys, move)
    assert plan == [("B1", "B2", 80.0), ("B1", "B2", 60.0), ("B1", "B2", 40.0)]
    assert scores(places) == {"B1": 50.0, "B2": 30.0, "B3": 20.0}  # B1 to B3 is 30 now: within


def test_a_rebalance_moves_the_newest_key_first_and_a_location_key_only_within_its_location():
    places = fleet(("B1", 3, 4, None, "eu"), ("B2", 0, 4, None, "us"))
    keys = {"B1": [*keys_of("B1", 2, "location", "eu"), Allocation("free", "B1", updated_at="000")]}
    first = next_move(places, keys, threshold=10)
    assert first is not None and first.key == "free"  # the location keys stay in eu
    assert next_move(places, keys, threshold=10, skip={"free"}) is None
    newest = next_move(fleet(("B1", 2, 2), ("B2", 0, 2)), {"B1": keys_of("B1", 2)}, threshold=10)
    assert newest is not None and newest.key == "B1-1"


@pytest.mark.parametrize(
    ("places", "keys", "threshold"),
    [
        (fleet(("B1", 3, 10), ("B2", 1, 10)), {"B1": keys_of("B1", 3)}, 30),  # gap 20: within
        (fleet(("B1", 1, 1), ("B2", 0, 1)), {"B1": keys_of("B1", 1)}, 30),  # it would only swap them
        (fleet(("B1", 2, 2), ("B2", 2, 2)), {"B1": keys_of("B1", 2)}, 0),
    ],
)
def test_no_move_when_the_gap_is_within_the_threshold_or_a_move_would_only_swap(places, keys, threshold):
    assert next_move(places, keys, threshold) is None
