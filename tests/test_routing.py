"""SequentialRotation: strict order, skipping, and keeping its place as the fleet changes."""

import pytest

from routing import SequentialRotation


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
