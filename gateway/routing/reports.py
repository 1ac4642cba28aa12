"""What the status pages, the dashboard and the CLI show of the fleet: routing state, tiers, load. No I/O."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.cluster.connection import RedisUnavailable
from gateway.cluster.slots import SharedSlots
from gateway.fleet.readings import Readings
from gateway.fleet.server import BackendServer
from gateway.routing.catalog import catalog, listed_names, model_key
from gateway.routing.outliers import OutlierDetector
from gateway.routing.selection import Selector


@dataclass(frozen=True)
class FleetView:
    """The parts of the fleet's state a report reads, to be read under the fleet's lock."""

    servers: Mapping[str, BackendServer]
    in_flight: Mapping[str, int]
    selector: Selector
    outliers: OutlierDetector
    readings: Readings
    stale_after: float


class Reports:
    """Read-side views of the fleet; each takes the fleet's lock (BackendManager's) once and hands out copies."""

    def __init__(self, lock: threading.Lock, view: Callable[[], FleetView]) -> None:
        self._lock = lock
        self._view = view  # called under the lock: the owner's parts as they are now
        self.shared_slots: SharedSlots | None = None  # REDIS_URL: capped servers show the cluster's count too

    def servers(self) -> list[dict[str, Any]]:
        """Every server with its routing state: in flight, ejection, effective weight, models, resources."""
        with self._lock:
            rows = _rows(self._view())
        return self._with_cluster_counts(rows)

    def server(self, server_id: str) -> dict[str, Any] | None:
        """One server as `servers` shows it, or None."""
        with self._lock:
            row = next((row for row in _rows(self._view()) if row["server_id"] == server_id), None)
        return None if row is None else self._with_cluster_counts([row])[0]

    def _with_cluster_counts(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Outside the lock, with shared slots: `cluster_in_flight`, every process's slots, on each capped server.

        None where Redis did not answer, and on servers without a cap (nothing counts them there).
        """
        if self.shared_slots is None:
            return rows
        capped = [row["server_id"] for row in rows if row["max_concurrent"]]
        try:
            counts: dict[str, int] = self.shared_slots.counts(capped)
        except RedisUnavailable:  # the report still shows what this process knows
            counts = {}
        for row in rows:
            row["cluster_in_flight"] = counts.get(row["server_id"])
        return rows

    def status(self, health_check_running: bool) -> dict[str, Any]:
        """The seed's `/webhook/servers` data: counts, job state and every server."""
        servers = self.servers()
        healthy = sum(1 for server in servers if server["is_healthy"])
        return {
            "total_servers": len(servers),
            "healthy_servers": healthy,
            "unhealthy_servers": len(servers) - healthy,
            "health_check_running": health_check_running,
            "servers": servers,
        }

    def model_catalog(self) -> dict[str, list[str]]:
        """Model name -> ids of the servers that can take work for it now (healthy, not draining)."""
        with self._lock:
            return catalog(s for s in self._view().servers.values() if s.is_healthy and not s.draining)

    def priority_check(self, model: str) -> dict[str, Any]:
        """Which servers would serve `model`, tier by tier, and in what state each is."""
        key = model_key(model)
        with self._lock:
            fleet = self._view()
            ejected, served = fleet.outliers.ejected_ids(), fleet.selector.served
            serving = [s for s in fleet.servers.values() if key in served[s.server_id]]
            tiers: dict[int, list[dict[str, Any]]] = {}
            for server in sorted(serving, key=lambda s: s.priority):
                tiers.setdefault(server.priority, []).append(
                    {
                        "server_id": server.server_id,
                        "actual_model": served[server.server_id][key],
                        "state": _state(fleet, server, ejected),
                        "weight": server.weight,
                        "in_flight": fleet.in_flight.get(server.server_id, 0),
                        "max_concurrent": server.max_concurrent,
                    }
                )
        serving_tier = next((p for p, rows in tiers.items() if any(r["state"] == "available" for r in rows)), None)
        return {
            "model": model,
            "known": bool(serving),
            "serving_tier": serving_tier,
            "tiers": [{"priority": p, "servers": rows} for p, rows in tiers.items()],
        }

    def priority_overview(self) -> dict[str, Any]:
        """The servers of each tier, how many can take work now, and the models the tier serves."""
        with self._lock:
            fleet = self._view()
            ejected = fleet.outliers.ejected_ids()
            tiers: dict[int, dict[str, Any]] = {}
            for server in sorted(fleet.servers.values(), key=lambda s: s.priority):
                tier = tiers.setdefault(server.priority, {"priority": server.priority, "servers": [], "available": 0})
                tier["servers"].append(server.server_id)
                tier["available"] += _state(fleet, server, ejected) == "available"
            for priority, tier in tiers.items():
                tier["models"] = list(catalog(s for s in fleet.servers.values() if s.priority == priority))
        return {"tiers": list(tiers.values())}

    def resource_cache(self) -> dict[str, Any]:
        """The monitors' readings as routing holds them: each one's age, fresh or stale, and its hits."""
        now = time.monotonic()
        with self._lock:
            fleet = self._view()
            rows = _cache_rows(fleet, now)
        states = [row["state"] for row in rows]
        return {
            "stale_after_s": fleet.stale_after,
            "readings": len(states) - states.count("none"),
            "fresh": states.count("fresh"),
            "stale": states.count("stale"),
            "hits": sum(row["hits"] for row in rows),
            "servers": rows,
        }

    def rankings(self) -> list[dict[str, Any]]:
        """Healthy and unhealthy servers by load score, lowest first; those without a fresh reading last."""
        now = time.monotonic()
        with self._lock:
            fleet = self._view()
            fresh, weights = fleet.readings.fresh(fleet.stale_after), fleet.selector.load_weights
            rows = [
                {
                    "server_id": server.server_id,
                    "is_healthy": server.is_healthy,
                    "score": round(fresh[server.server_id].load_score(weights), 2)
                    if server.server_id in fresh
                    else None,
                    "resources": fleet.readings.summary(server.server_id, now, fleet.stale_after),
                }
                for server in fleet.servers.values()
            ]
        return sorted(rows, key=lambda row: (row["score"] is None, row["score"] or 0.0))


