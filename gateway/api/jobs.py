"""The jobs' endpoints: a job's state, its result, its cancel; and the operator's list and retry.

A job id is 128 random bits: it is the capability to read and cancel that one job, as a
pre-signed URL is, so `/jobs/<id>` needs no other credential. The list of every job, and
re-queueing one, are the operator's, under /admin/.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from gateway.api.auth import admin_authorized, admin_refusal
from gateway.api.llm_request import parse_body
from gateway.cluster.connection import Redis, RedisUnavailable
from gateway.config import Config
from gateway.errors import error_response
from gateway.jobs import intake
from gateway.jobs.callbacks import CallbackSender
from gateway.jobs.interface import JobStore
from gateway.jobs.records import PULL, STATUSES, SUCCEEDED, Job, JobError, JobRequest
from gateway.jobs.redis_store import RedisJobStore
from gateway.jobs.service import JobService
from gateway.jobs.store import SQLiteJobStore
from gateway.jobs.wakes import JobWakes
from gateway.observability.job_metrics import JobMetrics
from gateway.proxy.forwarding import decoded, find_task_id
from gateway.proxy.handler import Proxy
from gateway.routing.affinity import TaskAffinity

log = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__)
JOB_ID = re.compile(r"[0-9a-f]{32}")
MAX_LISTED = 1000


def jobs() -> JobService:
    """The app's JobService."""
    return current_app.extensions["jobs"]


def job_reply(job: Job) -> dict[str, object]:
    """A job as `GET /jobs/<id>` tells it: its state, and where it stands while it waits."""
    estimate = jobs().estimate(job)
    state = job.public()
    return {
        "success": True,
        "job_id": state.pop("job_id"),
        "status": state.pop("status"),
        "position": estimate.position,
        "estimated_wait_seconds": estimate.seconds,
        "message": estimate.message,
        **state,
    }


def job_response(job: Job, status: int = 200) -> Response:
    """The job's state; with `Retry-After` (from its estimated wait) while it has not finished."""
    reply = job_reply(job)
    response = jsonify(reply)
    response.status_code = status
    if not job.finished:
        wait = reply["estimated_wait_seconds"]
        response.headers["Retry-After"] = str(intake.retry_after(wait if isinstance(wait, int | float) else None))
    return response


def find(job_id: str) -> Job | Response:
    """The job, or a 404 that says there is none (an id that is not one of ours, too)."""
    if not JOB_ID.fullmatch(job_id):
        return error_response(404, f"no job {job_id}: a job id is 32 hex digits")
    try:
        return jobs().store.get(job_id)
    except JobError as exc:
        return error_response(exc.status, str(exc))


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    """A job's state, place in the queue and estimated wait."""
    job = find(job_id)
    if isinstance(job, Response):
        return job
    return job_response(job)


@bp.get("/jobs/<job_id>/result")
def get_result(job_id: str) -> Response:
    """The server's answer as it gave it (status, headers, body); 202 and the job until it is done."""
    job = find(job_id)
    if isinstance(job, Response):
        return job
    if job.finished:
        return intake.result_response(job)
    return job_response(job, 202)


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str) -> Response:
    """Cancel a job: a queued one never runs, a running one has its request closed."""
    job = find(job_id)
    if isinstance(job, Response):
        return job
    if job.finished:
        return error_response(409, f"job {job_id} is {job.status} already: there is nothing to cancel")
    return jsonify(job_reply(jobs().cancel(job_id)))


@bp.get("/admin/jobs")
def list_jobs() -> Response:
    """The newest jobs, of one status (`?status=`) or all, at most `?limit=` (100)."""
    refused = None if admin_authorized() else admin_refusal()
    if refused is not None:
        return refused
    status = request.args.get("status") or None
    if status is not None and status not in STATUSES:
        return error_response(400, f"status must be one of {', '.join(STATUSES)}")
    limit = request.args.get("limit", "100")
    if not (limit.isdigit() and 1 <= int(limit) <= MAX_LISTED):
        return error_response(400, f"limit must be a whole number from 1 to {MAX_LISTED}")
    listed = jobs().store.recent(status, int(limit))
    counts = jobs().store.counts()
    return jsonify(
        success=True,
        data={
            "jobs": [job.public() for job in listed],
            "counts": counts.by_status,
            "queued_by_priority": {str(p): n for p, n in sorted(counts.queued_by_priority.items())},
            "oldest_queued_at": counts.oldest_queued_at,
        },
    )


