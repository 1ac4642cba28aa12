"""Routing policies: strict rotation, smooth weighted round-robin, least connections, sticky keys, tiers."""

from collections import Counter

import pytest

from gateway.routing.policies import (
    Candidate,
    SequentialRotation,
    SmoothWeightedRoundRobin,
    best_tier,
    choose_least_connections,
    choose_sticky,
    slow_start_weight,
)


def picks(rotation: SequentialRotation, count: int, exclude=()) -> list[str | None]:
    return [rotation.choose(exclude) for _ in range(count)]


def fleet(*spec: str) -> list[tuple[str, bool]]:
    """'B1' is healthy, '-B1' is unhealthy."""
    return [(name.lstrip("-"), not name.startswith("-")) for name in spec]


def test_strict_rotation_in_registration_order():
    rotation = SequentialRotation()
    rotation.rebuild(fleet("B1", "B2", "B3"))
    assert picks(rotation, 7) == ["B1", "B2", "B3", "B1", "B2", "B3", "B1"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (("-B1", "B2", "B3"), ["B2", "B3", "B2", "B3"]),
        (("B1", "-B2", "B3"), ["B1", "B3", "B1", "B3"]),
        (("B1", "B2", "-B3"), ["B1", "B2", "B1", "B2"]),
        (("-B1", "-B2", "B3"), ["B3", "B3", "B3", "B3"]),
        (("-B1", "-B2", "-B3"), [None, None, None, None]),
        ((), [None, None, None, None]),
    ],
)
def test_skips_unhealthy(spec, expected):
    rotation = SequentialRotation()
    rotation.rebuild(fleet(*spec))
    assert picks(rotation, 4) == expected


def test_recovered_server_rejoins_at_its_place():
    rotation = SequentialRotation()
    rotation.rebuild(fleet("B1", "-B2", "B3"))
    assert picks(rotation, 2) == ["B1", "B3"]
    rotation.rebuild(fleet("B1", "B2", "B3"))
    assert picks(rotation, 3) == ["B1", "B2", "B3"]


def test_new_server_joins_without_resetting_the_rotation():
    rotation = SequentialRotation()
    rotation.rebuild(fleet("B1", "B2", "B3"))
    assert picks(rotation, 2) == ["B1", "B2"]
    rotation.rebuild(fleet("B1", "B2", "B3", "B4"))
    assert picks(rotation, 4) == ["B3", "B4", "B1", "B2"]


def test_removing_the_last_pick_goes_on_with_its_follower():
    rotation = SequentialRotation()
    rotation.rebuild(fleet("B1", "B2", "B3", "B4"))
    assert picks(rotation, 2) == ["B1", "B2"]
    rotation.rebuild(fleet("B1", "B3", "B4"))
    assert picks(rotation, 3) == ["B3", "B4", "B1"]


def test_removing_the_last_pick_at_the_end_wraps():
    rotation = SequentialRotation()
    rotation.rebuild(fleet("B1", "B2", "B3"))
    assert picks(rotation, 3) == ["B1", "B2", "B3"]
    rotation.rebuild(fleet("B1", "B2"))
    assert picks(rotation, 2) == ["B1", "B2"]


def test_exclude_skips_servers_already_tried():
    rotation = SequentialRotation()
    rotation.rebuild(fleet("B1", "B2", "B3"))
    assert rotation.choose({"B1"}) == "B2"
    assert rotation.choose({"B3", "B1"}) == "B2"
    assert rotation.choose({"B1", "B2", "B3"}) is None


def test_every_server_gets_an_equal_share_of_a_long_run():
    rotation = SequentialRotation()
    rotation.rebuild(fleet(*(f"B{i}" for i in range(50))))
    counts: dict[str | None, int] = {}
    for pick in picks(rotation, 5000):
        counts[pick] = counts.get(pick, 0) + 1
    assert set(counts.values()) == {100}


# --- Candidate policies: smooth weighted round-robin, least connections, sticky, slow start, tiers ---


def weighted(**weights: float) -> list[Candidate]:
    return [Candidate(server_id, weight) for server_id, weight in weights.items()]


def swrr_picks(swrr: SmoothWeightedRoundRobin, candidates: list[Candidate], count: int) -> list[str | None]:
    return [swrr.choose(candidates) for _ in range(count)]


def test_swrr_weights_one_to_two_give_exact_shares():
    counts = Counter(swrr_picks(SmoothWeightedRoundRobin(), weighted(a=1, b=2), 300))
    assert counts == {"a": 100, "b": 200}


def test_swrr_follows_nginx_documented_sequence():
    assert swrr_picks(SmoothWeightedRoundRobin(), weighted(a=5, b=1, c=1), 14) == list("aabacaa" * 2)


def test_swrr_equal_weights_rotate_strictly_in_candidate_order():
    candidates = weighted(B1=1, B2=1, B3=1)
    assert swrr_picks(SmoothWeightedRoundRobin(), candidates, 7) == ["B1", "B2", "B3", "B1", "B2", "B3", "B1"]


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        ([], None),
        (weighted(only=0.25), "only"),
    ],
)
def test_swrr_small_candidate_sets(candidates, expected):
    assert SmoothWeightedRoundRobin().choose(candidates) == expected


