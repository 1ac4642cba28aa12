"""Which models each server serves, under which names: pure functions over BackendServer."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.fleet.model_memory import model_key
from gateway.fleet.server import BackendServer

__all__ = ["catalog", "listed_names", "model_key", "served_models"]


def served_models(server: BackendServer) -> dict[str, str]:
    """Each model key the server answers for, and the name it knows that model by.

    Registered `models` win over discovered ones; a `model_map` entry adds a virtual name
    that is sent to the server as its actual name.
    """
    served: dict[str, str] = {}
    for name in server.models or server.discovered_models:
        served.setdefault(model_key(name), name)
    for virtual, actual in server.model_map.items():
        served[model_key(virtual)] = actual
    return served


def listed_names(server: BackendServer) -> list[str]:
    """The names a model list shows for the server: virtual names, then unmapped actual ones."""
    mapped = {model_key(actual) for actual in server.model_map.values()}
    names = list(server.model_map)
    names += [name for name in server.models or server.discovered_models if model_key(name) not in mapped]
    return names


def catalog(servers: Iterable[BackendServer]) -> dict[str, list[str]]:
    """Model name -> the ids of the given servers that answer for it, names sorted."""
    found: dict[str, tuple[str, list[str]]] = {}
    for server in servers:
        for name in listed_names(server):
            ids = found.setdefault(model_key(name), (name, []))[1]
            if server.server_id not in ids:
                ids.append(server.server_id)
    return dict(sorted(found.values()))
