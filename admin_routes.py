"""Operator endpoints under /admin/; the secret comes in a header, never in the URL."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, current_app, jsonify

from auth import presented_secret, secret_matches
from errors import error_response

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.before_request
def require_secret() -> Response | None:
    """Every admin call needs the secret in X-Webhook-Secret or Authorization: Bearer."""
    if not secret_matches(presented_secret()):
        return error_response(401, "missing or invalid secret (send it in X-Webhook-Secret or as a Bearer token)")
    return None


@bp.get("/rankings")
def rankings() -> Response:
    """Servers by load score (seed 003's formula), lowest first."""
    manager = current_app.extensions["backend_manager"]
    config = current_app.config["GATEWAY"]
    return jsonify(
        success=True,
        data={"weights": config.load_score_weights, "policy": config.routing_policy, "servers": manager.rankings()},
    )


def init_app(app: Flask) -> None:
    """Add the admin routes."""
    app.register_blueprint(bp)
