"""The gateway's own liveness (/health, open) and the operator's summary (/status, the admin credential)."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify

from gateway.api.auth import admin_authorized, admin_refusal

bp = Blueprint("status", __name__)


@bp.get("/health")
def health() -> Response:
    """200 while the gateway serves; no secret, no server data."""
    return jsonify(status="ok", version=current_app.config["GATEWAY_VERSION"], uptime_s=_uptime())


@bp.get("/status")
def status() -> Response:
    """Version, uptime, policy, the health job, server counts and request totals."""
    if not admin_authorized():
        return admin_refusal()
    manager = current_app.extensions["backend_manager"]
    fleet = manager.get_status()
    by_class, unanswered = current_app.extensions["metrics"].total_requests()
    data: dict[str, Any] = {
        "version": current_app.config["GATEWAY_VERSION"],
        "uptime_s": _uptime(),
        "routing_policy": current_app.config["GATEWAY"].routing_policy,
        "health_check": {
            "running": fleet["health_check_running"],
            "interval_s": manager.health_check_interval,
            "last_sweep": manager.last_sweep or None,
        },
        "servers": {key: fleet[key] for key in ("total_servers", "healthy_servers", "unhealthy_servers")},
        "state": manager.cluster_state(),
        "requests": {
            "total": sum(by_class.values()),
            "by_status_class": by_class,
            # refused before any server had them (no healthy server, an unknown task): not proxied
            "not_proxied": {"total": sum(unanswered.values()), "by_status_class": unanswered},
        },
    }
    return jsonify(success=True, data=data)


def _uptime() -> float:
    return round(time.monotonic() - current_app.config["GATEWAY_STARTED"], 1)


def init_app(app: Flask, version: str) -> None:
    """Add /health and /status."""
    app.config["GATEWAY_VERSION"] = version
    app.config["GATEWAY_STARTED"] = time.monotonic()
    app.register_blueprint(bp)
