"""Where a request may go by memory: the need it has, declared once per model, and the servers with its model loaded.

A request's need is the client's `X-Required-GPU-Memory-GB` when it sends one; else, for a
request that names a model, the server's own `model_memory_gb` for that model, else the fleet's
`MODEL_MEMORY_GB`. Model names match as the catalog's do (`llama3` is `llama3:latest`), under
the name the client sent or the server's own name for it (its `model_map`). Pure choices over
the fleet's snapshot, no I/O: Selector calls them under the fleet's lock.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from gateway.fleet.model_memory import model_key
from gateway.fleet.resources import GIB, Reading
from gateway.fleet.server import BackendServer
from gateway.routing.admission import NoServer, RouteRequest


class Placement:
    """The fleet's memory needs and loaded models as routing reads them, rebuilt with the fleet; and reading hits."""

    def __init__(self) -> None:
        self.fleet_needs: dict[str, int] = {}  # MODEL_MEMORY_GB: model key -> bytes
        self.needs: dict[str, dict[str, int]] = {}  # server id -> model key -> bytes, as it declared them
        self.loaded: dict[str, frozenset[str]] = {}  # server id -> keys of the models in its memory
        self.skips: frozenset[str] = frozenset()  # servers with skip_resource_check
        self.hits: dict[str, int] = {}  # server id -> routing decisions that read its reading (this process)
        self.has_needs = False  # some need is declared: a request naming a model reads the fresh readings

    def places(self, route: RouteRequest) -> bool:
        """Whether `route` is placed by memory: a need given with it, or one declared for a model it names."""
        return route.required_bytes is not None or (route.model is not None and self.has_needs)

    def set_fleet_needs(self, gigabytes: Mapping[str, float]) -> None:
        """Take MODEL_MEMORY_GB (model name -> GB)."""
        self.fleet_needs = {model_key(name): int(gb * GIB) for name, gb in gigabytes.items()}
        self.has_needs = bool(self.fleet_needs or self.needs)

    def rebuild(self, servers: Collection[BackendServer]) -> None:
        """Take the fleet after a change."""
        self.needs = {
            s.server_id: {model_key(name): int(gb * GIB) for name, gb in s.model_memory_gb.items()}
            for s in servers
            if s.model_memory_gb
        }
        self.loaded = {
            s.server_id: frozenset(model_key(model.name) for model in s.loaded_models)
            for s in servers
            if s.loaded_models
        }
        self.skips = frozenset(s.server_id for s in servers if s.skip_resource_check)
        if self.hits:
            ids = {s.server_id for s in servers}
            self.hits = {server_id: count for server_id, count in self.hits.items() if server_id in ids}
        self.has_needs = bool(self.fleet_needs or self.needs)

    def place(
        self,
        servers: list[BackendServer],
        route: RouteRequest,
        actual: Mapping[str, str],
        readings: Mapping[str, Reading],
    ) -> list[BackendServer]:
        """Fleet-wide, the servers where the request fits; else those where that is unknown; NoServer when none.

        A server fits when its model is loaded there, when it has skip_resource_check, or when its
        fresh reading shows the need usable. Unknown: no fresh reading, or no need declared there.
        A server whose reading shows too little is never chosen.
        """
        key = None if route.model is None else model_key(route.model)
        fits, unknown = [], []
        lacking: int | None = None  # the smallest need that fitted nowhere, for the message
        for server in servers:
            server_id = server.server_id
            other = _key_of(actual.get(server_id), key)
            if server_id in self.skips or self._holds(server_id, key, other):
                fits.append(server)
                continue
            need = route.required_bytes if route.required_bytes is not None else self._need(server_id, key, other)
            reading = readings.get(server_id)
            if need is None or reading is None:
                unknown.append(server)
                continue
            self.hits[server_id] = self.hits.get(server_id, 0) + 1
            if reading.fits(need):
                fits.append(server)
            elif lacking is None or need < lacking:
                lacking = need
        if fits or unknown:
            return fits or unknown
        raise NoServer(503, "no_fit", _no_fit(route, lacking or 0))

    def prefer_loaded(self, tier: list[BackendServer], model: str, actual: Mapping[str, str]) -> list[BackendServer]:
        """The servers of `tier` that have `model` loaded, or the whole tier when none has."""
        key = model_key(model)
        held = [s for s in tier if self._holds(s.server_id, key, _key_of(actual.get(s.server_id), key))]
        return held or tier

    def count_hits(self, server_ids: Iterable[str]) -> None:
        """One more routing decision read these servers' readings (least_load's scores)."""
        hits = self.hits
        for server_id in server_ids:
            hits[server_id] = hits.get(server_id, 0) + 1

    def _holds(self, server_id: str, key: str | None, other: str | None) -> bool:
        """Whether the server has the model in memory, under either of its keys."""
        loaded = self.loaded.get(server_id)
        return loaded is not None and key is not None and (key in loaded or other in loaded)

    def _need(self, server_id: str, key: str | None, other: str | None) -> int | None:
        """The bytes the model needs on this server: its own declaration first, then the fleet's; None if neither."""
        if key is None:
            return None
        for table in (self.needs.get(server_id), self.fleet_needs):
            if table:
                need = table.get(key, table.get(other) if other is not None else None)
                if need is not None:
                    return need
        return None


def _key_of(actual: str | None, key: str | None) -> str | None:
    """The key of the server's own name for the model, when it has another."""
    return key if actual is None else model_key(actual)


def _no_fit(route: RouteRequest, lacking: int) -> str:
    if route.required_bytes is not None:
        return f"no healthy server has {route.required_bytes / GIB:g} GB of GPU memory free under its threshold"
    return (
        f"no healthy server has the {lacking / GIB:g} GB of free memory that model {route.model!r} needs"
        " (MODEL_MEMORY_GB, or the server's model_memory_gb) under its threshold"
    )
