"""The webhook API GPU servers call: register, unregister, and the server list."""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from marshmallow import Schema

from gateway.api.auth import presented_secret, presented_server_token, secret_matches
from gateway.api.schemas import RegisterSchema, ServerIdSchema
from gateway.errors import error_response
from gateway.fleet.addresses import Listener
from gateway.fleet.records import FleetFull, Registrant, TokenRefused
from gateway.fleet.server import OPTION_NAMES
from gateway.manager import BackendManager, PersistError
from gateway.proxy.body_limit import read_body

MAX_BODY_BYTES = 64 * 1024

bp = Blueprint("webhook", __name__, url_prefix="/webhook")


def manager() -> BackendManager:
    """The app's BackendManager."""
    return current_app.extensions["backend_manager"]


RESULTS = {
    200: "ok",
    400: "invalid",
    401: "bad_secret",
    403: "bad_token",
    404: "unknown",
    413: "invalid",
    503: "not_saved",
    507: "fleet_full",
}


@bp.after_request
def count_result(response: Response) -> Response:
    """Count register and unregister calls by result, whichever path answered them."""
    counters = {"webhook.register": "registrations", "webhook.unregister": "unregistrations"}
    name = counters.get(request.endpoint or "")
    if name is not None:
        counter = getattr(current_app.extensions["metrics"], name)
        counter.labels(RESULTS.get(response.status_code, "error")).inc()
    return response


def json_body(limit: int = MAX_BODY_BYTES) -> dict[str, Any] | Response:
    """The request's JSON object, or a 400 reply saying what is wrong with it."""
    # Webhook bodies are small: 413 for a larger one, chunked too; 408 for one that trickles in.
    read_body(limit, current_app.config["GATEWAY"].client_body_timeout)
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # silent covers ValueError only; json recurses once per level of nesting
        return error_response(400, "the body is nested too deeply to parse as JSON")
    if body is None:
        return error_response(400, "the body must be JSON (Content-Type: application/json)")
    if not isinstance(body, dict):
        return error_response(400, "the body must be a JSON object")
    return body


def listener() -> Listener | None:
    """Where this request reached the gateway: the local end of its connection, else SERVER_PORT."""
    environ = request.environ
    for key in ("gunicorn.socket", "werkzeug.socket"):
        try:
            local = environ[key].getsockname()
        except (KeyError, AttributeError, OSError):
            continue
        if isinstance(local, tuple):  # an AF_UNIX socket names a path: no port to compare
            with contextlib.suppress(ValueError):
                return Listener(local[1], ipaddress.ip_address(local[0]))
            return Listener(local[1])
    # With TRUSTED_PROXY_COUNT, X-Forwarded-Host may have rewritten SERVER_PORT; ProxyFix keeps the first.
    port = environ.get("werkzeug.proxy_fix.orig", {}).get("SERVER_PORT") or environ.get("SERVER_PORT", "")
    return Listener(int(port)) if port.isdigit() else None


def unauthorized() -> Response:
    """The reply to a missing or wrong secret."""
    return error_response(401, "missing or invalid secret")


def load_authorized(schema: Schema) -> dict[str, Any] | Response:
    """Parse the body, check the secret, then validate: the steps every change takes."""
    body = json_body()
    if isinstance(body, Response):
        return body
    if not secret_matches(presented_secret(body)):
        return unauthorized()
    return schema.load(body)


def not_saved(exc: PersistError) -> Response:
    """The reply when a change could not be made durable; the caller should retry."""
    return error_response(503, f"{exc}; try again", headers={"Retry-After": "5"})


def registration_refused(exc: FleetFull | TokenRefused) -> Response:
    """The reply to a new server past MAX_SERVERS (507), or to a bound one without its token (403)."""
    if isinstance(exc, FleetFull):
        return error_response(
            507,
            f"the fleet is full: MAX_SERVERS={exc.limit} servers are registered; unregister one or raise MAX_SERVERS",
        )
    server_id = exc.server_id
    if exc.missing:
        problem = f"server {server_id} is bound to a server token: send it in the X-Server-Token header"
    else:
        problem = f"the server token sent for {server_id} is wrong"
    return error_response(403, f"{problem}. An operator can reset it: POST /admin/servers/{server_id}/reset-token")


def registrant(data: dict[str, Any]) -> Registrant:
    """A server holding the webhook secret, and the server token it sends, under the gateway's rules."""
    config = current_app.config["GATEWAY"]
    binding = config.registration_binding == "token"
    return Registrant(max_servers=config.max_servers, binding=binding, server_token=presented_server_token(data))


@bp.post("/register")
def register() -> Response | tuple[Response, int]:
    """Register a GPU server, or update its address and the routing options it names.

    A new or moved server, or an unhealthy one registering again, is health-checked at once in
    the background (BackendManager.register): the reply does not wait for the check.
    """
    config = current_app.config["GATEWAY"]
    data = load_authorized(RegisterSchema(allowed_networks=config.allowed_backend_networks, listener=listener()))
    if isinstance(data, Response):
        return data
    try:
        server, created, kept, token = manager().register(
            data["server_id"],
            data["ip"],
            data["port"],
            monitor_url=data["monitor_url"],
            options={name: data[name] for name in OPTION_NAMES if name in data},
            registrant=registrant(data),
        )
    except PersistError as exc:
        return not_saved(exc)
    except (FleetFull, TokenRefused) as exc:
        return registration_refused(exc)
    verb = "registered" if created else "updated"
    reply = {
        "success": True,
        "message": f"server {server.server_id} {verb}",
        "server_id": server.server_id,
        "ip": server.ip,
        "port": server.port,
        "url": server.url,
    }
    if server.monitor_url:
        reply["monitor_url"] = server.monitor_url
    reply.update(server.options())
    reply["kept_by_operator"] = kept  # named in this registration, but left as the operator set them
    if token is not None:
        reply["server_token"] = token  # shown this once: the gateway keeps only its hash
    return jsonify(reply), 200


@bp.post("/unregister")
def unregister() -> Response:
    """Remove a GPU server from the fleet."""
    data = load_authorized(ServerIdSchema())
    if isinstance(data, Response):
        return data
    server_id = data["server_id"]
    try:
        removed = manager().unregister_server(server_id, registrant(data))
    except PersistError as exc:
        return not_saved(exc)
    except TokenRefused as exc:
        return registration_refused(exc)
    if not removed:
        return error_response(404, f"server {server_id} is not registered")
    return jsonify(success=True, message=f"server {server_id} unregistered", server_id=server_id)


@bp.get("/servers")
def list_servers() -> Response:
    """The fleet with counts; the secret may also come as `?secret=` for the seed's users."""
    if not secret_matches(presented_secret(allow_query=True)):
        return unauthorized()
    return jsonify(success=True, data=manager().get_status())


def register_webhook_routes(app: Flask) -> None:
    """Add the webhook routes to `app`, as the seed's app.py does."""
    if "webhook" not in app.blueprints:
        app.register_blueprint(bp)
