"""Allocations over the fleet BackendManager owns: place a key, move it, rebalance, fail over, route.

The store keeps each key's place and checks capacity; this decides where keys go, from a fresh
look at the fleet (healthy, not draining) each time, and announces every move before it
happens when ALLOCATION_MIGRATE_URL is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from gateway.allocations.announce import Announcer
from gateway.allocations.records import (
    LOCATION_LABEL,
    Allocation,
    AllocationError,
    Move,
    Moving,
    NoRoom,
    Refused,
    UnknownKey,
    stamp,
)
from gateway.allocations.store import AllocationStore
from gateway.allocations.strategies import Place, choose, moved, next_move, reading_load, scores
from gateway.fleet.server import BackendServer
from gateway.manager import BackendManager
from gateway.observability.allocation_metrics import AllocationMetrics

log = logging.getLogger(__name__)
CLAIM_SECONDS = 30.0  # a move's claim on its key outlives the announcement's timeout by this much
NO_ROOM, MIGRATE_REFUSED = "no_room", "migrate_refused"  # why a placement or move was refused, as counted


class Placement(NamedTuple):
    """Where a key is, whether this call put it there, the server's score then, and why."""

    allocation: Allocation
    changed: bool
    load_score: float | None
    reason: str


class Routed(NamedTuple):
    """Where a request with X-Allocation-Key goes: its server; or None and why not (None, None: an unknown key)."""

    server_id: str | None
    refusal: str | None = None


def down_for(server: BackendServer, now: datetime | None = None) -> float:
    """Seconds since an unhealthy server's health last changed (forever, when it never recorded when)."""
    if server.is_healthy:
        return 0.0
    try:
        since = datetime.fromisoformat(server.health_changed_time or "")
    except ValueError:
        return float("inf")
    return ((now or datetime.now(UTC)) - since).total_seconds()


