"""Where a key goes: seed 003's load score and its four strategies, and the rebalance's next move. No I/O.

The score is seed 003's, 0-100 and lower is freer: CPU, memory and disk from the server's
monitor reading, weighted by LOAD_SCORE_WEIGHTS as /admin/rankings weighs them, and the
weight that score gives GPU memory (seed 003's "accounts") given to the server's allocation
share instead: its keys against its `max_allocations`, or, uncapped, against every key of the
servers compared. A server without a fresh reading scores by its allocation share alone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from gateway.allocations.records import Allocation, NoRoom
from gateway.fleet.resources import DEFAULT_WEIGHTS, Reading

SHARE_PART = "gpu"  # the weight of LOAD_SCORE_WEIGHTS that seed 003 gave to accounts


@dataclass(frozen=True)
class Place:
    """A server that may take keys (healthy, not draining), as the strategies see it."""

    server_id: str
    allocations: int = 0  # keys it holds now
    capacity: int = 0  # max_allocations; 0 is unlimited
    load: float | None = None  # the reading's part of the score (reading_load), None without a fresh one
    location: str | None = None
    in_group: int = 0  # keys of the group asked about that it holds
    order: int = 0  # registration order: the last tie-break

    @property
    def has_room(self) -> bool:
        return not self.capacity or self.allocations < self.capacity


class Choice(NamedTuple):
    """A strategy's pick: the server, its score, and why."""

    server_id: str
    score: float
    reason: str


class PlannedMove(NamedTuple):
    """One move of a rebalance: a key from the most loaded server to a less loaded one, and their gap."""

    key: str
    from_server_id: str
    to_server_id: str
    from_score: float
    to_score: float
    gap: float


def reading_load(reading: Reading | None, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> float | None:
    """The monitor's part of the score: CPU, memory and disk by their weights; None without a reading."""
    if reading is None:
        return None
    return reading.load_score({**weights, SHARE_PART: 0.0})


def share(place: Place, total: int) -> float:
    """Its keys as a percent of its capacity; uncapped, of `total`, every key of the servers compared."""
    if place.capacity:
        return 100.0 * place.allocations / place.capacity
    return 100.0 * place.allocations / total if total else 0.0


def score(place: Place, total: int, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> float:
    """Seed 003's load score, 0-100: the reading's part plus the weighted allocation share."""
    part = share(place, total)
    if place.load is None:
        return round(part, 2)
    return round(place.load + weights.get(SHARE_PART, 0.0) * part, 2)


def scores(places: Sequence[Place], weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> dict[str, float]:
    """Each place's score, its share counted among these places."""
    total = sum(place.allocations for place in places)
    return {place.server_id: score(place, total, weights) for place in places}


def choose(
    strategy: str,
    places: Sequence[Place],
    group: str | None = None,
    location: str | None = None,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
) -> Choice:
    """The server `strategy` picks among `places` for a new key; NoRoom when none may take it."""
    scored = scores(places, weights)
    candidates = list(places)
    if not candidates:
        raise NoRoom("no healthy server is taking keys: every one is down or draining, or none is registered")
    if strategy == "location":
        candidates = [p for p in candidates if p.location == location]
        if not candidates:
            raise NoRoom(f"no healthy server at location {location!r} is taking keys")
    room = [p for p in candidates if p.has_room]
    if not room:
        raise NoRoom(f"every server {_which(strategy, location)}is at its max_allocations")

    def lightest(within: Sequence[Place]) -> Place:
        return min(within, key=lambda p: (scored[p.server_id], p.allocations, p.order))

    if strategy == "affinity":
        holders = [p for p in room if p.in_group]
        if holders:
            most = max(p.in_group for p in holders)
            best = lightest([p for p in holders if p.in_group == most])
            reason = f"holds the most keys of group {group!r} ({most}) among servers with room"
        else:
            best = lightest(room)
            reason = f"no server with room holds group {group!r} yet: the lowest load score"
    elif strategy == "isolation":
        fewest = min(p.in_group for p in room)
        best = lightest([p for p in room if p.in_group == fewest])
        reason = f"holds the fewest keys of group {group!r} ({fewest}), then the lowest load score"
    else:
        best = lightest(room)
        reason = f"the lowest load score of {len(room)} server{'s' if len(room) != 1 else ''} with room"
        if strategy == "location":
            reason = f"at location {location!r}: {reason}"
    points = scored[best.server_id]
    return Choice(best.server_id, points, f"{reason} ({points:g})")


def _which(strategy: str, location: str | None) -> str:
    return f"at location {location!r} " if strategy == "location" else "that is up and not draining "


# -- rebalancing -------------------------------------------------------------------------------

MOVE_FIRST = {"load_balance": 0, "isolation": 1, "affinity": 2, "location": 3}  # least bound to its server first


def next_move(
    places: Sequence[Place],
    keys: Mapping[str, Sequence[Allocation]],
    threshold: float,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    skip: Collection[str] = (),
) -> PlannedMove | None:
    """The next move from the most to the least loaded server while their gap exceeds `threshold`, or None.

    `keys` holds each server's allocations. A move never takes the target past the source (it
    would only swap them), a location key moves only within its location, and keys in `skip`
    (moved or refused already) stay.
    """
    scored = scores(places, weights)
    total = sum(p.allocations for p in places)
    by_load = sorted(places, key=lambda p: (-scored[p.server_id], p.order))
    targets = sorted((p for p in places if p.has_room), key=lambda p: (scored[p.server_id], p.allocations, p.order))
    for source in by_load:
        newest = sorted(
            (a for a in keys.get(source.server_id, ()) if a.key not in skip), key=lambda a: a.updated_at, reverse=True
        )  # the most recently placed first: its state is the least settled there
        movable = sorted(newest, key=lambda a: MOVE_FIRST.get(a.strategy, 0))
        if not movable:
            continue
        for target in targets:
            gap = scored[source.server_id] - scored[target.server_id]
            if gap <= threshold:
                break  # the targets after it are more loaded still
            after_source = score(replace(source, allocations=source.allocations - 1), total, weights)
            after_target = score(replace(target, allocations=target.allocations + 1), total, weights)
            if after_target > after_source:
                continue  # the move would only swap their places
            for allocation in movable:
                if allocation.strategy != "location" or allocation.location == target.location:
                    return PlannedMove(
                        allocation.key,
                        source.server_id,
                        target.server_id,
                        scored[source.server_id],
                        scored[target.server_id],
                        round(gap, 2),
                    )
    return None


def moved(
    places: Sequence[Place], keys: Mapping[str, Sequence[Allocation]], move: PlannedMove
) -> tuple[list[Place], dict[str, list[Allocation]]]:
    """The places and keys after `move`: one key fewer on its source, one more on its target."""
    change = {move.from_server_id: -1, move.to_server_id: 1}
    after = [replace(p, allocations=p.allocations + change.get(p.server_id, 0)) for p in places]
    shifted = {server_id: list(held) for server_id, held in keys.items()}
    allocation = next(a for a in shifted[move.from_server_id] if a.key == move.key)
    shifted[move.from_server_id].remove(allocation)
    shifted.setdefault(move.to_server_id, []).append(replace(allocation, server_id=move.to_server_id))
    return after, shifted
