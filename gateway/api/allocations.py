"""/allocations: long-lived keys pinned to servers with room (docs/allocations.md).

An allocation moves sessions between servers, so it takes the operator's credential, as /admin
does (ADMIN_TOKEN as a Bearer token; the webhook secret only while ADMIN_TOKEN is unset): every
GPU server holds the webhook secret, and one must not be able to pull every key to itself.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from gateway.allocations.announce import Announcer
from gateway.allocations.failover import FailoverWatcher
from gateway.allocations.records import MOVE_TYPES, AllocationError
from gateway.allocations.redis_store import RedisAllocationStore
from gateway.allocations.service import AllocationService, Placement
from gateway.allocations.store import AllocationStore, SQLiteAllocationStore
from gateway.api.allocation_schemas import (
    AllocateSchema,
    HistoryQuerySchema,
    ListQuerySchema,
    MoveRequestSchema,
    RebalanceRequestSchema,
)
from gateway.api.auth import admin_authorized, admin_refusal
from gateway.api.webhook import json_body
from gateway.config import Config
from gateway.errors import error_response
from gateway.manager import BackendManager
from gateway.observability.allocation_metrics import AllocationMetrics

bp = Blueprint("allocations", __name__, url_prefix="/allocations")
RETRY_AFTER = "5"  # seconds: servers come back, register, or keys are released


def service() -> AllocationService:
    """The app's AllocationService."""
    return current_app.extensions["allocations"]


@bp.before_request
def require_admin() -> Response | None:
    """Every allocation call needs the admin credential."""
    return None if admin_authorized() else admin_refusal()


@bp.errorhandler(AllocationError)
def refused(exc: AllocationError) -> Response:
    """A refusal in the one error shape: 400 naming the field, 404, 409, 502, or 503 with Retry-After."""
    errors = {exc.field: [exc.message]} if exc.field else None
    return error_response(exc.status, exc.message, errors, {"Retry-After": RETRY_AFTER} if exc.status == 503 else None)


def placed(placement: Placement, message: str, status: int = 200) -> tuple[Response, int]:
    """An allocation with its server's score and why it is there."""
    data = {**placement.allocation.to_dict(), "load_score": placement.load_score, "reason": placement.reason}
    return jsonify(success=True, message=message, changed=placement.changed, data=data), status


def body_or_reply() -> dict[str, Any] | Response:
    """The JSON object sent; no body at all counts as `{}` (the rebalance's defaults)."""
    if not request.content_length and "Transfer-Encoding" not in request.headers:
        return {}
    return json_body()


@bp.post("")
def allocate() -> Response | tuple[Response, int]:
    """Pin a key to a server (201); the same key again stays where it is (200)."""
    body = json_body()
    if isinstance(body, Response):
        return body
    data = AllocateSchema().load(body)
    placement = service().allocate(data["key"], data["strategy"], data.get("group"), data.get("location"))
    allocation = placement.allocation
    if not placement.changed:
        return placed(placement, f"key {allocation.key} is allocated to {allocation.server_id} already")
    response, status = placed(placement, f"key {allocation.key} allocated to {allocation.server_id}", 201)
    response.headers["Location"] = f"/allocations/{allocation.key}"
    return response, status


@bp.get("")
def list_allocations() -> Response:
    """The allocations, of one server (`?server_id=`) or all, at most `?limit=` (1000); each server's count."""
    query = ListQuerySchema().load(request.args.to_dict())
    store = service().store
    server_id = query.get("server_id")
    allocations = store.allocations(server_id, query["limit"])
    data = {
        "allocations": [allocation.to_dict() for allocation in allocations],
        "total": store.total(server_id),
        "counts": store.counts(),
        "scores": service().rankings(),
    }
    return jsonify(success=True, data=data)


@bp.get("/history")
def history() -> Response:
    """A key's moves, oldest first: initial, rebalance, manual and failover, with scores and reasons."""
    query = HistoryQuerySchema().load(request.args.to_dict())
    entries = service().store.history(query["key"], query["limit"])
    return jsonify(success=True, data={"key": query["key"], "history": [entry.to_dict() for entry in entries]})


@bp.post("/rebalance")
def rebalance() -> Response:
    """Move keys from the most to the least loaded server while their gap exceeds the threshold."""
    body = body_or_reply()
    if isinstance(body, Response):
        return body
    data = RebalanceRequestSchema().load(body)
    result = service().rebalance(data["threshold"], data["max_migrations"], data["dry_run"])
    verb = "would move" if result["dry_run"] else "moved"
    count = len(result["moves"]) if result["dry_run"] else result["moved"]
    return jsonify(success=True, message=f"rebalance {verb} {count} keys", data=result)


@bp.get("/<key>")
def get_allocation(key: str) -> Response:
    """Where a key is pinned."""
    return jsonify(success=True, data=service().get(key).to_dict())


@bp.delete("/<key>")
def release_allocation(key: str) -> Response:
    """Release a key: its server's room is free again; its history stays a week."""
    released = service().release(key)
    return jsonify(success=True, message=f"key {key} released from {released.server_id}", data=released.to_dict())


@bp.post("/<key>/move")
def move_allocation(key: str) -> Response | tuple[Response, int]:
    """Move a key to a given server that is up and has room (history: manual)."""
    body = json_body()
    if isinstance(body, Response):
        return body
    server_id = MoveRequestSchema().load(body)["server_id"]
    placement = service().move(key, server_id)
    verb = "moved to" if placement.changed else "is on"
    return placed(placement, f"key {key} {verb} {placement.allocation.server_id}")


def leads(manager: BackendManager) -> bool:
    """Whether this process runs the failovers: always when embedded; the sweep's leader in Redis mode."""
    leader = manager.health_job.leader
    return leader is None or leader.is_leader


def init_app(app: Flask) -> None:
    """Open the allocation store, watch the fleet for failovers, and route X-Allocation-Key in the proxy."""
    config: Config = app.config["GATEWAY"]
    manager: BackendManager = app.extensions["backend_manager"]
    shared = app.extensions.get("redis")
    store: AllocationStore = (
        RedisAllocationStore(shared) if shared is not None else SQLiteAllocationStore(config.allocation_store_file)
    )
    announcer = (
        Announcer(config.allocation_migrate_url, config.job_callback_secret, config.allocation_migrate_timeout)
        if config.allocation_migrate_url
        else None
    )
    metrics = AllocationMetrics(
        app.extensions["metrics"].registry,
        store.counts,
        lambda: [server.server_id for server in manager.list_servers()],  # copied under the fleet's lock
        MOVE_TYPES,
    )
    allocations = AllocationService(store, manager, announcer, config.allocation_failover_seconds, metrics)
    watcher = FailoverWatcher(allocations, config.allocation_failover_seconds, lambda: leads(manager))
    manager.observers.append(watcher)
    app.extensions["allocations"] = allocations
    app.extensions["allocation_failover"] = watcher
    app.extensions["proxy"].pinned.allocations = allocations  # X-Allocation-Key routes to the key's server
    app.register_blueprint(bp)
