"""What a job is: the request it keeps, its state, and the answer it got."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "expired",
)
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED)
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
PUSH, PULL = "push", "pull"  # pushed by the gateway to a registered server; pulled by a worker
DEFAULT_PRIORITY = 5  # X-Job-Priority: 0 runs first, 9 last


def new_job_id() -> str:
    """128 random bits, URL-safe: nobody can guess another client's job."""
    return secrets.token_hex(16)


def new_lease_token() -> str:
    """A fencing token: a worker's later calls prove that the lease is still its own."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class JobRequest:
    """The exact HTTP request a job replays: method, target, end-to-end headers and body."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class JobResult:
    """The answer a server gave, as it gave it."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class NewJob:
    """A job to submit: its request, what routes it, and how it is tied to a client's retries."""

    request: JobRequest
    task_type: str  # the route prefix or the model: what a pull worker asks for
    model: str | None = None
    priority: int = DEFAULT_PRIORITY
    idempotency_key: str | None = None
    fingerprint: str = ""  # method, target and a hash of the body: what one key must keep naming
    callback_url: str | None = None
    job_id: str = field(default_factory=new_job_id)


@dataclass(frozen=True)
class Job:
    """A job as stored: its state, the request, and (once done) the result."""

    job_id: str
    status: str
    priority: int
    seq: int
    task_type: str
    model: str | None
    request: JobRequest
    attempts: int
    server_id: str | None
    dispatch: str | None
    lease_token: str | None
    lease_expires_at: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    callback_url: str | None
    result: JobResult | None
    callback_state: str | None = None  # pending, delivered or failed, once the job has finished

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def public(self) -> dict[str, object]:
        """What `GET /jobs/<id>` tells (never the lease token, the request or the result)."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "priority": self.priority,
            "task_type": self.task_type,
            "attempts": self.attempts,
            "server_id": self.server_id,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
        }


class JobError(Exception):
    """A job operation refused; `status` is the HTTP status that says why."""

    status = 400


class JobNotFound(JobError):
    status = 404


class IdempotencyConflict(JobError):
    """The key was used before for a different request (IETF httpapi-idempotency-key: 422)."""

    status = 422


class StaleLease(JobError):
    """The lease token is not the job's current one: the lease expired and moved on, or never was."""

    status = 409


class StoreFull(JobError):
    """The store is at JOB_STORE_MAX_BYTES: nothing more is taken until jobs finish or expire."""

    status = 507
