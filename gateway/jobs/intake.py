"""A proxied request becomes a job: `Prefer: respond-async`, an `Idempotency-Key`, or no server.

The job is the exact request (method, target, the end-to-end headers the proxy would send, the
body). The client is answered 202 with where to find it, or, when it finishes within the wait
it asked for (`Prefer: wait=N`, or a synchronous request with a key), with its answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Response, jsonify

from gateway.cluster.connection import RedisUnavailable
from gateway.errors import error_response, handle_redis_unavailable
from gateway.jobs.records import DEFAULT_PRIORITY, FINISHED, Job, JobError, JobRequest, NewJob
from gateway.jobs.service import JobService, fingerprint
from gateway.proxy.current_request import request

MAX_KEY_LENGTH = 255
MAX_PREFER_WAIT = 60.0  # seconds a `Prefer: wait` may hold a connection (RunPod's /runsync holds 90)
PRIORITY_HEADER = "X-Job-Priority"
CALLBACK_HEADER = "X-Callback-URL"
FOR_THE_GATEWAY = frozenset({"prefer", "idempotency-key", "x-job-priority", "x-callback-url"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"})


@dataclass(frozen=True)
class Ask:
    """What the client asked of the job: to be answered at once, or to wait up to `wait` seconds."""

    respond_async: bool
    wait: float
    idempotency_key: str | None


def wanted(environ: dict[str, object]) -> bool:
    """Whether the request asks to be a job (two lookups: it is on every proxied request's path)."""
    return "HTTP_PREFER" in environ or "HTTP_IDEMPOTENCY_KEY" in environ


def parse_ask(sync_wait: float) -> Ask | Response:
    """The request's Prefer and Idempotency-Key (RFC 7240, the IETF httpapi draft), or a 400."""
    respond_async, wait = False, None
    for preference in request.headers.get("Prefer", "").split(","):
        name, _, value = preference.strip().partition("=")
        name = name.strip().lower()
        if name == "respond-async":
            respond_async = True
        elif name == "wait":
            try:
                wait = float(value.strip().strip('"'))
            except ValueError:
                return error_response(400, f"Prefer: wait={value} is not a number of seconds")
            if not 0 <= wait < float("inf"):
                return error_response(400, f"Prefer: wait={value} must be 0 or more seconds")
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        key = key.strip().strip('"')  # the draft sends it as a structured-field string
        if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
            return error_response(400, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    if respond_async:
        return Ask(True, min(wait or 0.0, MAX_PREFER_WAIT), key)
    return Ask(False, sync_wait, key)


def parse_priority() -> int | Response:
    raw = request.headers.get(PRIORITY_HEADER)
    if raw is None:
        return DEFAULT_PRIORITY
    if not (raw.strip().isdigit() and 0 <= int(raw) <= 9):
        return error_response(400, f"{PRIORITY_HEADER} must be a whole number from 0 (first) to 9 (last)")
    return int(raw)


def submit(
    jobs: JobService, ask: Ask, task_type: str, model: str | None, target: str, headers: dict[str, str], body: bytes
) -> Response:
    """Store the request as a job and answer: 202 and where to look, or its result if it came in time."""
    priority = parse_priority()
    if isinstance(priority, Response):
        return priority
    callback_url = request.headers.get(CALLBACK_HEADER)
    if callback_url is not None:
        try:
            callback_url = jobs.check_callback_url(callback_url.strip())
        except ValueError as exc:
            return error_response(400, str(exc))
    # What the client told the gateway is not the server's business: a backend that knows Prefer
    # would answer 202 itself. The job goes with Idempotency-Key: <job id> instead of the client's.
    kept = tuple((name, value) for name, value in headers.items() if name.lower() not in FOR_THE_GATEWAY)
    job_request = JobRequest(request.method, target, kept, body)
    new = NewJob(
        job_request,
        task_type=task_type,
        model=model,
        priority=priority,
        idempotency_key=ask.idempotency_key,
        fingerprint=fingerprint(job_request),
        callback_url=callback_url,
    )
    try:
        submitted = jobs.submit(new)
    except JobError as exc:
        return error_response(exc.status, str(exc))
    except RedisUnavailable as exc:  # nothing was stored: a 503 the client may send again (not the proxy's 500)
        return handle_redis_unavailable(exc)
    job = submitted.job
    try:
        if ask.wait > 0 and job.status not in FINISHED:
            job = jobs.wait(job.job_id, ask.wait)
        if job.status in FINISHED:
            return result_response(job)
        return accepted(jobs, job, submitted.position if job is submitted.job else None)  # not after a wait
    except JobError as exc:
        return error_response(exc.status, str(exc))
    except RedisUnavailable:  # Redis went while the client waited: the job is stored, so it is a 202 as submitted
        return accepted(jobs, submitted.job, submitted.position)


def accepted(jobs: JobService, job: Job, position: int | None = None) -> Response:
    """202 Accepted: the job is stored; Location says where its state and result will be."""
    estimate = jobs.estimate(job, position)
    body = {
        "success": True,
        "job_id": job.job_id,
        "status": job.status,
        "position": estimate.position,
        "estimated_wait_seconds": estimate.seconds,
        "message": estimate.message,
    }
    response = jsonify(body)
    response.status_code = 202
    response.headers["Location"] = f"/jobs/{job.job_id}"
    response.headers["Retry-After"] = str(retry_after(estimate.seconds))
    return response


def retry_after(seconds: float | None) -> int:
    """When to ask again: the estimate, from 1 to 30 s; 5 s when there is none."""
    return 5 if seconds is None else max(1, min(30, round(seconds)))


def result_response(job: Job) -> Response:
    """The answer the server gave, as it gave it; a job that ended without one, in our error shape."""
    if job.result is None:  # failed before any server answered, cancelled or expired
        status = 410 if job.status in ("cancelled", "expired") else 502
        response = error_response(status, f"job {job.job_id} {job.status}: {job.error or 'no answer'}")
    else:
        headers = [(name, value) for name, value in job.result.headers if name.lower() not in HOP_BY_HOP]
        response = Response(job.result.body, status=job.result.status, headers=headers)
        if job.server_id:
            response.headers["X-Backend-Server"] = job.server_id
    response.headers["X-Job-Id"] = job.job_id
    return response