@bp.post("/admin/jobs/<job_id>/retry")
def retry_job(job_id: str) -> Response:
    """Queue a failed, expired or cancelled job again, with its attempts reset."""
    refused = None if admin_authorized() else admin_refusal()
    if refused is not None:
        return refused
    job = find(job_id)
    if isinstance(job, Response):
        return job
    try:
        again = jobs().retry(job_id)
    except JobError as exc:
        return error_response(exc.status, str(exc))
    log.info("job %s queued again by the operator", job_id)
    return jsonify(job_reply(again))


def remember_task(affinity: TaskAffinity, job: Job) -> None:
    """A finished job whose answer names a task_id records task affinity, as a synchronous answer does."""
    if job.status != SUCCEEDED or job.result is None or job.server_id is None:
        return
    if job.dispatch == PULL:  # a pull worker cannot be sent the task's later requests: nothing to own
        return
    encoding = next((value for name, value in job.result.headers if name.lower() == "content-encoding"), "")
    task_id = find_task_id(decoded(job.result.body[: 64 * 1024], encoding))
    if task_id is None:
        return
    try:
        affinity.record(task_id, job.server_id)
    except (sqlite3.Error, RedisUnavailable) as exc:
        log.error("could not record the owner of task %s (%s): %s", task_id, job.server_id, exc)


def renamed_body(job_request: JobRequest, model: str) -> bytes:
    """An LLM job's body with its model renamed to the server's own name, as a synchronous request's is."""
    content_type = next((value for name, value in job_request.headers if name.lower() == "content-type"), "")
    path = job_request.target.split("?", 1)[0]
    return parse_body(job_request.body, path, content_type).renamed(model)


def open_store(config: Config, shared: Redis | None) -> JobStore:
    """The jobs in Redis when the gateway has one (REDIS_URL), shared by every process; else in JOB_STORE_FILE."""
    if shared is not None:
        return RedisJobStore(
            shared,
            max_bytes=config.job_store_max_bytes,
            idempotency_ttl=config.idempotency_ttl,
            result_ttl=config.job_result_ttl,
            queue_ttl=config.job_queue_ttl,
        )
    return SQLiteJobStore(
        Path(config.job_store_file),
        max_bytes=config.job_store_max_bytes,
        idempotency_ttl=config.idempotency_ttl,
        result_ttl=config.job_result_ttl,
        queue_ttl=config.job_queue_ttl,
    )


def init_app(app: Flask) -> None:
    """Open the job store, start dispatching, and let the proxy turn requests into jobs."""
    config: Config = app.config["GATEWAY"]
    proxy: Proxy = app.extensions["proxy"]
    affinity: TaskAffinity = app.extensions["task_affinity"]
    shared: Redis | None = app.extensions.get("redis")
    store = open_store(config, shared)
    service = JobService(
        store,
        app.extensions["backend_manager"],
        proxy.pool,
        lease_seconds=config.job_lease_seconds,
        max_attempts=config.job_max_attempts,
        max_result_bytes=config.proxy_max_body_bytes,
        on_finished=lambda job: remember_task(affinity, job),
        metrics=JobMetrics(app.extensions["metrics"].registry, store.counts),
        rename=renamed_body,
        callbacks=CallbackSender(
            store,
            config.job_callback_secret,
            config.allowed_backend_networks,
            config.job_callback_attempts,
            config.job_callback_backoff,
        )
        if config.job_callback_secret
        else None,
        max_long_polls=config.worker_max_long_polls,
        wakes=None if shared is None else JobWakes(shared),
    )
    app.extensions["jobs"] = service
    proxy.jobs = service
    app.extensions["backend_manager"].change_listeners.append(service.wake)
    app.register_blueprint(bp)
    service.start()
