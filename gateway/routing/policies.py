"""Routing policies: pure choices over a snapshot of the fleet, with no I/O."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class SequentialRotation:
    """Strict rotation B1→B2→B3→B1 over healthy servers in registration order, O(1) a pick.

    `rebuild` takes the whole fleet in registration order with a health flag for each; it is
    O(n) and runs only when the fleet or its health changes. `choose` is O(1) when nothing is
    excluded, and O(k) when it must skip k excluded servers.
    """

    def __init__(self) -> None:
        self._ids: tuple[str, ...] = ()
        self._next_healthy: tuple[int, ...] = ()
        self._healthy_count = 0
        self._cursor = -1  # index of the last pick; -1 means "before the first"

    def rebuild(self, fleet: Sequence[tuple[str, bool]]) -> None:
        """Take a new fleet of (server_id, is_healthy), keeping the rotation's place."""
        ids = tuple(server_id for server_id, _ in fleet)
        healthy = [is_healthy for _, is_healthy in fleet]
        self._cursor = self._carry_cursor(ids)
        self._ids = ids
        self._healthy_count = sum(healthy)
        self._next_healthy = _next_healthy_table(healthy)

    def choose(self, exclude: Collection[str] = ()) -> str | None:
        """Return the id of the next healthy server not in `exclude`, or None."""
        if not self._healthy_count:
            return None
        index = self._next_healthy[self._cursor]
        for _ in range(self._healthy_count):
            if self._ids[index] not in exclude:
                self._cursor = index
                return self._ids[index]
            index = self._next_healthy[index]
        return None

    def _carry_cursor(self, new_ids: tuple[str, ...]) -> int:
        """Find the new index after which the rotation goes on, so no server is skipped."""
        if self._cursor < 0 or not self._ids:
            return -1
        new_index = {server_id: i for i, server_id in enumerate(new_ids)}
        last = self._ids[self._cursor]
        if last in new_index:
            return new_index[last]
        # The last pick left: go on with the first old follower that is still here.
        count = len(self._ids)
        for step in range(1, count):
            follower = self._ids[(self._cursor + step) % count]
            if follower in new_index:
                return new_index[follower] - 1
        return -1


def _next_healthy_table(healthy: list[bool]) -> tuple[int, ...]:
    """table[i] is the first healthy index after i, wrapping; table[-1] is the first overall."""
    count = len(healthy)
    table = [-1] * count
    following = -1
    for i in range(2 * count - 1, -1, -1):  # two passes backwards handle the wrap-around
        if i < count:
            table[i] = following
        if healthy[i % count]:
            following = i % count
    return tuple(table)


@dataclass(frozen=True)
class Candidate:
    """A server that may take a request now, as a policy sees it."""

    server_id: str
    weight: float = 1.0  # effective weight, > 0, slow start already applied
    in_flight: int = 0  # requests it holds now


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round-robin: spreads picks in proportion to weight, evenly interleaved."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def choose(self, candidates: Sequence[Candidate]) -> str | None:
        """Return the id of the next pick among `candidates`, or None if there are none."""
        current = self._current
        total = 0.0
        best_id: str | None = None
        best_value = -math.inf
        for candidate in candidates:
            # Servers absent from this call keep their value, so one left out once keeps its place.
            value = current.get(candidate.server_id, 0.0) + candidate.weight
            current[candidate.server_id] = value
            total += candidate.weight
            if value > best_value:  # strict: the first in candidate order wins a tie, as in nginx
                best_id, best_value = candidate.server_id, value
        if best_id is not None:
            current[best_id] = best_value - total
        return best_id

    def forget(self, keep: Collection[str]) -> None:
        """Drop the state of every server not in `keep`."""
        self._current = {server_id: value for server_id, value in self._current.items() if server_id in keep}


def choose_least_connections(candidates: Sequence[Candidate], tie_break: SmoothWeightedRoundRobin) -> str | None:
    """Return the id with the fewest requests in flight per unit of weight; `tie_break` settles ties."""
    tied: list[Candidate] = []
    for candidate in candidates:
        if not tied:
            tied.append(candidate)
            continue
        best = tied[0]
        # Cross-multiplied so integer weights compare exactly, with no division to round.
        left, right = candidate.in_flight * best.weight, best.in_flight * candidate.weight
        if left < right:
            tied = [candidate]
        elif left == right:
            tied.append(candidate)
    if len(tied) == 1:
        return tied[0].server_id
    return tie_break.choose(tied)


def choose_sticky(key: str, candidates: Sequence[Candidate]) -> str | None:
    """Return the id that weighted rendezvous hashing gives `key`, or None if there are none."""
    best_id: str | None = None
    best_score = -math.inf
    for candidate in candidates:
        score = -candidate.weight / math.log(_unit_hash(key, candidate.server_id))
        if score > best_score or (score == best_score and best_id is not None and candidate.server_id < best_id):
            best_id, best_score = candidate.server_id, score
    return best_id


def _unit_hash(key: str, server_id: str) -> float:
    """A stable hash of (key, server_id) as a float strictly between 0 and 1."""
    digest = hashlib.blake2b(key.encode() + b"\0" + server_id.encode(), digest_size=8).digest()
    # 52 bits plus one half fit a double exactly, so the result is never rounded to 0 or 1.
    return ((int.from_bytes(digest, "big") >> 12) + 0.5) / 2**52


def slow_start_weight(weight: float, seconds_back: float | None, window: float) -> float:
    """Return the weight of a server back `seconds_back` ago, ramping from 10% to 100% over `window`."""
    if window <= 0 or seconds_back is None or seconds_back >= window:
        return weight
    # Start at 10%, not 0, so a server that just came back gets a trickle of traffic at once.
    return weight * (0.1 + 0.9 * max(seconds_back, 0.0) / window)


def best_tier(servers: Sequence[T], priority: Callable[[T], int]) -> list[T]:
    """Return the servers with the lowest priority number present, in their original order."""
    if not servers:
        return []
    best = min(priority(server) for server in servers)
    return [server for server in servers if priority(server) == best]
