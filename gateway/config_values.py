"""Reading settings from the environment: the reader, a parser for each kind of value, the error naming one."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
MAX_DASHBOARD_SESSION_HOURS = 168.0  # a week; a login used to last 31 days
HIDDEN_VALUES = {"REDIS_URL", "ALLOCATION_MIGRATE_URL"}  # values an error must not repeat: they may hold a secret


class ConfigError(ValueError):
    """A setting is missing or has a bad value; the message names the variable."""


class EnvReader:
    """The environment's variables, each read as a setting: trimmed, and blank as unset."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        """`name` parsed by `parse`, or `default` when unset; a ConfigError naming it when invalid."""
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            shown = "(not shown: it may hold a password)" if name in HIDDEN_VALUES else repr(raw)
            raise ConfigError(f"{name}={shown} is not valid: {exc}") from None

    def is_set(self, name: str) -> bool:
        """Whether `name` has a value, as `get` reads it: blank counts as unset."""
        return self.env.get(name, "").strip() != ""

    def secret(self, name: str, missing: str) -> str:
        """A secret that must be set; `missing` says how to set it."""
        value = self.env.get(name, "")
        if not value.strip():
            raise ConfigError(missing)
        return self.optional_secret(name)

    def optional_secret(self, name: str) -> str:
        """A secret, kept exactly as set (blank when unset): whitespace around it is refused."""
        value = self.env.get(name, "")
        if value != value.strip():
            raise ConfigError(f"{name} has leading or trailing whitespace; remove it.")
        return value


def parse_text(raw: str) -> str:
    """Any text: the reader has taken a blank value as unset already."""
    return raw


def parse_number(min_value: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
        if not value >= min_value or value == float("inf"):
            raise ValueError(f"expected a finite number of at least {min_value:g}")
        return value

    return parse


def parse_integer(min_value: int, max_value: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
        if value < min_value:
            raise ValueError(f"expected an integer of at least {min_value}")
        if max_value is not None and value > max_value:
            raise ValueError(f"expected an integer from {min_value} to {max_value}")
        return value

    return parse


def parse_url_path(raw: str) -> str:
    if not raw.startswith("/"):
        raise ValueError("expected a path starting with '/'")
    return raw


def parse_proxy_prefixes(raw: str) -> tuple[str, ...]:
    prefixes = tuple(p.strip() for p in raw.split(",") if p.strip())
    for prefix in prefixes:
        if not (prefix.startswith("/") and prefix.endswith("/")) or prefix == "/":
            raise ValueError(f"prefix {prefix!r} must start and end with '/' and not be '/' alone")
        if prefix.startswith("/webhook/"):
            raise ValueError("prefixes may not cover /webhook/")
    if not prefixes:
        raise ValueError("expected a comma-separated list of path prefixes")
    return prefixes


def parse_path_prefixes(raw: str) -> tuple[str, ...]:
    """Comma-separated path prefixes, each starting with '/'."""
    prefixes = tuple(p.strip() for p in raw.split(",") if p.strip())
    for prefix in prefixes:
        if not prefix.startswith("/"):
            raise ValueError(f"prefix {prefix!r} must start with '/'")
    return prefixes


def parse_task_routes(raw: str) -> tuple[str, ...]:
    """Comma-separated path templates, each with `{task_id}` as one whole segment; `off` for none."""
    if raw.strip().lower() == "off":
        return ()
    routes = tuple(route.strip() for route in raw.split(",") if route.strip())
    for route in routes:
        segments = route.split("/")
        if not route.startswith("/") or segments.count("{task_id}") != 1 or route.count("{") != 1:
            raise ValueError(f"{route!r} must be a path starting with '/' with {{task_id}} as one whole segment")
    return routes


def parse_redis_url(raw: str) -> str:
    """redis://, rediss:// (TLS) or unix://; the password, if any, stays out of every message."""
    parsed = urlsplit(raw.strip())
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected redis://host:port/db, rediss://... (TLS) or unix:///path")
    if parsed.scheme != "unix" and not parsed.hostname:
        raise ValueError("the URL names no host")
    try:
        parsed.port  # noqa: B018  # raises on a bad port
    except ValueError:
        raise ValueError("the URL's port is not a number from 1 to 65535") from None
    return raw.strip()


def parse_webhook_url(raw: str) -> str:
    """An http(s) URL with a host and no credentials in it (they would be logged)."""
    parsed = urlsplit(raw)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    if parsed.username or parsed.password:
        raise ValueError("a URL may not carry credentials: the signature says who sends")
    try:
        parsed.port  # noqa: B018  # a bad port raises here
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return raw


def parse_redis_prefix(raw: str) -> str:
    if not raw or len(raw) > 64 or any(c.isspace() or c in "{}*?[]" for c in raw):
        raise ValueError("expected up to 64 characters, without spaces or any of {}*?[]")
    return raw


def parse_base_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("the URL may not carry a query or fragment")
    if parts.username or parts.password:
        raise ValueError("credentials in the URL are not sent by the proxy; remove them")
    return raw.rstrip("/")


def parse_networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in raw.split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{item.strip()!r} is not a CIDR network") from None
    return tuple(networks)


def parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return raw

    return parse


def parse_boolean(raw: str) -> bool:
    value = raw.lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError("expected true or false (also 1/0, yes/no, on/off)")
    return value in ("1", "true", "yes", "on")


def parse_session_hours(raw: str) -> float:
    hours = parse_number(min_value=0.01)(raw)
    if hours > MAX_DASHBOARD_SESSION_HOURS:
        raise ValueError(f"expected at most {MAX_DASHBOARD_SESSION_HOURS:g} hours")
    return hours


def parse_log_format(raw: str) -> str:
    if raw not in ("kv", "json"):
        raise ValueError("expected kv or json")
    return raw


def parse_log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level
