"""Gateway settings, read once from environment variables and validated at start."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from gateway.fleet.model_memory import parse_model_memory
from gateway.fleet.resources import DEFAULT_WEIGHTS, parse_weights

T = TypeVar("T")
ROUTING_POLICIES = ("round_robin", "least_connections", "least_load", "prefix")
MODEL_DISCOVERY_MODES = ("auto", "ollama", "openai", "off")
MAX_DASHBOARD_SESSION_HOURS = 168.0  # a week; a login used to last 31 days
REGISTRATION_BINDINGS = ("off", "token")

GENERATE_COMMAND = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
SETUP_HELP = (
    "WEBHOOK_SECRET is not set. The gateway needs the preset secret that GPU servers send "
    "when they register. Set it, for example:\n"
    f'    export WEBHOOK_SECRET="$({GENERATE_COMMAND})"\n'
    "or start the gateway with `make run`, which generates one for you."
)
# A secret any shorter can be guessed, and the log redaction blanks out every occurrence of it:
# with WEBHOOK_SECRET=s, each letter "s" in the logs became [REDACTED].
MIN_SECRET_LENGTH = 16
SECRET_SETTINGS = {
    "webhook_secret": "WEBHOOK_SECRET",
    "admin_token": "ADMIN_TOKEN",
    "metrics_token": "METRICS_TOKEN",
    "job_callback_secret": "JOB_CALLBACK_SECRET",
    "worker_token": "WORKER_TOKEN",
}

HIDDEN_VALUES = {"REDIS_URL", "ALLOCATION_MIGRATE_URL"}  # values an error must not repeat: they may hold a secret


class ConfigError(ValueError):
    """A setting is missing or has a bad value; the message names the variable."""


@dataclass(frozen=True)
class Config:
    """Every setting of the gateway. Build it with `Config.from_env()`."""

    webhook_secret: str = field(repr=False)
    backend_api_base: str = ""
    backend_servers_file: str = "backend_servers.json"
    task_affinity_file: str = "task_affinity.db"
    task_affinity_ttl: float = 86400.0
    health_check_interval: float = 30.0
    health_check_failures: int = 3
    health_check_timeout: float = 5.0
    health_check_path: str = "/health"
    health_check_concurrency: int = 256
    proxy_prefixes: tuple[str, ...] = ("/api/",)
    task_routes: tuple[str, ...] = ("/api/status/{task_id}", "/api/download/{task_id}")
    proxy_connect_timeout: float = 5.0
    proxy_read_timeout: float = 300.0
    proxy_head_timeout: float = 120.0
    client_body_timeout: float = 60.0
    client_max_connections: int = 256
    proxy_max_retries: int = 2
    proxy_max_body_bytes: int = 100 * 1024 * 1024
    proxy_pool_maxsize: int = 128
    allowed_backend_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    trusted_proxy_count: int = 0
    log_level: str = "INFO"
    log_format: str = "kv"
    log_dir: str = ""
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5
    metrics_token: str = field(default="", repr=False)
    routing_policy: str = "round_robin"
    load_score_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    # ROUTING_POLICY=prefix (docs/llm.md, "Prefix-aware routing")
    prefix_block_size: int = 256
    prefix_max_blocks: int = 32
    prefix_load_bound: float = 1.25
    prefix_load_slack: int = 4
    model_memory_gb: dict[str, float] = field(default_factory=dict)  # model -> GB a request for it needs free
    admin_token: str = field(default="", repr=False)
    queue_timeout: float = 30.0
    queue_max_size: int = 100
    outlier_consecutive_failures: int = 5
    outlier_base_ejection_seconds: float = 30.0
    outlier_max_ejection_seconds: float = 300.0
    slow_start_seconds: float = 0.0
    model_discovery: str = "auto"
    llm_routes: bool = True
    dashboard_session_hours: float = 8.0
    dashboard_secure_cookie: bool = False
    max_servers: int = 10_000
    registration_binding: str = "off"
    # Durable jobs (docs/jobs.md)
    job_store_file: str = "jobs.db"
    job_store_max_bytes: int = 1024 * 1024 * 1024
    job_queue_ttl: float = 86400.0
    job_result_ttl: float = 86400.0
    idempotency_ttl: float = 86400.0
    job_max_attempts: int = 3
    job_lease_seconds: float = 30.0
    queue_when_offline: tuple[str, ...] = ()
    job_callback_secret: str = field(default="", repr=False)
    job_callback_attempts: int = 8
    job_callback_backoff: float = 5.0
    # Pull workers (docs/jobs.md, "Pull workers")
    worker_token: str = field(default="", repr=False)
    worker_max_long_polls: int = 1000
    # Several processes and hosts (README, "More than one process or host")
    redis_url: str = field(default="", repr=False)  # may hold a password
    redis_prefix: str = "gpu-gateway:"
    redis_timeout: float = 1.0
    slot_lease_seconds: float = 30.0
    gateway_workers: int = 1
    # Allocations: long-lived keys pinned to servers (docs/allocations.md)
    allocation_store_file: str = "allocations.db"
    allocation_migrate_url: str = ""
    allocation_migrate_timeout: float = 10.0
    allocation_failover_seconds: float = 300.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Read the settings from `environ` (default: os.environ); keyword overrides win."""
        env = os.environ if environ is None else environ
        reader = _Reader(env)
        values: dict[str, Any] = {
            "webhook_secret": reader.secret("WEBHOOK_SECRET"),
            "backend_api_base": reader.get("BACKEND_API_BASE", "", _parse_base_url),
            "backend_servers_file": reader.get("BACKEND_SERVERS_FILE", cls.backend_servers_file, _nonempty),
            "task_affinity_file": reader.get("TASK_AFFINITY_FILE", cls.task_affinity_file, _nonempty),
            "task_affinity_ttl": reader.get("TASK_AFFINITY_TTL", cls.task_affinity_ttl, _number(min_value=1)),
            "health_check_interval": reader.get(
                "HEALTH_CHECK_INTERVAL", cls.health_check_interval, _number(min_value=1)
            ),
            "health_check_failures": reader.get("HEALTH_CHECK_FAILURES", cls.health_check_failures, _integer(1)),
            "health_check_timeout": reader.get(
                "HEALTH_CHECK_TIMEOUT", cls.health_check_timeout, _number(min_value=0.1)
            ),
            "health_check_path": reader.get("HEALTH_CHECK_PATH", cls.health_check_path, _url_path),
            "health_check_concurrency": reader.get(
                "HEALTH_CHECK_CONCURRENCY", cls.health_check_concurrency, _integer(1)
            ),
            "proxy_prefixes": reader.get("PROXY_PREFIXES", cls.proxy_prefixes, _prefixes),
            "task_routes": reader.get("TASK_ROUTES", cls.task_routes, _task_routes),
            "proxy_connect_timeout": reader.get(
                "PROXY_CONNECT_TIMEOUT", cls.proxy_connect_timeout, _number(min_value=0.1)
            ),
            "proxy_read_timeout": reader.get("PROXY_READ_TIMEOUT", cls.proxy_read_timeout, _number(min_value=0.1)),
            "proxy_head_timeout": reader.get("PROXY_HEAD_TIMEOUT", cls.proxy_head_timeout, _number(min_value=0.1)),
            "client_body_timeout": reader.get("CLIENT_BODY_TIMEOUT", cls.client_body_timeout, _number(min_value=0.1)),
            "client_max_connections": reader.get("CLIENT_MAX_CONNECTIONS", cls.client_max_connections, _integer(0)),
            "proxy_max_retries": reader.get("PROXY_MAX_RETRIES", cls.proxy_max_retries, _integer(0)),
            "proxy_max_body_bytes": reader.get("PROXY_MAX_BODY_BYTES", cls.proxy_max_body_bytes, _integer(1)),
            "proxy_pool_maxsize": reader.get("PROXY_POOL_MAXSIZE", cls.proxy_pool_maxsize, _integer(1)),
            "allowed_backend_networks": reader.get("ALLOWED_BACKEND_NETWORKS", cls.allowed_backend_networks, _networks),
            "trusted_proxy_count": reader.get("TRUSTED_PROXY_COUNT", cls.trusted_proxy_count, _integer(0)),
            "log_level": reader.get("LOG_LEVEL", cls.log_level, _log_level),
            "log_format": reader.get("LOG_FORMAT", cls.log_format, _log_format),
            "log_dir": reader.get("LOG_DIR", cls.log_dir, _nonempty),
            "log_max_bytes": reader.get("LOG_MAX_BYTES", cls.log_max_bytes, _integer(1024)),
            "log_backups": reader.get("LOG_BACKUPS", cls.log_backups, _integer(0)),
            "metrics_token": reader.get("METRICS_TOKEN", "", _nonempty),
            "routing_policy": reader.get("ROUTING_POLICY", cls.routing_policy, _policy),
            "load_score_weights": reader.get("LOAD_SCORE_WEIGHTS", dict(DEFAULT_WEIGHTS), parse_weights),
            "prefix_block_size": reader.get("PREFIX_BLOCK_SIZE", cls.prefix_block_size, _integer(16, 65536)),
            "prefix_max_blocks": reader.get("PREFIX_MAX_BLOCKS", cls.prefix_max_blocks, _integer(1, 256)),
            "prefix_load_bound": reader.get("PREFIX_LOAD_BOUND", cls.prefix_load_bound, _number(min_value=1)),
            "prefix_load_slack": reader.get("PREFIX_LOAD_SLACK", cls.prefix_load_slack, _integer(0)),
            "model_memory_gb": reader.get("MODEL_MEMORY_GB", dict[str, float](), parse_model_memory),
            "admin_token": reader.optional_secret("ADMIN_TOKEN"),
            "queue_timeout": reader.get("QUEUE_TIMEOUT", cls.queue_timeout, _number(min_value=0)),
            "queue_max_size": reader.get("QUEUE_MAX_SIZE", cls.queue_max_size, _integer(0)),
            "outlier_consecutive_failures": reader.get(
                "OUTLIER_CONSECUTIVE_FAILURES", cls.outlier_consecutive_failures, _integer(0)
            ),
            "outlier_base_ejection_seconds": reader.get(
                "OUTLIER_BASE_EJECTION_SECONDS", cls.outlier_base_ejection_seconds, _number(min_value=0.1)
            ),
            "outlier_max_ejection_seconds": reader.get(
                "OUTLIER_MAX_EJECTION_SECONDS", cls.outlier_max_ejection_seconds, _number(min_value=0.1)
            ),
            "slow_start_seconds": reader.get("SLOW_START_SECONDS", cls.slow_start_seconds, _number(min_value=0)),
            "model_discovery": reader.get("MODEL_DISCOVERY", cls.model_discovery, _choice(MODEL_DISCOVERY_MODES)),
            "llm_routes": reader.get("LLM_ROUTES", cls.llm_routes, _boolean),
            "dashboard_session_hours": reader.get(
                "DASHBOARD_SESSION_HOURS", cls.dashboard_session_hours, _session_hours
            ),
            "dashboard_secure_cookie": reader.get("DASHBOARD_SECURE_COOKIE", cls.dashboard_secure_cookie, _boolean),
            "max_servers": reader.get("MAX_SERVERS", cls.max_servers, _integer(1)),
            "registration_binding": reader.get(
                "REGISTRATION_BINDING", cls.registration_binding, _choice(REGISTRATION_BINDINGS)
            ),
            "job_store_file": reader.get("JOB_STORE_FILE", cls.job_store_file, _nonempty),
            "job_store_max_bytes": reader.get("JOB_STORE_MAX_BYTES", cls.job_store_max_bytes, _integer(1024 * 1024)),
            "job_queue_ttl": reader.get("JOB_QUEUE_TTL", cls.job_queue_ttl, _number(min_value=1)),
            "job_result_ttl": reader.get("JOB_RESULT_TTL", cls.job_result_ttl, _number(min_value=1)),
            "idempotency_ttl": reader.get("IDEMPOTENCY_TTL", cls.idempotency_ttl, _number(min_value=1)),
            "job_max_attempts": reader.get("JOB_MAX_ATTEMPTS", cls.job_max_attempts, _integer(1)),
            "job_lease_seconds": reader.get("JOB_LEASE_SECONDS", cls.job_lease_seconds, _number(min_value=1)),
            "queue_when_offline": reader.get("QUEUE_WHEN_OFFLINE", cls.queue_when_offline, _path_prefixes),
            "job_callback_secret": reader.optional_secret("JOB_CALLBACK_SECRET"),
            "job_callback_attempts": reader.get("JOB_CALLBACK_ATTEMPTS", cls.job_callback_attempts, _integer(1)),
            "job_callback_backoff": reader.get(
                "JOB_CALLBACK_BACKOFF", cls.job_callback_backoff, _number(min_value=0.1)
            ),
            "worker_token": reader.optional_secret("WORKER_TOKEN"),
            "worker_max_long_polls": reader.get("WORKER_MAX_LONG_POLLS", cls.worker_max_long_polls, _integer(1)),
            "redis_url": reader.get("REDIS_URL", "", _redis_url),
            "redis_prefix": reader.get("REDIS_PREFIX", cls.redis_prefix, _redis_prefix),
            "redis_timeout": reader.get("REDIS_TIMEOUT", cls.redis_timeout, _number(min_value=0.05)),
            "slot_lease_seconds": reader.get("SLOT_LEASE_SECONDS", cls.slot_lease_seconds, _number(min_value=1)),
            "gateway_workers": reader.get("GATEWAY_WORKERS", cls.gateway_workers, _integer(1)),
            "allocation_store_file": reader.get("ALLOCATION_STORE_FILE", cls.allocation_store_file, _nonempty),
            "allocation_migrate_url": reader.get("ALLOCATION_MIGRATE_URL", "", _webhook_url),
            "allocation_migrate_timeout": reader.get(
                "ALLOCATION_MIGRATE_TIMEOUT", cls.allocation_migrate_timeout, _number(min_value=0.1)
            ),
            "allocation_failover_seconds": reader.get(
                "ALLOCATION_FAILOVER_SECONDS", cls.allocation_failover_seconds, _number(min_value=0)
            ),
        }
        values.update(overrides)
        _check_secret_lengths(values)
        if not reader.is_set("PROXY_HEAD_TIMEOUT") and "proxy_head_timeout" not in overrides:
            # Unset, it is the shorter of its default and the read timeout, which used to cover the head.
            values["proxy_head_timeout"] = min(cls.proxy_head_timeout, values["proxy_read_timeout"])
        if not reader.is_set("HEALTH_CHECK_TIMEOUT") and "health_check_timeout" not in overrides:
            # Unset, it follows the interval, so that HEALTH_CHECK_INTERVAL=1 alone is a valid setting.
            values["health_check_timeout"] = min(cls.health_check_timeout, 0.8 * values["health_check_interval"])
        if values["health_check_timeout"] >= values["health_check_interval"]:
            raise ConfigError(
                f"HEALTH_CHECK_TIMEOUT ({values['health_check_timeout']:g}) must be below "
                f"HEALTH_CHECK_INTERVAL ({values['health_check_interval']:g}), or sweeps would overlap."
            )
        if values["outlier_max_ejection_seconds"] < values["outlier_base_ejection_seconds"]:
            raise ConfigError(
                f"OUTLIER_MAX_EJECTION_SECONDS ({values['outlier_max_ejection_seconds']:g}) must be at least "
                f"OUTLIER_BASE_EJECTION_SECONDS ({values['outlier_base_ejection_seconds']:g})."
            )
        if values["allocation_migrate_url"] and not values["job_callback_secret"]:
            raise ConfigError(
                "ALLOCATION_MIGRATE_URL needs JOB_CALLBACK_SECRET: each move is announced signed with it, as the"
                " job callbacks are, so that the receiver can tell the gateway's announcements from anyone's."
            )
        if values["gateway_workers"] > 1 and not values["redis_url"]:
            raise ConfigError(
                f"GATEWAY_WORKERS={values['gateway_workers']} needs REDIS_URL: without Redis the fleet's file, the "
                "job store and the health sweep have one owner, one process. Set REDIS_URL "
                "(for example redis://127.0.0.1:6379/0), or GATEWAY_WORKERS=1."
            )
        return cls(**values)


