"""The GPU gateway: `create_app()` builds it; gunicorn serves `app:app`."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from gateway import __version__, errors
from gateway.api import admin, allocations, dashboard, jobs, llm, openapi, status, worker_socket, workers
from gateway.api.webhook import register_webhook_routes
from gateway.cluster.connection import Redis
from gateway.cluster.slots import SharedSlots
from gateway.config import Config, ConfigError, parse_bind
from gateway.fleet.health import HealthChecker
from gateway.fleet.local_copy import LocalCopy, copy_path
from gateway.fleet.model_discovery import ModelDiscoverer
from gateway.fleet.monitor_reader import MonitorReader
from gateway.fleet.redis_store import RedisFleetStore
from gateway.fleet.store import JsonFileStore
from gateway.manager import BackendManager, backend_manager
from gateway.observability import logs, metrics
from gateway.proxy import views
from gateway.proxy.client_limit import ClientLimit
from gateway.routing.outliers import OutlierDetector

DEFAULT_BIND = "127.0.0.1:5000"
log = logging.getLogger("gateway")


def create_app(config: Config | None = None) -> Flask:
    """Build a gateway. With no config, read the environment and use the default manager."""
    manager = backend_manager if config is None else BackendManager()
    config = config or Config.from_env()
    configure_logging(config)
    app = Flask(__name__)
    app.config["GATEWAY"] = config
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the seed's field order
    # REDIS_URL: the state every process and host shares lives there; None keeps it embedded.
    shared = Redis(config.redis_url, config.redis_prefix, config.redis_timeout) if config.redis_url else None
    app.extensions["redis"] = shared

    manager.configure(
        RedisFleetStore(shared) if shared is not None else JsonFileStore(config.backend_servers_file),
        failure_threshold=config.health_check_failures,
        health_check_interval=config.health_check_interval,
        health_checker=HealthChecker(
            config.health_check_path, config.health_check_timeout, config.health_check_concurrency
        ),
        monitor_reader=MonitorReader(config.health_check_timeout),
        model_discoverer=ModelDiscoverer(config.model_discovery, config.health_check_timeout),
    )
    manager.routing_policy = config.routing_policy
    manager.load_weights = dict(config.load_score_weights)
    manager.selector.slow_start_seconds = config.slow_start_seconds
    manager.selector.prefix.load_bound = config.prefix_load_bound
    manager.selector.prefix.load_slack = config.prefix_load_slack
    manager.selector.placement.set_fleet_needs(config.model_memory_gb)
    manager.queue_timeout, manager.queue_max_size = config.queue_timeout, config.queue_max_size
    manager.outliers = OutlierDetector(
        config.outlier_consecutive_failures, config.outlier_base_ejection_seconds, config.outlier_max_ejection_seconds
    )
    # Redis mode: the fleet as this host's processes last read it, for one that starts while Redis is down.
    local_copy = None
    if shared is not None:
        local_copy = LocalCopy(copy_path(config.backend_servers_file), f"{shared.where} {shared.prefix}")
    manager.load(local_copy)
    # Caps across processes: a dead process's slots are free once their leases run out.
    manager.shared_slots = SharedSlots(shared, config.slot_lease_seconds) if shared is not None else None
    if shared is not None:
        manager.share(shared, local_copy)
        left_behind = Path(config.backend_servers_file)
        if not manager.list_servers() and left_behind.is_file() and left_behind.stat().st_size > 3:  # not "[]\n"
            log.warning(
                "Redis holds no servers, but %s does; `gpu-gateway migrate --to-redis` copies them (and the jobs)",
                config.backend_servers_file,
            )
    app.extensions["backend_manager"] = manager
    errors.init_app(app)
    status.init_app(app, __version__)
    metrics.init_app(app, manager)
    register_webhook_routes(app)
    admin.init_app(app)
    dashboard.init_app(app)
    views.init_app(app)
    jobs.init_app(app)  # after the proxy: it lets the proxy turn requests into jobs
    workers.init_app(app)  # after the jobs: the pull workers' endpoints call the JobService
    worker_socket.init_app(app)
    llm.init_app(app)
    allocations.init_app(app)  # after the proxy: it routes X-Allocation-Key there
    openapi.init_app(app)  # after every route: it describes them
    app.wsgi_app = views.FastPath(app, app.wsgi_app)  # type: ignore[method-assign]  # after every route
    if config.client_max_connections:  # inside ProxyFix: it counts the client's address, not a proxy's
        app.wsgi_app = ClientLimit(app.wsgi_app, config.client_max_connections)  # type: ignore[method-assign]
    if config.trusted_proxy_count:  # outermost: every path sees the client's real address
        n = config.trusted_proxy_count
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]

    def shutdown() -> None:
        app.extensions["jobs"].stop()
        manager.shutdown()
        app.extensions["allocation_failover"].stop()
        app.extensions["allocations"].close()
        app.extensions["jobs"].store.close()
        app.extensions["task_affinity"].close()
        if shared is not None:
            shared.close()

    app.extensions["gateway_shutdown"] = shutdown
    atexit.register(shutdown)
    return app


def configure_logging(config: Config) -> None:
    """Structured lines to stdout (journald under systemd), and to LOG_DIR's files when set."""
    secrets = [
        s
        for s in (
            config.webhook_secret,
            config.metrics_token,
            config.admin_token,
            config.job_callback_secret,
            config.worker_token,
        )
        if s
    ]
    logs.configure(
        config.log_level, config.log_format, config.log_dir, config.log_max_bytes, config.log_backups, secrets
    )


_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """Build the module-level `app` on first use, so that importing this module does nothing."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _app_lock:
        if "app" not in globals():
            globals()["app"] = create_app()
    return globals()["app"]


def main() -> None:
    """Run with werkzeug's threaded server (`python app.py`); production uses gunicorn."""
    try:
        host, port = parse_bind(os.environ.get("GATEWAY_BIND", DEFAULT_BIND))
        application = create_app()
    except ConfigError as exc:
        sys.exit(f"gateway: {exc}")
    application.run(host=host, port=port, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