def _cache_rows(fleet: FleetView, now: float) -> list[dict[str, Any]]:
    """Under the lock: each server with a monitor or a reading, as GET /admin/resource-cache/stats shows it."""
    hits, rows = fleet.selector.placement.hits, []
    for server in fleet.servers.values():
        summary = fleet.readings.summary(server.server_id, now, fleet.stale_after)
        if summary is None and not server.monitor_url:
            continue
        state = "none" if summary is None else "stale" if summary["stale"] else "fresh"
        rows.append(
            {
                "server_id": server.server_id,
                "monitor_url": server.monitor_url,
                "state": state,
                "age_s": None if summary is None else summary["age_s"],
                "hits": hits.get(server.server_id, 0),
                "skip_resource_check": server.skip_resource_check,
                "resources": summary,
            }
        )
    return rows


def _rows(fleet: FleetView) -> list[dict[str, Any]]:
    """Under the lock: each server's data and routing state."""
    now, clock = time.monotonic(), fleet.outliers.describe
    rows = []
    for server in fleet.servers.values():
        ejection = clock(server.server_id)
        rows.append(
            {
                **server.to_dict(),
                "in_flight": fleet.in_flight.get(server.server_id, 0),
                "ejected": ejection["ejected"],
                "ejection_seconds_left": ejection["seconds_left"],
                "effective_weight": round(fleet.selector.effective_weight(server), 3),
                "served_models": listed_names(server),
                "resources": fleet.readings.summary(server.server_id, now, fleet.stale_after),
            }
        )
    return rows


def _state(fleet: FleetView, server: BackendServer, ejected: Collection[str]) -> str:
    """Under the lock: whether a server can take new work now, or why not."""
    if not server.is_healthy:
        return "unhealthy"
    if server.draining:
        return "draining"
    if server.server_id in ejected:
        return "ejected"
    if server.max_concurrent and fleet.in_flight.get(server.server_id, 0) >= server.max_concurrent:
        return "at_capacity"
    return "available"