def _check_secret_lengths(values: Mapping[str, Any]) -> None:
    for key, name in SECRET_SETTINGS.items():
        value = values[key]
        if value and len(value) < MIN_SECRET_LENGTH:
            raise ConfigError(
                f"{name} is {len(value)} characters long; it must have at least {MIN_SECRET_LENGTH}. "
                f"Make one with: {GENERATE_COMMAND}"
            )


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
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

    def secret(self, name: str) -> str:
        value = self.env.get(name, "")
        if not value.strip():
            raise ConfigError(SETUP_HELP)
        return self.optional_secret(name)

    def optional_secret(self, name: str) -> str:
        value = self.env.get(name, "")
        if value != value.strip():
            raise ConfigError(f"{name} has leading or trailing whitespace; remove it.")
        return value


def _nonempty(raw: str) -> str:
    return raw


def _number(min_value: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
        if not value >= min_value or value == float("inf"):
            raise ValueError(f"expected a finite number of at least {min_value:g}")
        return value

    return parse


def _integer(min_value: int, max_value: int | None = None) -> Callable[[str], int]:
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


def _url_path(raw: str) -> str:
    if not raw.startswith("/"):
        raise ValueError("expected a path starting with '/'")
    return raw


def _prefixes(raw: str) -> tuple[str, ...]:
    prefixes = tuple(p.strip() for p in raw.split(",") if p.strip())
    for prefix in prefixes:
        if not (prefix.startswith("/") and prefix.endswith("/")) or prefix == "/":
            raise ValueError(f"prefix {prefix!r} must start and end with '/' and not be '/' alone")
        if prefix.startswith("/webhook/"):
            raise ValueError("prefixes may not cover /webhook/")
    if not prefixes:
        raise ValueError("expected a comma-separated list of path prefixes")
    return prefixes


def _path_prefixes(raw: str) -> tuple[str, ...]:
    """Comma-separated path prefixes, each starting with '/'."""
    prefixes = tuple(p.strip() for p in raw.split(",") if p.strip())
    for prefix in prefixes:
        if not prefix.startswith("/"):
            raise ValueError(f"prefix {prefix!r} must start with '/'")
    return prefixes


def _task_routes(raw: str) -> tuple[str, ...]:
    """Comma-separated path templates, each with `{task_id}` as one whole segment; `off` for none."""
    if raw.strip().lower() == "off":
        return ()
    routes = tuple(route.strip() for route in raw.split(",") if route.strip())
    for route in routes:
        segments = route.split("/")
        if not route.startswith("/") or segments.count("{task_id}") != 1 or route.count("{") != 1:
            raise ValueError(f"{route!r} must be a path starting with '/' with {{task_id}} as one whole segment")
    return routes


def _redis_url(raw: str) -> str:
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


def _webhook_url(raw: str) -> str:
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


def _redis_prefix(raw: str) -> str:
    if not raw or len(raw) > 64 or any(c.isspace() or c in "{}*?[]" for c in raw):
        raise ValueError("expected up to 64 characters, without spaces or any of {}*?[]")
    return raw


def _parse_base_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("the URL may not carry a query or fragment")
    if parts.username or parts.password:
        raise ValueError("credentials in the URL are not sent by the proxy; remove them")
    return raw.rstrip("/")


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in raw.split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{item.strip()!r} is not a CIDR network") from None
    return tuple(networks)


def _policy(raw: str) -> str:
    return _choice(ROUTING_POLICIES)(raw)


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return raw

    return parse


def _boolean(raw: str) -> bool:
    value = raw.lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError("expected true or false (also 1/0, yes/no, on/off)")
    return value in ("1", "true", "yes", "on")


def _session_hours(raw: str) -> float:
    hours = _number(min_value=0.01)(raw)
    if hours > MAX_DASHBOARD_SESSION_HOURS:
        raise ValueError(f"expected at most {MAX_DASHBOARD_SESSION_HOURS:g} hours")
    return hours


def _log_format(raw: str) -> str:
    if raw not in ("kv", "json"):
        raise ValueError("expected kv or json")
    return raw


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def parse_bind(raw: str) -> tuple[str, int]:
    """GATEWAY_BIND as (host, port); raise ConfigError naming the variable when malformed."""
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"GATEWAY_BIND={raw!r} is not valid: expected HOST:PORT, e.g. 127.0.0.1:5000")
    return host.strip("[]"), int(port)
