"""The pull workers' endpoints: lease jobs over a long poll, send heartbeats, complete or fail them.

A pull worker is a GPU host that can only dial out (behind NAT, say). It authenticates with
WORKER_TOKEN as a Bearer token (the webhook secret while that is unset), and each call about
a job it holds carries that job's lease token, a fencing token: once a lease has run out and
moved on, the old holder's calls are refused with 409 and change nothing.
"""

from __future__ import annotations

import base64
import logging
import select
import socket
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from marshmallow import Schema

from gateway.api.auth import admin_authorized, admin_refusal, worker_authorized, worker_refusal
from gateway.api.jobs import JOB_ID, jobs
from gateway.api.schemas import JobAnswerSchema, JobFailureSchema, LeaseSchema, LeaseTokenSchema
from gateway.api.webhook import json_body
from gateway.config import Config
from gateway.errors import error_response
from gateway.jobs.records import CANCELLED, PULL, Job, JobError, JobResult
from gateway.jobs.workers import GONE_AFTER_LEASES, LeaseAsk, TooManyPolls

log = logging.getLogger(__name__)
bp = Blueprint("workers", __name__)
ENVELOPE_VERSION = 1  # seed 004's message envelope
JSON_OVERHEAD = 1024 * 1024  # room beyond the base64 body for the rest of a complete's JSON


def load_worker_body(schema: Schema, limit: int | None = None) -> dict[str, Any] | Response:
    """Check the worker credential, then parse the body: a 401 or 400 reply when either fails."""
    if not worker_authorized():
        return worker_refusal()
    body = json_body() if limit is None else json_body(limit)
    if isinstance(body, Response):
        return body
    return schema.load(body)


def answer_limit() -> int:
    """The largest complete or fail body: a result of PROXY_MAX_BODY_BYTES in base64, and its JSON."""
    max_body: int = current_app.config["GATEWAY"].proxy_max_body_bytes
    return 4 * (max_body // 3 + 1) + JSON_OVERHEAD


def client_gone() -> bool:
    """Whether the worker hung up while its long poll waited: its socket reads as closed."""
    sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except ValueError:  # a TLS socket takes no flags: it cannot tell, so the poll goes on
        return False
    except OSError:
        return True


def envelope(job: Job) -> dict[str, Any]:
    """A leased job in seed 004's envelope: type, version, request_id, task_type, payload; and its lease."""
    request_ = job.request
    return {
        "type": "task",
        "version": ENVELOPE_VERSION,
        "request_id": job.job_id,
        "task_type": job.task_type,
        "model": job.model,
        "job_id": job.job_id,
        "lease_token": job.lease_token,
        "lease_expires_at": job.lease_expires_at,
        "attempt": job.attempts,
        "payload": {
            "method": request_.method,
            "target": request_.target,
            "headers": [list(pair) for pair in request_.headers],
            "body": base64.b64encode(request_.body).decode("ascii"),
        },
    }


def held_reply(job: Job) -> Response:
    """Where a job a worker holds stands now; `cancelled` tells the worker to stop."""
    reply: dict[str, Any] = {"success": True}
    if job.status == CANCELLED:
        reply["message"] = f"job {job.job_id} was cancelled: stop working on it"
    reply |= {
        "job_id": job.job_id,
        "status": job.status,
        "cancelled": job.status == CANCELLED,
        "attempts": job.attempts,
        "lease_expires_at": job.lease_expires_at,
    }
    return jsonify(reply)


def held_call(job_id: str, schema: Schema, call: Callable[[dict[str, Any]], Job], limit: int | None = None) -> Response:
    """The steps of every call about a held job: its id, the credential, the body, then the call."""
    if not JOB_ID.fullmatch(job_id):
        return error_response(404, f"no job {job_id}: a job id is 32 hex digits")
    data = load_worker_body(schema, limit)
    if isinstance(data, Response):
        return data
    try:
        return held_reply(call(data))
    except JobError as exc:  # StaleLease (409): the lease ran out and moved on; JobNotFound (404)
        return error_response(exc.status, str(exc))


@bp.post("/workers/lease")
def lease() -> Response:
    """Lease queued jobs to a pull worker, waiting up to wait_seconds for one to be queued."""
    config: Config = current_app.config["GATEWAY"]
    data = load_worker_body(LeaseSchema(prefixes=config.proxy_prefixes))
    if isinstance(data, Response):
        return data
    ask = LeaseAsk(data["worker_id"], data["routes"], data["models"], data["max_jobs"])
    try:
        leased = jobs().lease(ask, data["wait_seconds"], gone=client_gone)
    except TooManyPolls as exc:
        return error_response(503, f"{exc}; try again", headers={"Retry-After": "1"})
    if not leased:
        return Response(status=204)
    return jsonify(success=True, lease_seconds=config.job_lease_seconds, jobs=[envelope(job) for job in leased])


@bp.post("/jobs/<job_id>/heartbeat")
def heartbeat(job_id: str) -> Response:
    """Extend a leased job's lease by JOB_LEASE_SECONDS; `cancelled: true` once it was cancelled."""
    return held_call(job_id, LeaseTokenSchema(), lambda data: jobs().heartbeat(job_id, data["lease_token"]))


@bp.post("/jobs/<job_id>/complete")
def complete(job_id: str) -> Response:
    """Keep a leased job's answer (status, headers, body in base64) for its client."""

    def keep(data: dict[str, Any]) -> Job:
        result = JobResult(data["status"], tuple(data["headers"]), data["body"])
        return jobs().complete(job_id, data["lease_token"], result)

    schema = JobAnswerSchema(max_body_bytes=current_app.config["GATEWAY"].proxy_max_body_bytes)
    return held_call(job_id, schema, keep, answer_limit())


@bp.post("/jobs/<job_id>/fail")
def fail(job_id: str) -> Response:
    """End a leased job's attempt: queued again with `retry` (until JOB_MAX_ATTEMPTS), else failed."""

    def end(data: dict[str, Any]) -> Job:
        result = None
        if "status" in data:
            result = JobResult(data["status"], tuple(data["headers"]), data["body"])
        return jobs().fail(job_id, data["lease_token"], data["error"], data["retry"], result)

    schema = JobFailureSchema(max_body_bytes=current_app.config["GATEWAY"].proxy_max_body_bytes)
    return held_call(job_id, schema, end, answer_limit())


@bp.get("/admin/workers")
def list_workers() -> Response:
    """Every pull worker: what it serves, when it was last heard from, the jobs it holds, active or gone."""
    if not admin_authorized():
        return admin_refusal()
    return jsonify(success=True, data=worker_list())


def worker_list() -> dict[str, Any]:
    """The pull workers as /admin/workers and the dashboard list them, and how long before a silent one is gone."""
    service = jobs()
    workers = service.workers.describe(service.store.holders(PULL))
    return {"workers": workers, "gone_after_seconds": GONE_AFTER_LEASES * service.lease_seconds}


def init_app(app: Flask) -> None:
    """Add the pull workers' endpoints; after the jobs' init_app, whose JobService they call."""
    app.register_blueprint(bp)
