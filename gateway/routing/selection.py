"""The routing decision over the fleet: candidates, tiers, caps, then the policy. No I/O.

BackendManager calls `Selector.choose` under its lock with the state it owns; the choices
themselves are routing.py's pure policies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import Protocol

from gateway.fleet.resources import DEFAULT_WEIGHTS, Reading
from gateway.fleet.server import BackendServer
from gateway.routing.admission import NoServer, RouteRequest
from gateway.routing.catalog import model_key, served_models
from gateway.routing.placement import Placement
from gateway.routing.policies import (
    Candidate,
    SequentialRotation,
    SmoothWeightedRoundRobin,
    best_tier,
    choose_least_connections,
    choose_sticky,
    slow_start_weight,
)
from gateway.routing.prefix import RESULTS, PrefixTable


class Count(Protocol):
    """One series of a counter (a prometheus_client child): what counting a prefix choice needs."""

    def inc(self) -> None: ...


class Selector:
    """Chooses a server for a request; keeps the rotation state between choices."""

    def __init__(self) -> None:
        self.rotation = SequentialRotation()
        self.swrr = SmoothWeightedRoundRobin()
        self.policy = "round_robin"
        self.load_weights: dict[str, float] = dict(DEFAULT_WEIGHTS)
        self.slow_start_seconds = 0.0
        self.prefix = PrefixTable()  # ROUTING_POLICY=prefix: who served each recent prompt prefix last
        self._prefix_counts: dict[str, Count] = {}  # a prefix choice's result -> its series, bound once
        self.served: dict[str, dict[str, str]] = {}  # server_id -> model key -> its actual name
        self.placement = Placement()  # memory needs, loaded models, skip_resource_check
        self._uniform = True  # equal weights and tiers, no caps, nobody draining: plain rotation will do
        self._back_since: dict[str, float] = {}  # when each server came back, for slow start
        self._ramp_until = 0.0

    def rebuild(self, servers: Collection[BackendServer]) -> None:
        """Take the fleet after a change (registration order)."""
        self.rotation.rebuild([(s.server_id, s.is_healthy) for s in servers])
        self.served = {s.server_id: served_models(s) for s in servers}
        first = next(iter(servers), None)
        self._uniform = first is None or all(
            s.weight == first.weight and s.priority == first.priority and not s.max_concurrent and not s.draining
            for s in servers
        )
        self.swrr.forget(self.served)
        self.placement.rebuild(servers)
        self._back_since = {k: v for k, v in self._back_since.items() if k in self.served}

    def count_prefix_results(self, series: Callable[[str], Count]) -> None:
        """Count each prefix choice by its result (prefix.RESULTS) on `series(result)`, each looked up here once."""
        self._prefix_counts = {result: series(result) for result in RESULTS}

    def came_back(self, server_id: str) -> None:
        """Start a server's slow start: it joined, recovered, or returned from ejection."""
        if self.slow_start_seconds > 0:
            now = time.monotonic()
            self._back_since[server_id] = now
            self._ramp_until = max(self._ramp_until, now + self.slow_start_seconds)

    def effective_weight(self, server: BackendServer) -> float:
        """Its weight now, slow start applied."""
        return self._weight(server, time.monotonic())

    def choose(
        self,
        servers: Mapping[str, BackendServer],
        route: RouteRequest,
        exclude: Collection[str],
        in_flight: Mapping[str, int],
        ejected: Collection[str],
        readings: Mapping[str, Reading],
    ) -> tuple[str, str | None]:
        """The chosen server's id and its name for the requested model; NoServer when none can take it."""
        # ROUTING_POLICY=prefix routes plain requests as round_robin does, by this same O(1) path.
        rotating = self.policy == "round_robin" or self.policy == "prefix"
        if route.plain and rotating and self._uniform and not ejected and not self._ramping():
            server_id = self.rotation.choose(exclude)  # the O(1) path every plain request takes
            if server_id is None:
                raise NoServer(503, "no_server", "no healthy GPU server is available", fallback_ok=True)
            return server_id, None
        pool, actual = self._serving(servers, route.model)
        up = [s for s in pool if s.is_healthy and not s.draining and s.server_id not in exclude]
        # Ejected servers are passed over while others can serve; when none can, they still do
        # (Envoy's panic mode): a suspect server beats a certain 503.
        up = [s for s in up if s.server_id not in ejected] or up
        if not up:
            if route.model is not None and actual:
                raise NoServer(
                    503, "model_unavailable", f"every server with model {route.model!r} is down, draining or ejected"
                )
            raise NoServer(503, "no_server", "no healthy GPU server is available", fallback_ok=True)
        if self.placement.places(route):
            up = self.placement.place(up, route, actual, readings)
        free = [s for s in up if not s.max_concurrent or in_flight.get(s.server_id, 0) < s.max_concurrent]
        if not free:
            raise NoServer(503, "at_capacity", "every server that can take this request is at its max_concurrent")
        tier = best_tier(free, lambda s: s.priority)
        if route.model is not None and self.placement.loaded:  # within the tier: where the model is loaded
            tier = self.placement.prefer_loaded(tier, route.model, actual)
        server_id = self._apply_policy(tier, route, servers, in_flight, readings)
        return server_id, actual.get(server_id)

    def _serving(
        self, servers: Mapping[str, BackendServer], model: str | None
    ) -> tuple[list[BackendServer], dict[str, str]]:
        """The servers that may serve `model` and their names for it (empty: passed through as is)."""
        if model is None:
            return list(servers.values()), {}
        key = model_key(model)
        actual = {server_id: served[key] for server_id, served in self.served.items() if key in served}
        if actual:
            return [servers[server_id] for server_id in actual], actual
        unknown = [s for s in servers.values() if not self.served[s.server_id]]  # no models known: may have it
        if unknown:
            return unknown, {}
        if servers:
            raise NoServer(404, "model_not_found", f"model {model!r} is not served by any server", fallback_ok=True)
        raise NoServer(503, "no_server", "no GPU server is registered", fallback_ok=True)

    def name_on(self, servers: Mapping[str, BackendServer], server_id: str, model: str) -> str | None:
        """The server's name for `model` when `choose` could pick it for the model (by `_serving`), else None."""
        try:
            pool, actual = self._serving(servers, model)
        except NoServer:  # no server lists the model, and each lists others
            return None
        if all(server.server_id != server_id for server in pool):
            return None
        return actual.get(server_id, model)  # a server that lists no models gets the name as the client sent it

    def _apply_policy(
        self,
        tier: list[BackendServer],
        route: RouteRequest,
        servers: Mapping[str, BackendServer],
        in_flight: Mapping[str, int],
        readings: Mapping[str, Reading],
    ) -> str:
        now = time.monotonic()
        candidates = [Candidate(s.server_id, self._weight(s, now), in_flight.get(s.server_id, 0)) for s in tier]
        if route.session_key is not None:
            chosen = choose_sticky(route.session_key, candidates)
        elif route.prefix and self.policy == "prefix":  # a holder of its longest known prefix, else round-robin
            holders, result = self.prefix.match(route.prefix, candidates)
            counted = self._prefix_counts.get(result)
            if counted is not None:
                counted.inc()
            chosen = holders[0].server_id if len(holders) == 1 else self._rotate(holders or candidates, servers)
        elif self.policy == "least_connections":
            chosen = choose_least_connections(candidates, self.swrr)
        else:
            if self.policy == "least_load":
                candidates = self._least_loaded(candidates, readings)
            chosen = self._rotate(candidates, servers)
        assert chosen is not None  # candidates is never empty here
        if route.prefix:
            self.prefix.record(route.prefix, chosen)
        return chosen

    def _rotate(self, candidates: list[Candidate], servers: Mapping[str, BackendServer]) -> str | None:
        """Equal weights take strict turns in registration order; unequal ones go by smooth WRR."""
        if len({c.weight for c in candidates}) > 1:
            return self.swrr.choose(candidates)
        keep = {c.server_id for c in candidates}
        return self.rotation.choose({s for s in servers if s not in keep}) or candidates[0].server_id

    def _least_loaded(self, candidates: list[Candidate], readings: Mapping[str, Reading]) -> list[Candidate]:
        scores = {
            c.server_id: readings[c.server_id].load_score(self.load_weights)
            for c in candidates
            if c.server_id in readings
        }
        if not scores:
            return candidates
        self.placement.count_hits(scores)
        best, skips = min(scores.values()), self.placement.skips  # skip_resource_check: in, whatever its reading
        return [c for c in candidates if scores.get(c.server_id) == best or c.server_id in skips]

    def _weight(self, server: BackendServer, now: float) -> float:
        back = self._back_since.get(server.server_id)
        return slow_start_weight(server.weight, None if back is None else now - back, self.slow_start_seconds)

    def _ramping(self) -> bool:
        return self.slow_start_seconds > 0 and time.monotonic() < self._ramp_until
