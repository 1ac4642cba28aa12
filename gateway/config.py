"""Gateway settings, read once from environment variables and validated at start."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config_values import (
    ConfigError,
    EnvReader,
    parse_base_url,
    parse_boolean,
    parse_choice,
    parse_integer,
    parse_log_format,
    parse_log_level,
    parse_networks,
    parse_number,
    parse_path_prefixes,
    parse_proxy_prefixes,
    parse_redis_prefix,
    parse_redis_url,
    parse_session_hours,
    parse_task_routes,
    parse_text,
    parse_url_path,
    parse_webhook_url,
)
from gateway.fleet.model_memory import parse_model_memory
from gateway.fleet.resources import DEFAULT_WEIGHTS, parse_weights

ROUTING_POLICIES = ("round_robin", "least_connections", "least_load", "prefix")
MODEL_DISCOVERY_MODES = ("auto", "ollama", "openai", "off")
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
        reader = EnvReader(env)
        values: dict[str, Any] = {
            "webhook_secret": reader.secret("WEBHOOK_SECRET", SETUP_HELP),
            "backend_api_base": reader.get("BACKEND_API_BASE", "", parse_base_url),
            "backend_servers_file": reader.get("BACKEND_SERVERS_FILE", cls.backend_servers_file, parse_text),
            "task_affinity_file": reader.get("TASK_AFFINITY_FILE", cls.task_affinity_file, parse_text),
            "task_affinity_ttl": reader.get("TASK_AFFINITY_TTL", cls.task_affinity_ttl, parse_number(min_value=1)),
            "health_check_interval": reader.get(
                "HEALTH_CHECK_INTERVAL", cls.health_check_interval, parse_number(min_value=1)
            ),
            "health_check_failures": reader.get("HEALTH_CHECK_FAILURES", cls.health_check_failures, parse_integer(1)),
            "health_check_timeout": reader.get(
                "HEALTH_CHECK_TIMEOUT", cls.health_check_timeout, parse_number(min_value=0.1)
            ),
            "health_check_path": reader.get("HEALTH_CHECK_PATH", cls.health_check_path, parse_url_path),
            "health_check_concurrency": reader.get(
                "HEALTH_CHECK_CONCURRENCY", cls.health_check_concurrency, parse_integer(1)
            ),
            "proxy_prefixes": reader.get("PROXY_PREFIXES", cls.proxy_prefixes, parse_proxy_prefixes),
            "task_routes": reader.get("TASK_ROUTES", cls.task_routes, parse_task_routes),
            "proxy_connect_timeout": reader.get(
                "PROXY_CONNECT_TIMEOUT", cls.proxy_connect_timeout, parse_number(min_value=0.1)
            ),
            "proxy_read_timeout": reader.get("PROXY_READ_TIMEOUT", cls.proxy_read_timeout, parse_number(min_value=0.1)),
            "proxy_head_timeout": reader.get("PROXY_HEAD_TIMEOUT", cls.proxy_head_timeout, parse_number(min_value=0.1)),
            "client_body_timeout": reader.get(
                "CLIENT_BODY_TIMEOUT", cls.client_body_timeout, parse_number(min_value=0.1)
            ),
            "client_max_connections": reader.get(
                "CLIENT_MAX_CONNECTIONS", cls.client_max_connections, parse_integer(0)
            ),
            "proxy_max_retries": reader.get("PROXY_MAX_RETRIES", cls.proxy_max_retries, parse_integer(0)),
            "proxy_max_body_bytes": reader.get("PROXY_MAX_BODY_BYTES", cls.proxy_max_body_bytes, parse_integer(1)),
            "proxy_pool_maxsize": reader.get("PROXY_POOL_MAXSIZE", cls.proxy_pool_maxsize, parse_integer(1)),
            "allowed_backend_networks": reader.get(
                "ALLOWED_BACKEND_NETWORKS", cls.allowed_backend_networks, parse_networks
            ),
            "trusted_proxy_count": reader.get("TRUSTED_PROXY_COUNT", cls.trusted_proxy_count, parse_integer(0)),
            "log_level": reader.get("LOG_LEVEL", cls.log_level, parse_log_level),
            "log_format": reader.get("LOG_FORMAT", cls.log_format, parse_log_format),
            "log_dir": reader.get("LOG_DIR", cls.log_dir, parse_text),
            "log_max_bytes": reader.get("LOG_MAX_BYTES", cls.log_max_bytes, parse_integer(1024)),
            "log_backups": reader.get("LOG_BACKUPS", cls.log_backups, parse_integer(0)),
            "metrics_token": reader.get("METRICS_TOKEN", "", parse_text),
            "routing_policy": reader.get("ROUTING_POLICY", cls.routing_policy, parse_choice(ROUTING_POLICIES)),
            "load_score_weights": reader.get("LOAD_SCORE_WEIGHTS", dict(DEFAULT_WEIGHTS), parse_weights),
            "prefix_block_size": reader.get("PREFIX_BLOCK_SIZE", cls.prefix_block_size, parse_integer(16, 65536)),
            "prefix_max_blocks": reader.get("PREFIX_MAX_BLOCKS", cls.prefix_max_blocks, parse_integer(1, 256)),
            "prefix_load_bound": reader.get("PREFIX_LOAD_BOUND", cls.prefix_load_bound, parse_number(min_value=1)),
            "prefix_load_slack": reader.get("PREFIX_LOAD_SLACK", cls.prefix_load_slack, parse_integer(0)),
            "model_memory_gb": reader.get("MODEL_MEMORY_GB", dict[str, float](), parse_model_memory),
            "admin_token": reader.optional_secret("ADMIN_TOKEN"),
            "queue_timeout": reader.get("QUEUE_TIMEOUT", cls.queue_timeout, parse_number(min_value=0)),
            "queue_max_size": reader.get("QUEUE_MAX_SIZE", cls.queue_max_size, parse_integer(0)),
            "outlier_consecutive_failures": reader.get(
                "OUTLIER_CONSECUTIVE_FAILURES", cls.outlier_consecutive_failures, parse_integer(0)
            ),
            "outlier_base_ejection_seconds": reader.get(
                "OUTLIER_BASE_EJECTION_SECONDS", cls.outlier_base_ejection_seconds, parse_number(min_value=0.1)
            ),
            "outlier_max_ejection_seconds": reader.get(
                "OUTLIER_MAX_EJECTION_SECONDS", cls.outlier_max_ejection_seconds, parse_number(min_value=0.1)
            ),
            "slow_start_seconds": reader.get("SLOW_START_SECONDS", cls.slow_start_seconds, parse_number(min_value=0)),
            "model_discovery": reader.get("MODEL_DISCOVERY", cls.model_discovery, parse_choice(MODEL_DISCOVERY_MODES)),
            "llm_routes": reader.get("LLM_ROUTES", cls.llm_routes, parse_boolean),
            "dashboard_session_hours": reader.get(
                "DASHBOARD_SESSION_HOURS", cls.dashboard_session_hours, parse_session_hours
            ),
            "dashboard_secure_cookie": reader.get(
                "DASHBOARD_SECURE_COOKIE", cls.dashboard_secure_cookie, parse_boolean
            ),
            "max_servers": reader.get("MAX_SERVERS", cls.max_servers, parse_integer(1)),
            "registration_binding": reader.get(
                "REGISTRATION_BINDING", cls.registration_binding, parse_choice(REGISTRATION_BINDINGS)
            ),
            "job_store_file": reader.get("JOB_STORE_FILE", cls.job_store_file, parse_text),
            "job_store_max_bytes": reader.get(
                "JOB_STORE_MAX_BYTES", cls.job_store_max_bytes, parse_integer(1024 * 1024)
            ),
            "job_queue_ttl": reader.get("JOB_QUEUE_TTL", cls.job_queue_ttl, parse_number(min_value=1)),
            "job_result_ttl": reader.get("JOB_RESULT_TTL", cls.job_result_ttl, parse_number(min_value=1)),
            "idempotency_ttl": reader.get("IDEMPOTENCY_TTL", cls.idempotency_ttl, parse_number(min_value=1)),
            "job_max_attempts": reader.get("JOB_MAX_ATTEMPTS", cls.job_max_attempts, parse_integer(1)),
            "job_lease_seconds": reader.get("JOB_LEASE_SECONDS", cls.job_lease_seconds, parse_number(min_value=1)),
            "queue_when_offline": reader.get("QUEUE_WHEN_OFFLINE", cls.queue_when_offline, parse_path_prefixes),
            "job_callback_secret": reader.optional_secret("JOB_CALLBACK_SECRET"),
            "job_callback_attempts": reader.get("JOB_CALLBACK_ATTEMPTS", cls.job_callback_attempts, parse_integer(1)),
            "job_callback_backoff": reader.get(
                "JOB_CALLBACK_BACKOFF", cls.job_callback_backoff, parse_number(min_value=0.1)
            ),
            "worker_token": reader.optional_secret("WORKER_TOKEN"),
            "worker_max_long_polls": reader.get("WORKER_MAX_LONG_POLLS", cls.worker_max_long_polls, parse_integer(1)),
            "redis_url": reader.get("REDIS_URL", "", parse_redis_url),
            "redis_prefix": reader.get("REDIS_PREFIX", cls.redis_prefix, parse_redis_prefix),
            "redis_timeout": reader.get("REDIS_TIMEOUT", cls.redis_timeout, parse_number(min_value=0.05)),
            "slot_lease_seconds": reader.get("SLOT_LEASE_SECONDS", cls.slot_lease_seconds, parse_number(min_value=1)),
            "gateway_workers": reader.get("GATEWAY_WORKERS", cls.gateway_workers, parse_integer(1)),
            "allocation_store_file": reader.get("ALLOCATION_STORE_FILE", cls.allocation_store_file, parse_text),
            "allocation_migrate_url": reader.get("ALLOCATION_MIGRATE_URL", "", parse_webhook_url),
            "allocation_migrate_timeout": reader.get(
                "ALLOCATION_MIGRATE_TIMEOUT", cls.allocation_migrate_timeout, parse_number(min_value=0.1)
            ),
            "allocation_failover_seconds": reader.get(
                "ALLOCATION_FAILOVER_SECONDS", cls.allocation_failover_seconds, parse_number(min_value=0)
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


def parse_bind(raw: str) -> tuple[str, int]:
    """GATEWAY_BIND as (host, port); raise ConfigError naming the variable when malformed."""
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"GATEWAY_BIND={raw!r} is not valid: expected HOST:PORT, e.g. 127.0.0.1:5000")
    return host.strip("[]"), int(port)
