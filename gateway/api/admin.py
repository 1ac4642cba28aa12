"""Operator endpoints under /admin/: the fleet, one server's options, draining, priority tiers, the readings.

The credential comes in a header, never in the URL or the body: ADMIN_TOKEN as a Bearer
token, or the webhook secret while ADMIN_TOKEN is unset (see auth.admin_authorized).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify
from marshmallow import ValidationError

from gateway.api.auth import admin_authorized, admin_refusal
from gateway.api.schemas import RegisterSchema, ServerOptionsSchema
from gateway.api.webhook import json_body, listener, not_saved, registration_refused
from gateway.errors import error_response
from gateway.fleet.records import FleetFull, Registrant
from gateway.fleet.server import OPTION_NAMES, BackendServer
from gateway.manager import BackendManager, PersistError

bp = Blueprint("admin", __name__, url_prefix="/admin")


def manager() -> BackendManager:
    """The app's BackendManager."""
    return current_app.extensions["backend_manager"]


@bp.before_request
def require_admin() -> Response | None:
    """Every admin call needs the admin credential."""
    return None if admin_authorized() else admin_refusal()


def unknown_server(server_id: str) -> Response:
    """The 404 reply for a server id that is not registered."""
    return error_response(404, f"server {server_id} is not registered")


def server_reply(server_id: str, message: str | None = None, status: int = 200) -> tuple[Response, int]:
    """`{"success": true, "message": ..., "data": <the server>}`, or 404 if it went meanwhile."""
    row = manager().describe_server(server_id)
    if row is None:
        return unknown_server(server_id), 404
    reply: dict[str, Any] = {"success": True}
    if message:
        reply["message"] = message
    reply["data"] = row
    return jsonify(reply), status


@bp.get("/servers")
def list_servers() -> Response:
    """Every server with its options, load and state."""
    return jsonify(success=True, data={"servers": manager().describe_servers()})


@bp.post("/servers")
def add_server() -> Response | tuple[Response, int]:
    """Register a server (201) or update a registered one (200), with the webhook's body less `secret`."""
    body = json_body()
    if isinstance(body, Response):
        return body
    if "secret" in body:  # the credential travels in the Authorization header only
        raise ValidationError({"secret": ["not accepted here; send the admin credential as a Bearer token."]})
    if "server_token" in body:
        raise ValidationError({"server_token": ["not accepted here: the operator needs no server token."]})
    config = current_app.config["GATEWAY"]
    data = RegisterSchema(allowed_networks=config.allowed_backend_networks, listener=listener()).load(body)
    options = {name: data[name] for name in OPTION_NAMES if name in data}
    try:
        server, created, *_ = manager().register(
            data["server_id"],
            data["ip"],
            data["port"],
            monitor_url=data["monitor_url"],
            options=options,
            registrant=Registrant(operator=True, max_servers=config.max_servers),
        )
    except PersistError as exc:
        return not_saved(exc)
    except FleetFull as exc:
        return registration_refused(exc)
    verb = "registered" if created else "updated"
    response, status = server_reply(server.server_id, f"server {server.server_id} {verb}", 201 if created else 200)
    if status == 201:
        response.headers["Location"] = f"/admin/servers/{server.server_id}"
    return response, status


@bp.get("/servers/<server_id>")
def get_server(server_id: str) -> tuple[Response, int]:
    """One server with its options, load and state."""
    return server_reply(server_id)


@bp.route("/servers/<server_id>", methods=["PATCH", "PUT"])
def update_server(server_id: str) -> Response | tuple[Response, int]:
    """Change some of a server's options; PUT is the same, as seed 001 names it."""
    body = json_body()
    if isinstance(body, Response):
        return body
    changes = ServerOptionsSchema().load(body)
    if not changes:
        return error_response(400, f"nothing to change: give one or more of {', '.join(OPTION_NAMES)}")
    message = f"server {server_id} updated: {', '.join(changes)}"
    return server_changed(server_id, lambda: manager().update_server(server_id, changes), message)


@bp.delete("/servers/<server_id>")
def delete_server(server_id: str) -> Response:
    """Unregister a server."""
    try:
        removed = manager().unregister_server(server_id)
    except PersistError as exc:
        return not_saved(exc)
    if not removed:
        return unknown_server(server_id)
    return jsonify(success=True, message=f"server {server_id} unregistered", server_id=server_id)


@bp.post("/servers/<server_id>/reset-token")
def reset_token(server_id: str) -> Response | tuple[Response, int]:
    """Unbind a server from its token (REGISTRATION_BINDING=token): its next registration binds a new one."""
    message = f"server {server_id}'s token is reset: its next registration binds a new one"
    return server_changed(server_id, lambda: manager().reset_server_token(server_id), message)


@bp.post("/servers/<server_id>/drain")
def drain_server(server_id: str) -> Response | tuple[Response, int]:
    """Send a server no new work; requests for its existing tasks still reach it."""
    return change_draining(server_id, True)


@bp.post("/servers/<server_id>/enable")
def enable_server(server_id: str) -> Response | tuple[Response, int]:
    """Let a drained server take new work again."""
    return change_draining(server_id, False)


def change_draining(server_id: str, draining: bool) -> Response | tuple[Response, int]:
    """Drain or enable a server; doing it twice is the same as doing it once."""
    message = f"server {server_id} {'draining' if draining else 'enabled'}"
    return server_changed(server_id, lambda: manager().set_draining(server_id, draining), message)


def server_changed(
    server_id: str, change: Callable[[], BackendServer | None], message: str
) -> Response | tuple[Response, int]:
    """Make a change to one server: 503 if it cannot be saved, 404 if the server is unknown, else its row."""
    try:
        server = change()
    except PersistError as exc:
        return not_saved(exc)
    if server is None:
        return unknown_server(server_id)
    return server_reply(server_id, message)


@bp.get("/server-priority/check/<path:model>")
def priority_check(model: str) -> Response:
    """Which tier and which servers would serve `model` now, and why the others would not."""
    return jsonify(success=True, data=manager().priority_check(model))


@bp.get("/server-priority/overview")
def priority_overview() -> Response:
    """The priority tiers: their servers, how many can take work, and the models they serve."""
    return jsonify(success=True, data=manager().priority_overview())


@bp.get("/rankings")
def rankings() -> Response:
    """Servers by load score (seed 003's formula), lowest first."""
    config = current_app.config["GATEWAY"]
    return jsonify(
        success=True,
        data={"weights": config.load_score_weights, "policy": config.routing_policy, "servers": manager().rankings()},
    )


@bp.get("/resource-cache/stats")
def resource_cache_stats() -> Response:
    """The monitors' readings routing holds: each one's age, fresh or stale, and how many decisions read it."""
    return jsonify(success=True, data=manager().resource_cache())


@bp.post("/resource-cache/clear")
def resource_cache_clear() -> tuple[Response, int]:
    """Drop every reading and read every monitor again now, in the background (202)."""
    cleared, asked = manager().clear_resource_cache()
    message = f"{cleared} readings dropped; reading {len(asked)} monitors again now"
    return jsonify(success=True, message=message, data={"cleared": cleared, "reading": asked}), 202


def init_app(app: Flask) -> None:
    """Add the admin routes."""
    app.register_blueprint(bp)
