"""Routing policies: pure choices over a snapshot of the fleet, with no I/O."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from resources import Reading


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


def choose_by_resources(
    rotation: SequentialRotation,
    healthy: Sequence[str],
    readings: Mapping[str, Reading],
    exclude: Collection[str],
    required_bytes: int | None,
    policy: str,
    weights: Mapping[str, float],
) -> tuple[str | None, bool]:
    """Pick from `healthy` (registration order) using fresh `readings`; say if nothing fit.

    With `required_bytes`, servers whose fresh reading shows that much usable memory come
    first; servers whose capacity is unknown (no monitor, or a stale reading) are used only
    when none of those fits. `least_load` then keeps the lowest load score. Among what is
    left, the rotation decides, so ties and equal servers still take turns.
    """
    candidates = [server_id for server_id in healthy if server_id not in exclude]
    pool = candidates
    if required_bytes is not None:
        pool = [s for s in candidates if s in readings and readings[s].fits(required_bytes)]
        pool = pool or [s for s in candidates if s not in readings]
        if not pool:
            return None, bool(candidates)
    if policy == "least_load":
        scores = {s: readings[s].load_score(dict(weights)) for s in pool if s in readings}
        if scores:
            best = min(scores.values())
            pool = [s for s, score in scores.items() if score == best]
    keep = set(pool)
    return rotation.choose(exclude={s for s in healthy if s not in keep} | set(exclude)), False
