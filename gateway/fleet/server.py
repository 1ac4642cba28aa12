"""One GPU server of the fleet, in the seed's shape, and the helpers that describe it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from gateway.fleet.addresses import SERVER_ID_PATTERN, AddressError, check_backend_address, checked_monitor_url
from gateway.fleet.model_memory import DEVICE_TYPES, MAX_DESCRIPTION, LoadedModel, is_need_map, loaded_from
from gateway.fleet.tokens import HASH_PATTERN


def now_iso() -> str:
    """The current UTC time as ISO 8601, as the state file stores it."""
    global _last_iso
    second = int(time.time())
    if _last_iso[0] != second:  # every proxied request stamps its server: format once a second
        _last_iso = (second, datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds"))
    return _last_iso[1]


_last_iso: tuple[int, str] = (0, "")


def server_url(ip: str, port: int) -> str:
    """The base URL of a server; IPv6 addresses get brackets."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}"


@dataclass
class BackendServer:
    """One GPU server, with the seed's fields."""

    server_id: str
    ip: str
    port: int
    url: str = ""
    is_healthy: bool = True
    fail_count: int = 0
    last_check_time: str | None = None
    last_used_time: str | None = None
    monitor_url: str | None = None  # the host's resource monitor, when it runs one
    health_changed_time: str | None = None  # when is_healthy last changed (or registration)
    last_error: str | None = None  # why the last check failed ("unreachable: Connection refused"); None once one passes
    weight: int = 1  # share of traffic within its priority tier
    priority: int = 1  # tier: 1 is preferred, 2 is used only when no tier-1 server can take work
    max_concurrent: int = 0  # in-flight requests it may hold; 0 means unlimited
    models: list[str] = field(default_factory=list)  # model names it serves, as registered
    model_map: dict[str, str] = field(default_factory=dict)  # virtual model name -> its actual name
    labels: dict[str, str] = field(default_factory=dict)  # "location" serves the allocations' location strategy
    max_allocations: int = 0  # allocations (docs/allocations.md) it may hold; 0 means unlimited
    draining: bool = False  # takes no new work; its tasks still reach it
    discovered_models: list[str] = field(default_factory=list)  # found by the health sweep
    loaded_models: list[LoadedModel] = field(default_factory=list)  # in its memory: the sweep's GET /api/ps
    # Seed 001's fields (docs/servers.md): what a model needs here, the kind of box, a note, and readings ignored.
    model_memory_gb: dict[str, float] = field(default_factory=dict)  # model name -> GB it needs free here
    type: str = "gpu"  # cpu or gpu
    description: str = ""
    skip_resource_check: bool = False  # never filtered by monitor readings
    operator_options: list[str] = field(default_factory=list)  # set through /admin: registrations keep them
    token_hash: str | None = field(default=None, repr=False)  # REGISTRATION_BINDING=token: its token's hash

    def __post_init__(self) -> None:
        self.url = server_url(self.ip, self.port)

    def to_dict(self) -> dict[str, Any]:
        """The seed's JSON shape, as replies show it: whether it is bound to a token, not the token's hash."""
        # Not dataclasses.asdict: its deep copy made a save of 1,000 servers cost 20 ms of CPU.
        entry = {name: getattr(self, name) for name in SHOWN_NAMES}
        entry["models"], entry["discovered_models"] = list(self.models), list(self.discovered_models)
        entry["operator_options"] = list(self.operator_options)
        entry["model_map"], entry["labels"] = dict(self.model_map), dict(self.labels)
        entry["loaded_models"] = [model.as_dict() for model in self.loaded_models]
        entry["model_memory_gb"] = dict(self.model_memory_gb)
        entry["token_bound"] = self.token_hash is not None
        return entry

    def to_entry(self) -> dict[str, Any]:
        """What the state file keeps: `to_dict()`, with the token's hash when it has one."""
        entry = self.to_dict()
        del entry["token_bound"]
        if self.token_hash is not None:
            entry["token_hash"] = self.token_hash
        return entry

    @classmethod
    def from_dict(cls, entry: Any) -> BackendServer:
        """Rebuild a server from the state file, held to the rules a registration is; ValueError if bad.

        A DNS name is checked as a name, not resolved: a resolver that is down at start must not
        empty the fleet.
        """
        if not isinstance(entry, dict):
            raise ValueError(f"entry is not a JSON object: {entry!r:.200}")
        server_id, ip, port = entry.get("server_id"), entry.get("ip"), entry.get("port")
        if not isinstance(server_id, str) or not SERVER_ID_PATTERN.match(server_id):
            raise ValueError(f"entry has a bad server_id: {entry!r:.200}")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"entry {server_id!r} has a bad port: {port!r:.200}")
        ip, monitor_url = _checked_addresses(server_id, ip, entry.get("monitor_url"))
        fail_count = entry.get("fail_count", 0)
        return cls(
            server_id=server_id,
            ip=ip,
            port=port,
            is_healthy=entry.get("is_healthy", True) is not False,
            fail_count=fail_count if isinstance(fail_count, int) and fail_count >= 0 else 0,
            last_check_time=_optional_str(entry.get("last_check_time")),
            last_used_time=_optional_str(entry.get("last_used_time")),
            monitor_url=monitor_url,
            health_changed_time=_optional_str(entry.get("health_changed_time")),
            last_error=_optional_str(entry.get("last_error")),
            draining=entry.get("draining", False) is True,
            discovered_models=_strings(entry.get("discovered_models", [])),
            loaded_models=loaded_from(entry.get("loaded_models")),
            operator_options=[name for name in OPTION_NAMES if name in _strings(entry.get("operator_options", []))],
            token_hash=_checked_token_hash(server_id, entry.get("token_hash")),
            **{name: entry[name] for name in OPTION_NAMES if name in entry},
        ).checked()

    def checked(self) -> BackendServer:
        """Self, after checking the routing options read from the state file; ValueError if bad."""
        for name in ("weight", "priority", "max_concurrent", "max_allocations"):
            value = getattr(self, name)
            low = 0 if name in ("max_concurrent", "max_allocations") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"entry {self.server_id!r} has a bad {name}: {value!r}")
        if _strings(self.models) != self.models:
            raise ValueError(f"entry {self.server_id!r} has bad models: {self.models!r:.200}")
        for name in ("model_map", "labels"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(is_text(x) for pair in value.items() for x in pair):
                raise ValueError(f"entry {self.server_id!r} has a bad {name}: {value!r:.200}")
        self._check_seed_001_options()
        return self

    def _check_seed_001_options(self) -> None:
        """ValueError naming the first of model_memory_gb, type, description, skip_resource_check that is bad."""
        checks = {
            "model_memory_gb": is_need_map(self.model_memory_gb),
            "type": self.type in DEVICE_TYPES,
            "description": is_text(self.description) and len(self.description) <= MAX_DESCRIPTION,
            "skip_resource_check": isinstance(self.skip_resource_check, bool),
        }
        for name, good in checks.items():
            if not good:
                raise ValueError(f"entry {self.server_id!r} has a bad {name}: {getattr(self, name)!r:.200}")

    def options(self) -> dict[str, Any]:
        """The routing options an operator may set."""
        return {name: getattr(self, name) for name in OPTION_NAMES}


FIELD_NAMES = tuple(f.name for f in fields(BackendServer))
SHOWN_NAMES = tuple(name for name in FIELD_NAMES if name != "token_hash")
SEED_001_OPTIONS = ("model_memory_gb", "type", "description", "skip_resource_check")
OPTION_NAMES = (
    "weight",
    "priority",
    "max_concurrent",
    "models",
    "model_map",
    "labels",
    *SEED_001_OPTIONS,
    "max_allocations",
)


def _checked_addresses(server_id: str, ip: Any, monitor_url: Any) -> tuple[str, str | None]:
    """An entry's ip, and its monitor URL in its usual form, once both pass the rules; ValueError if not."""
    name, value = "ip", ip
    try:
        if not isinstance(ip, str):
            raise AddressError("must be a string.")
        check_backend_address(ip, resolve=False)
        if monitor_url is None:
            return ip, None
        name, value = "monitor_url", monitor_url
        if not isinstance(monitor_url, str):
            raise AddressError("must be a string.")
        return ip, checked_monitor_url(monitor_url, resolve=False)
    except AddressError as exc:
        raise ValueError(f"entry {server_id!r} has a bad {name} {value!r:.200}: {exc}") from None


def _checked_token_hash(server_id: str, token_hash: Any) -> str | None:
    if token_hash is not None and not (isinstance(token_hash, str) and HASH_PATTERN.match(token_hash)):
        raise ValueError(f"entry {server_id!r} has a bad token_hash")  # never shown: it may be close to one
    return token_hash


def is_text(value: Any) -> bool:
    """True for a string that UTF-8 can write: a lone surrogate ("\\ud800") would fail every later save."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _strings(value: Any) -> list[str]:
    return [item for item in value if is_text(item)] if isinstance(value, list) else []


def _optional_str(value: Any) -> str | None:
    return value if is_text(value) else None