class AllocationService:
    """Places, moves, rebalances and routes allocations; the store keeps them, the manager owns the fleet."""

    def __init__(
        self,
        store: AllocationStore,
        manager: BackendManager,
        announcer: Announcer | None = None,
        failover_seconds: float = 300.0,
        metrics: AllocationMetrics | None = None,
    ) -> None:
        self.store = store
        self.manager = manager
        self.announcer = announcer
        self.failover_seconds = failover_seconds
        self.metrics = metrics
        self.claim_seconds = CLAIM_SECONDS + (announcer.timeout if announcer is not None else 0.0)

    def close(self) -> None:
        """Close the store and the announcer's connections."""
        if self.announcer is not None:
            self.announcer.close()
        self.store.close()

    # -- the fleet as the strategies see it --------------------------------------------------

    def places(self, group: str | None = None, exclude: Collection[str] = ()) -> list[Place]:
        """The servers that may take keys now (healthy, not draining), with their keys and readings."""
        servers, readings = self.manager.list_servers(), self.manager.fresh_readings()
        counts = self.store.counts()
        in_group = self.store.group_counts(group) if group else {}
        weights = self.manager.load_weights
        return [
            Place(
                server.server_id,
                counts.get(server.server_id, 0),
                server.max_allocations,
                reading_load(readings.get(server.server_id), weights),
                server.labels.get(LOCATION_LABEL),
                in_group.get(server.server_id, 0),
                order,
            )
            for order, server in enumerate(servers)
            if server.is_healthy and not server.draining and server.server_id not in exclude
        ]

    def score_of(self, server_id: str, group: str | None = None) -> float | None:
        """A server's allocation score now; None when it takes no keys (down, draining, gone)."""
        return scores(self.places(group), self.manager.load_weights).get(server_id)

    def rankings(self) -> dict[str, float]:
        """Each server that takes keys, by its allocation score now."""
        return scores(self.places(), self.manager.load_weights)

    # -- placing -----------------------------------------------------------------------------

    def allocate(
        self, key: str, strategy: str = "load_balance", group: str | None = None, location: str | None = None
    ) -> Placement:
        """Pin a new key to the server `strategy` picks; a key allocated already stays where it is."""
        existing = self.store.get(key)
        if existing is not None:
            return self._already(existing)
        if strategy == "location":
            self._check_location(location)
        try:
            return self._place(key, strategy, group, location)
        except NoRoom:
            self._refused("initial", NO_ROOM)
            raise

    def _place(self, key: str, strategy: str, group: str | None, location: str | None) -> Placement:
        for _ in range(self._tries()):
            places = self.places(group)
            choice = choose(strategy, places, group, location, self.manager.load_weights)
            now = stamp()
            allocation = Allocation(key, choice.server_id, strategy, group, location, now, now)
            entry = Move(key, "initial", choice.server_id, None, choice.score, strategy, choice.reason, created_at=now)
            try:
                placed, created = self.store.place(allocation, _capacity(places, choice.server_id), entry)
            except NoRoom:
                continue  # it filled up since the look: look again, with its count as it is now
            if not created:
                return self._already(placed)  # the same key, allocated at the same moment
            log.info("allocation %s placed on %s: %s", key, choice.server_id, choice.reason)
            self._moved("initial")
            return Placement(placed, True, choice.score, choice.reason)
        raise NoRoom("other allocations kept taking the room this one was given; try again")

    def _already(self, allocation: Allocation) -> Placement:
        points = self.score_of(allocation.server_id, allocation.group)
        return Placement(allocation, False, points, f"allocated to {allocation.server_id} already")

    def _check_location(self, location: str | None) -> None:
        """A 400 naming `location` when no registered server has it (down or up), so none ever could take it."""
        known = {s.labels[LOCATION_LABEL] for s in self.manager.list_servers() if LOCATION_LABEL in s.labels}
        if location not in known:
            listed = ", ".join(sorted(known)) or "none has a location label"
            raise AllocationError(
                f"no server has location {location!r} (its `location` label); known: {listed}", "location"
            )

    def _tries(self) -> int:
        """How often to look again when a server fills up under a placement: each look sees one key more."""
        return 2 * len(self.manager.list_servers()) + 3

    # -- reading and releasing ---------------------------------------------------------------

    def get(self, key: str) -> Allocation:
        """The key's allocation; UnknownKey when it has none."""
        allocation = self.store.get(key)
        if allocation is None:
            raise UnknownKey(f"no allocation has key {key}")
        return allocation

    def release(self, key: str) -> Allocation:
        """Delete the key's allocation; UnknownKey when it has none."""
        released = self.store.release(key)
        if released is None:
            raise UnknownKey(f"no allocation has key {key}")
        log.info("allocation %s released from %s", key, released.server_id)
        return released

    # -- moving ------------------------------------------------------------------------------

    def move(self, key: str, server_id: str) -> Placement:
        """The operator's move of a key to a server that is up, not draining, and has room."""
        allocation = self.get(key)
        server = self.manager.get_server(server_id)
        if server is None:
            raise AllocationError(f"server {server_id} is not registered", "server_id")
        if allocation.server_id == server_id:
            return Placement(allocation, False, self.score_of(server_id, allocation.group), f"on {server_id} already")
        if not server.is_healthy or server.draining:
            state = "draining" if server.is_healthy else "unhealthy"
            raise AllocationError(f"server {server_id} is {state}: it takes no keys now", status=409)
        points = self.score_of(server_id, allocation.group)
        reason = "moved by the operator"
        try:
            placed = self._shift(allocation, server_id, "manual", points, reason, server.max_allocations)
        except NoRoom as exc:
            self._refused("manual", NO_ROOM)
            raise AllocationError(exc.message, status=409) from None
        return Placement(placed, True, points, reason)

    def relocate(self, allocation: Allocation, why: str) -> Allocation:
        """Fail a key over: to the server its own strategy picks among the others; NoRoom or Refused if none."""
        try:
            return self._relocate(allocation, why)
        except NoRoom:
            self._refused("failover", NO_ROOM)
            raise

    def _relocate(self, allocation: Allocation, why: str) -> Allocation:
        for _ in range(self._tries()):
            places = self.places(allocation.group, exclude={allocation.server_id})
            group, location = allocation.group, allocation.location
            choice = choose(allocation.strategy, places, group, location, self.manager.load_weights)
            capacity = _capacity(places, choice.server_id)
            try:
                return self._shift(
                    allocation, choice.server_id, "failover", choice.score, f"{why}; {choice.reason}", capacity
                )
            except NoRoom:
                continue
        raise NoRoom(f"no server kept room for {allocation.key}; it stays on {allocation.server_id}")

    def fail_over(self, server_id: str, why: str) -> tuple[int, int]:
        """Move every key of a server that left or stayed down; (moved, left where they were)."""
        done = stuck = 0
        problem = ""
        for allocation in self.store.allocations(server_id, limit=-1):
            try:
                self.relocate(allocation, f"server {server_id} {why}")
            except AllocationError as exc:
                stuck, problem = stuck + 1, exc.message
            else:
                done += 1
        if done:
            log.warning("failover: %d keys of server %s (which %s) moved", done, server_id, why)
        if stuck:
            log.error("failover: %d keys of server %s stay on it: %s", stuck, server_id, problem)
        return done, stuck

    def _shift(
        self, allocation: Allocation, to_id: str, kind: str, points: float | None, reason: str, capacity: int
    ) -> Allocation:
        """Move one key, announced first; its claim keeps every other move of that key out meanwhile."""
        key = allocation.key
        token = self.store.claim(key, self.claim_seconds)
        if token is None:
            raise Moving(f"allocation {key} is being moved already; try again")
        try:
            current = self.store.get(key)
            if current is None:
                raise UnknownKey(f"no allocation has key {key}: it was released meanwhile")
            if current.server_id != allocation.server_id:
                raise AllocationError(f"allocation {key} moved to {current.server_id} meanwhile", status=409)
            if capacity and self.store.total(to_id) >= capacity:
                raise NoRoom(f"server {to_id} is at its max_allocations ({capacity})")  # before telling anyone
            entry = Move(key, kind, to_id, current.server_id, points, current.strategy, reason, created_at=stamp())
            if self.announcer is not None:
                answer = self.announcer.announce(current, entry, self._urls(current.server_id, to_id))
                entry = replace(entry, move_id=answer.move_id)
                if not answer.ok:
                    refused = f"{reason}; refused by ALLOCATION_MIGRATE_URL: {answer.detail}"
                    self.store.record(replace(entry, outcome="refused", reason=refused))
                    self._refused(kind, MIGRATE_REFUSED)
                    raise Refused(f"ALLOCATION_MIGRATE_URL refused moving {key} to {to_id} ({answer.detail}): it stays")
            placed = self.store.move(key, current.server_id, to_id, capacity, entry)
            if placed is None:
                raise AllocationError(f"allocation {key} changed meanwhile", status=409)
            log.info("allocation %s moved (%s) from %s to %s: %s", key, kind, current.server_id, to_id, reason)
            self._moved(kind)
            return placed
        finally:
            self.store.unclaim(key, token)

    def _moved(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.moved(kind)

    def _refused(self, kind: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.refused(kind, reason)

    def _urls(self, from_id: str, to_id: str) -> dict[str, str | None]:
        """The base URLs of a move's two servers, for its announcement (None for one that left)."""
        urls: dict[str, str | None] = {}
        for end, server_id in (("from", from_id), ("to", to_id)):
            server = self.manager.get_server(server_id)
            urls[end] = None if server is None else server.url
        return urls

    # -- rebalancing -------------------------------------------------------------------------

    def rebalance(self, threshold: float = 30.0, max_migrations: int = 10, dry_run: bool = False) -> dict[str, Any]:
        """Move keys from the most to the least loaded server while their gap exceeds `threshold`."""
        weights = self.manager.load_weights
        places = self.places()
        before = scores(places, weights)
        keys: dict[str, list[Allocation]] = {}
        for allocation in self.store.allocations(limit=-1):
            if allocation.server_id in before:
                keys.setdefault(allocation.server_id, []).append(allocation)
        steps: list[dict[str, Any]] = []
        skip: set[str] = set()
        while len(steps) < max_migrations:
            planned = next_move(places, keys, threshold, weights, skip)
            if planned is None:
                break
            skip.add(planned.key)
            reason = (
                f"load gap {planned.gap:g} over the threshold {threshold:g}: {planned.from_server_id}"
                f" ({planned.from_score:g}) to {planned.to_server_id} ({planned.to_score:g})"
            )
            step = {**planned._asdict(), "outcome": "planned", "reason": reason}
            if not dry_run:
                allocation = next(a for a in keys[planned.from_server_id] if a.key == planned.key)
                try:
                    self._shift(
                        allocation,
                        planned.to_server_id,
                        "rebalance",
                        planned.to_score,
                        reason,
                        _capacity(places, planned.to_server_id),
                    )
                    step["outcome"] = "applied"
                except Refused as exc:
                    step["outcome"], step["reason"] = "refused", exc.message
                except AllocationError as exc:  # it moved, went, or its target filled meanwhile
                    step["outcome"], step["reason"] = "skipped", exc.message
                    if isinstance(exc, NoRoom):
                        self._refused("rebalance", NO_ROOM)
            steps.append(step)
            if step["outcome"] in ("planned", "applied"):
                places, keys = moved(places, keys, planned)
        outcomes = [step["outcome"] for step in steps]
        if not dry_run and steps:
            log.info(
                "rebalance: %d moved, %d refused, %d skipped",
                *(outcomes.count(o) for o in ("applied", "refused", "skipped")),
            )
        return {
            "dry_run": dry_run,
            "threshold": threshold,
            "max_migrations": max_migrations,
            "moves": steps,
            "moved": outcomes.count("applied"),
            "refused": outcomes.count("refused"),
            "scores_before": before,
            "scores_after": scores(places, weights),
        }

    # -- routing -----------------------------------------------------------------------------

    def route(self, key: str) -> Routed:
        """Where a request for `key` goes, by the failure rules: its server while up; elsewhere once it is gone.

        Its server unhealthy for less than ALLOCATION_FAILOVER_SECONDS: a refusal (the key's state
        is there, and the server may be back soon). Unregistered, or down for longer: the key fails
        over now, as the sweep would move it, and the request follows it. AllocationError when it cannot.
        """
        allocation = self.store.get(key)
        if allocation is None:
            return Routed(None)
        server = self.manager.get_server(allocation.server_id)
        if server is not None and server.is_healthy:
            return Routed(server.server_id)
        if server is not None and down_for(server) < self.failover_seconds:
            return Routed(None, f"server {server.server_id}, which holds allocation {key}, is unhealthy")
        why = "is no longer registered" if server is None else f"has been unhealthy for over {self.failover_seconds:g}s"
        try:
            return Routed(self.relocate(allocation, f"server {allocation.server_id} {why}").server_id)
        except Moving:  # the failover watcher (or another request) is moving it: follow it there
            return Routed(self._moved_from(allocation))

    def _moved_from(self, allocation: Allocation) -> str:
        """Where a key another move is taking off its server ends up, waiting as long as that move may take."""
        deadline = time.monotonic() + self.claim_seconds - CLAIM_SECONDS + 1.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            current = self.get(allocation.key)
            if current.server_id != allocation.server_id:
                return current.server_id
        raise Moving(f"allocation {allocation.key} is being moved off {allocation.server_id}; try again")


def _capacity(places: list[Place], server_id: str) -> int:
    return next(place.capacity for place in places if place.server_id == server_id)