def test_swrr_fractional_weights_keep_their_shares():
    counts = Counter(swrr_picks(SmoothWeightedRoundRobin(), weighted(a=0.1, b=0.3), 400))
    assert counts == {"a": 100, "b": 300}


def test_swrr_server_excluded_for_one_pick_keeps_its_place():
    swrr = SmoothWeightedRoundRobin()
    everyone = weighted(B1=1, B2=1, B3=1)
    assert swrr.choose(everyone) == "B1"
    assert swrr.choose([c for c in everyone if c.server_id != "B2"]) == "B3"
    # B2 missed its turn, so it goes next, and no server loses its share over a long run.
    assert swrr.choose(everyone) == "B2"
    assert Counter(swrr_picks(swrr, everyone, 297)) + Counter(["B1", "B3", "B2"]) == {"B1": 100, "B2": 100, "B3": 100}


def test_swrr_new_server_starts_from_zero_and_forget_drops_state():
    swrr = SmoothWeightedRoundRobin()
    swrr_picks(swrr, weighted(B1=1, B2=1), 3)
    swrr.forget({"B2"})
    assert swrr_picks(swrr, weighted(B1=1, B2=1, B3=1), 3) == ["B2", "B1", "B3"]


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        ([], None),
        ([Candidate("a", 1, 3), Candidate("b", 1, 1), Candidate("c", 1, 2)], "b"),
        ([Candidate("a", 1, 2), Candidate("b", 3, 4)], "b"),  # 4/3 < 2/1
        ([Candidate("a", 2, 3), Candidate("b", 1, 2)], "a"),  # 3/2 < 2/1
        ([Candidate("a", 0.1, 1), Candidate("b", 0.3, 4)], "a"),  # 10 < 13.3
        ([Candidate("a", 5, 0), Candidate("b", 1, 1)], "a"),
    ],
)
def test_least_connections_picks_least_load_per_weight(candidates, expected):
    assert choose_least_connections(candidates, SmoothWeightedRoundRobin()) == expected


def test_least_connections_ties_take_turns():
    swrr = SmoothWeightedRoundRobin()
    tied = [Candidate("B1", 1, 2), Candidate("B2", 2, 4), Candidate("B3", 1, 2), Candidate("busy", 1, 9)]
    assert Counter(choose_least_connections(tied, swrr) for _ in range(8)) == {"B1": 2, "B2": 4, "B3": 2}
    equal = [Candidate(f"B{i}", 1, 0) for i in range(1, 4)]
    rotation = SmoothWeightedRoundRobin()
    assert [choose_least_connections(equal, rotation) for _ in range(4)] == ["B1", "B2", "B3", "B1"]


KEYS = [f"session-{i}" for i in range(1000)]


def sticky_map(servers: list[str]) -> dict[str, str | None]:
    candidates = [Candidate(server_id) for server_id in servers]
    return {key: choose_sticky(key, candidates) for key in KEYS}


def test_sticky_is_stable_and_spreads_keys():
    servers = [f"B{i}" for i in range(5)]
    assert sticky_map(servers) == sticky_map(servers)
    assert sticky_map(servers) == sticky_map(list(reversed(servers)))
    assert all(150 < share < 250 for share in Counter(sticky_map(servers).values()).values())


def test_sticky_removing_a_server_moves_only_its_keys():
    before = sticky_map([f"B{i}" for i in range(5)])
    after = sticky_map(["B0", "B1", "B3", "B4"])
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == "B2"}
    assert moved


def test_sticky_adding_a_server_moves_keys_only_onto_it():
    before = sticky_map([f"B{i}" for i in range(5)])
    after = sticky_map([f"B{i}" for i in range(6)])
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved
    assert all(after[key] == "B5" for key in moved)


def test_sticky_shares_follow_weights():
    candidates = weighted(light=1, heavy=3)
    counts = Counter(choose_sticky(f"key-{i}", candidates) for i in range(20000))
    assert counts["light"] / 20000 == pytest.approx(0.25, abs=0.02)


def test_sticky_without_candidates():
    assert choose_sticky("key", []) is None


@pytest.mark.parametrize(
    ("seconds_back", "window", "expected"),
    [
        (None, 60, 10.0),
        (0, 60, 1.0),
        (30, 60, 5.5),
        (54, 60, 9.1),
        (60, 60, 10.0),
        (600, 60, 10.0),
        (-5, 60, 1.0),
        (0, 0, 10.0),
        (5, -1, 10.0),
    ],
)
def test_slow_start_ramps_from_a_tenth_to_full(seconds_back, window, expected):
    assert slow_start_weight(10.0, seconds_back, window) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("servers", "expected"),
    [
        ([], []),
        ([("a", 2)], [("a", 2)]),
        ([("a", 2), ("b", 1), ("c", 3), ("d", 1)], [("b", 1), ("d", 1)]),
        ([("a", 1), ("b", 1)], [("a", 1), ("b", 1)]),
    ],
)
def test_best_tier_keeps_lowest_priority_number_in_order(servers, expected):
    assert best_tier(servers, lambda server: server[1]) == expected
