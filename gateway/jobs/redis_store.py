"""The job store on Redis: every gateway process and host shares one queue, each change one Lua script.

The layout (gateway/jobs/redis_preamble.py lists the keys) is one hash per job and sorted sets
as indexes: the queue by (priority, seq), each task type's and model's queue, running jobs by
lease expiry, finished ones by when. A claim takes the given job, or the first that matches,
in the same script that reads it, so two processes never take one job; a lease that runs out
is moved back by a script that checks it is still that lease. A call returns once Redis has
answered, so an acknowledged job is stored as durably as Redis's appendfsync keeps it. A job's
hash is read back as a Job in redis_hashes.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis

from gateway.cluster.connection import Redis
from gateway.jobs.interface import CALLBACK_BACKOFF_CAP, ROW_OVERHEAD, QueueCounts, Submitted
from gateway.jobs.records import (
    FAILED,
    QUEUED,
    STATUSES,
    SUCCEEDED,
    IdempotencyConflict,
    Job,
    JobError,
    JobNotFound,
    JobResult,
    NewJob,
    StaleLease,
    StoreFull,
    new_lease_token,
)
from gateway.jobs.redis_hashes import job_from_fields, job_from_hash
from gateway.jobs.redis_preamble import PREAMBLE
from gateway.jobs.redis_reads import READS
from gateway.jobs.redis_scripts import CHANGES

REFUSALS: dict[str, type[JobError]] = {
    "NOTFOUND": JobNotFound,
    "STALE": StaleLease,
    "CONFLICT": IdempotencyConflict,
    "FULL": StoreFull,
}
BATCH = 500  # jobs one sweep script moves at most: Redis runs nothing else meanwhile
CALLBACK_BATCH = 10  # callbacks one process takes at a time (each may take the sender 10 s)
CALLBACK_HOLD = 120.0  # seconds a taken callback is another process's to try only after


class RedisJobStore:
    """Jobs in Redis, shared by every process that uses the same Redis and REDIS_PREFIX."""

    def __init__(
        self,
        shared: Redis,
        max_bytes: int = 1 << 30,
        idempotency_ttl: float = 86400.0,
        result_ttl: float = 86400.0,
        queue_ttl: float = 86400.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.redis = shared
        self.prefix = shared.key("jobs:")
        self.max_bytes = max_bytes
        self.idempotency_ttl = idempotency_ttl
        self.result_ttl = result_ttl
        self.queue_ttl = queue_ttl
        # Without a clock, every time is Redis's own (one clock for every host's leases and TTLs);
        # `clock` is then only what readers compare those times with.
        self._fixed_clock = clock is not None
        self.clock: Callable[[], float] = clock or time.time
        client = shared.client
        scripts = {**CHANGES, **READS}
        self._scripts = {name: client.register_script(PREAMBLE + body) for name, body in scripts.items()}

    def _run(self, what: str, name: str, *args: Any) -> Any:
        """Run one script; its refusal as the JobError it names, RedisUnavailable if Redis is away."""
        now = repr(self.clock()) if self._fixed_clock else ""
        try:
            return self.redis.call(what, self._scripts[name], keys=[], args=[self.prefix, now, *args])
        except redis.ResponseError as exc:
            code, _, message = str(exc).partition(" ")
            refusal = REFUSALS.get(code)
            if refusal is None:
                raise
            raise refusal(message) from None

    # -- submitting ------------------------------------------------------------------------

    def submit(self, job: NewJob) -> Submitted:
        """Store `job`, or, for a key seen before with the same request, answer with its job.

        Raises IdempotencyConflict for a key seen with another request, StoreFull over the budget.
        """
        if not 0 <= job.priority <= 9:
            raise ValueError(f"a job's priority is 0 to 9, not {job.priority}")
        request = job.request
        headers = json.dumps(request.headers)
        size = ROW_OVERHEAD + len(request.body) + len(headers) + len(request.target)
        key = job.idempotency_key
        reply = self._run(
            "submit a job",
            "submit",
            job.job_id, job.priority, job.task_type, *_optional(job.model), request.method, request.target,
            headers, request.body, *_optional(job.callback_url), size, self.max_bytes, *_optional(key),
            job.fingerprint, self.idempotency_ttl,
        )  # fmt: skip
        if reply[0] == 0:  # the key's job, as it stands
            return Submitted(job_from_hash(reply[2]), False, reply[1])
        _, seq, created_at, place = reply
        stored = Job(
            job_id=job.job_id,
            status=QUEUED,
            priority=job.priority,
            seq=int(seq),
            task_type=job.task_type,
            model=job.model,
            request=request,
            attempts=0,
            server_id=None,
            dispatch=None,
            lease_token=None,
            lease_expires_at=None,
            created_at=float(created_at),
            started_at=None,
            finished_at=None,
            error=None,
            callback_url=job.callback_url,
            result=None,
        )  # what the script stored: built here, so that the body does not travel back
        return Submitted(stored, True, int(place))

    # -- reading ---------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The job; JobNotFound if there is none (or it was purged)."""
        fields: dict[bytes, bytes] = self.redis.call(
            "read a job",
            self.redis.client.hgetall,  # type: ignore[arg-type]  # redis-py's stubs say str | bytes; without decode_responses, bytes
            self.prefix + "job:" + job_id,
        )
        if not fields:
            raise JobNotFound(f"no job {job_id}")
        return job_from_fields(fields)

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, and so on; None once it is no longer queued."""
        if job.status != QUEUED:
            return None
        score = job.priority * (1 << 48) + job.seq
        ahead = self.redis.call("count the queue", self.redis.client.zcount, self.prefix + "queue", "-inf", f"({score}")
        return int(ahead) + 1

    def recent(self, status: str | None = None, limit: int = 100) -> list[Job]:
        """The newest jobs first, of one status or all."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown job status {status!r}: one of {', '.join(STATUSES)}")
        return [job_from_hash(flat) for flat in self._run("list jobs", "recent", status or "", limit)]

    def counts(self) -> QueueCounts:
        """Jobs per status, queued jobs per priority, the oldest queued job's time."""
        reply = self._run("count jobs", "counts", *STATUSES)
        by_status = {status: int(count) for status, count in zip(STATUSES, reply, strict=False)}
        per_priority = reply[len(STATUSES) : len(STATUSES) + 10]
        queued = {priority: int(count) for priority, count in enumerate(per_priority) if int(count)}
        oldest, stored = reply[-2], reply[-1]
        return QueueCounts(by_status, queued, None if oldest is None else float(oldest), int(stored))

    # -- running ---------------------------------------------------------------------------

    def claim(
        self,
        holder: str,
        dispatch: str,
        lease_seconds: float,
        task_types: Sequence[str] | None = None,
        skip: Iterable[str] = (),
    ) -> Job | None:
        """Take the next queued job (by priority, then age) for `holder`, with a new lease token."""
        claimed = self.claim_many(holder, dispatch, lease_seconds, 1, task_types, skip=skip)
        return claimed[0] if claimed else None

    def claim_many(
        self,
        holder: str,
        dispatch: str,
        lease_seconds: float,
        limit: int,
        task_types: Sequence[str] | None = None,
        models: Sequence[str] = (),
        skip: Iterable[str] = (),
        max_bytes: int | None = None,
    ) -> list[Job]:
        """Take up to `limit` queued jobs in order, each with a lease token of its own (see SQLiteJobStore)."""
        types, skipped = tuple(task_types or ()), tuple(skip)
        tokens = [new_lease_token() for _ in range(limit)]
        reply = self._run(
            "claim jobs",
            "claim_many",
            holder, dispatch, lease_seconds, limit, "" if max_bytes is None else max_bytes,
            len(types), *types, len(models), *models, len(skipped), *skipped, *tokens,
        )  # fmt: skip
        return [job_from_hash(flat) for flat in reply]

    def claim_job(self, job_id: str, holder: str, dispatch: str, lease_seconds: float) -> Job | None:
        """Take one given job if it is still queued (None if another took it, or it was cancelled)."""
        return self.claim_jobs([(job_id, holder)], dispatch, lease_seconds)[0]

    def claim_jobs(self, wanted: Sequence[tuple[str, str]], dispatch: str, lease_seconds: float) -> list[Job | None]:
        """Take each given job (id, holder) that is still queued, in one script; None for each that is not."""
        triples = [(job_id, holder, new_lease_token()) for job_id, holder in wanted]
        reply = self._run("claim jobs", "claim_jobs", dispatch, lease_seconds, *(part for t in triples for part in t))
        return [None if flat is None else job_from_hash(flat) for flat in reply]

    def holders(self, dispatch: str) -> dict[str, list[str]]:
        """The running jobs of one dispatch kind, by the holder that runs them (ids only)."""
        flat = self._run("list the holders", "holders", dispatch)
        rows = sorted(
            (float(flat[i + 2] or 0), int(flat[i + 3] or 0), flat[i].decode(), flat[i + 1].decode())
            for i in range(0, len(flat), 4)
        )
        held: dict[str, list[str]] = {}
        for _, _, holder, job_id in rows:
            held.setdefault(holder, []).append(job_id)
        return held

    def queue_heads(self, limit: int = 200) -> list[tuple[str, str | None, str]]:
        """The next `limit` queued jobs' ids, models and headers (JSON), in order: what routing needs."""
        flat = self._run("read the queue", "queue_heads", limit)
        return [
            (flat[i].decode(), None if flat[i + 1] is None else flat[i + 1].decode(), flat[i + 2].decode())
            for i in range(0, len(flat), 3)
        ]

    def heartbeat(self, job_id: str, token: str, lease_seconds: float) -> Job:
        """Extend a running job's lease; StaleLease if `token` is not its current lease."""
        return job_from_hash(self._run("extend a lease", "heartbeat", job_id, token, lease_seconds))

    def succeed(self, job_id: str, token: str, result: JobResult) -> Job:
        """Keep a running job's answer; StaleLease unless `token` is its current lease."""
        return self._finish(job_id, token, SUCCEEDED, None, result)

    def fail(
        self, job_id: str, token: str, error: str, retry: bool, max_attempts: int, result: JobResult | None = None
    ) -> Job:
        """End a running job's attempt: re-queued when `retry` and attempts are left, else failed."""
        if retry:
            job = self._requeue(job_id, token, error, max_attempts, True, result)
            assert job is not None  # only an expiry's requeue may find nothing to move
            return job
        return self._finish(job_id, token, FAILED, error, result)

    def release(self, job_id: str, token: str, error: str) -> Job:
        """Put a running job back in the queue, its attempt not counted: nothing reached a server."""
        job = self._requeue(job_id, token, error, 0, False)
        assert job is not None
        return job

    def _finish(self, job_id: str, token: str, status: str, error: str | None, result: JobResult | None) -> Job:
        return job_from_hash(
            self._run("end a job", "finish", job_id, token, status, *_optional(error), *_result(result))
        )

    def _requeue(
        self,
        job_id: str,
        token: str,
        error: str,
        max_attempts: int,
        counted: bool,
        result: JobResult | None = None,
        expiring: bool = False,
    ) -> Job | None:
        reply = self._run(
            "queue a job again",
            "requeue",
            job_id, token, error, max_attempts, int(counted), *_result(result), int(expiring),
        )  # fmt: skip
        return None if reply is None else job_from_hash(reply)

    def cancel(self, job_id: str) -> tuple[Job, Job]:
        """Cancel a job that has not finished; (before, after), so that a caller can stop its run."""
        before, after = self._run("cancel a job", "cancel", job_id)
        return job_from_hash(before), job_from_hash(after)

    def retry(self, job_id: str) -> Job:
        """Queue a failed (or expired, or cancelled) job again, with its attempts reset."""
        return job_from_hash(self._run("retry a job", "retry", job_id))

    # -- callbacks -------------------------------------------------------------------------

    def callbacks_due(self, limit: int = 50) -> list[Job]:
        """Finished jobs whose callback is due now, each taken for CALLBACK_HOLD s.

        Several processes each send callbacks: one they took is not due to the others until
        the hold is over, so a callback is sent twice only when a sender died (or stalled) with it.
        """
        reply = self._run("take due callbacks", "callbacks_due", min(limit, CALLBACK_BATCH), CALLBACK_HOLD)
        return [job_from_hash(flat) for flat in reply]

    def callback_tried(self, job_id: str, error: str | None, backoff: float, max_attempts: int) -> tuple[str, float]:
        """Record one delivery: delivered (no error), due again after a backoff, or failed for good."""
        state, wait = self._run(
            "record a callback",
            "callback_tried",
            job_id, *_optional(error), backoff, max_attempts, CALLBACK_BACKOFF_CAP,
        )  # fmt: skip
        return state.decode(), float(wait)

    # -- sweeps ----------------------------------------------------------------------------

    def expire_leases(self, max_attempts: int) -> list[Job]:
        """Re-queue (or fail, out of attempts) every running job whose lease ran out; the jobs moved.

        Every process sweeps: each lease is moved by a script that checks it is still the lease
        seen expired (its token, its expiry past), so a job is moved, and its attempt counted, once.
        """
        moved: list[Job] = []
        while True:
            flat = self._run("find expired leases", "expired_leases", BATCH)
            for i in range(0, len(flat), 2):
                job_id, token = flat[i].decode(), flat[i + 1].decode()
                job = self._requeue(job_id, token, "its lease expired", max_attempts, True, expiring=True)
                if job is not None:
                    moved.append(job)
            if len(flat) < 2 * BATCH:
                return moved

    def recover(self) -> int:
        """Nothing, and 0: in Redis, running jobs may be another live process's.

        A process that starts cannot tell a dead process's jobs from a live one's, so it takes
        none: a job whose process died keeps its lease until it runs out (JOB_LEASE_SECONDS, as
        the dispatcher renews its pushed jobs' leases while it runs them), and then any process's
        sweep queues it again, its attempt counted.
        """
        return 0

    def purge(self) -> tuple[int, int]:
        """Expire queued jobs past JOB_QUEUE_TTL and delete finished ones past JOB_RESULT_TTL.

        Idempotency keys need no sweep: Redis drops each at the end of its TTL.
        """
        expired = deleted = 0
        while True:
            more_expired, more_deleted = self._run("purge old jobs", "purge", self.queue_ttl, self.result_ttl, BATCH)
            expired, deleted = expired + more_expired, deleted + more_deleted
            if more_expired < BATCH and more_deleted < BATCH:
                return expired, deleted

    def close(self) -> None:
        """Nothing to close: the connection is the app's (`app.extensions["redis"]`)."""


def _optional(value: str | None) -> tuple[int, str]:
    """A value that may be NULL, as a script takes it: a flag, then the value."""
    return (0, "") if value is None else (1, value)


def _result(result: JobResult | None) -> tuple[int, int, str, bytes]:
    if result is None:
        return 0, 0, "", b""
    return 1, result.status, json.dumps(result.headers), result.body
