"""The embedded job store: SQLite, every change committed (and fsynced) before it is answered.

The store is the one owner of the jobs. Its operations are the narrow interface that a Redis
store implements too: submit, get, claim, heartbeat, finish, release, cancel, and the sweeps
that expire leases and old jobs. Every operation runs in a native thread under gevent (the
commit's fsync would otherwise stop every request) and holds one native lock around its
transaction; the changes that wait together (submissions, claims, a job's end) are committed
together, one fsync for all, by one of their callers while the others wait in the event loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from gateway.jobs.interface import CALLBACK_BACKOFF_CAP, ROW_OVERHEAD, Submitted
from gateway.jobs.records import (
    CANCELLED,
    EXPIRED,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    IdempotencyConflict,
    Job,
    JobNotFound,
    JobResult,
    NewJob,
    StaleLease,
    StoreFull,
    new_lease_token,
)
from gateway.jobs.rows import CALLBACK_DUE, CLAIMED, job_from_row, same
from gateway.jobs.store_reads import JobReads

log = logging.getLogger(__name__)
T = TypeVar("T")


class SQLiteJobStore(JobReads):
    """Jobs in one SQLite file (WAL, synchronous=FULL): a 202 means the job is on disk."""

    # -- submitting ------------------------------------------------------------------------

    def submit(self, job: NewJob) -> Submitted:
        """Store `job`, or, for a key seen before with the same request, answer with its job.

        Raises IdempotencyConflict for a key seen with another request, StoreFull over the budget.
        """
        submitted: Submitted = self._batched(self._insert, job, self.clock())
        return submitted

    def _insert(self, new: NewJob, now: float) -> Submitted:
        if new.idempotency_key is not None:
            row = self._db.execute(
                "SELECT fingerprint, job_id FROM idempotency WHERE key = ? AND expires_at > ?",
                (new.idempotency_key, now),
            ).fetchone()
            if row is not None:
                if row[0] != new.fingerprint:
                    raise IdempotencyConflict("this Idempotency-Key was used for a different request")
                job = self._get(row[1])
                if job is not None:
                    place = self._position(job.priority, job.seq) if job.status == QUEUED else None
                    return Submitted(job, False, place)
        request = new.request
        headers = json.dumps(request.headers)
        size = ROW_OVERHEAD + len(request.body) + len(headers) + len(request.target)
        if self._bytes + size > self.max_bytes:
            raise StoreFull(f"the job store is full ({self.max_bytes} bytes): try again when jobs have finished")
        self._seq += 1
        self._db.execute(
            "INSERT INTO jobs (job_id, status, priority, seq, task_type, model, method, target, headers, body,"
            " created_at, callback_url, size) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                new.job_id,
                new.priority,
                self._seq,
                new.task_type,
                new.model,
                request.method,
                request.target,
                headers,
                request.body,
                now,
                new.callback_url,
                size,
            ),
        )
        if new.idempotency_key is not None:
            self._db.execute(
                "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?)",
                (new.idempotency_key, new.fingerprint, new.job_id, now + self.idempotency_ttl),
            )
        self._bytes += size
        self._queued_changed(new.priority, 1)
        job = self._get(new.job_id)
        assert job is not None  # inserted just now, in this transaction
        place = sum(
            count for priority, count in self._queued_counts.items() if priority <= new.priority
        )  # the last in its own
        return Submitted(job, True, place)

    # -- running ---------------------------------------------------------------------------

    def claim(
        self,
        holder: str,
        dispatch: str,
        lease_seconds: float,
        task_types: Sequence[str] | None = None,
        skip: Iterable[str] = (),
    ) -> Job | None:
        """Take the next queued job (by priority, then age) for `holder`, with a new lease token.

        `task_types` limits it to the routes or models a worker serves; `skip` leaves out job ids
        the caller already found no server for. The attempt is counted now.
        """
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
        """Take up to `limit` queued jobs in order, each with a lease token of its own.

        A job matches when its task type is one of `task_types` or its model one of `models`
        (neither given: any job). `max_bytes` bounds what the jobs hold together, so one answer
        that carries them stays bounded; the first job is always taken.
        """
        return self._run(
            self._claim_many,
            holder,
            dispatch,
            lease_seconds,
            limit,
            tuple(task_types or ()),
            tuple(models),
            tuple(skip),
            max_bytes,
        )

    def _claim_many(
        self,
        holder: str,
        dispatch: str,
        lease_seconds: float,
        limit: int,
        task_types: tuple[str, ...],
        models: tuple[str, ...],
        skip: tuple[str, ...],
        max_bytes: int | None,
    ) -> list[Job]:
        now = self.clock()
        where = "status = 'queued'"
        args: list[str] = []
        matches = []
        if task_types:
            matches.append(f"task_type IN ({', '.join('?' * len(task_types))})")
            args.extend(task_types)
        if models:
            matches.append(f"model IN ({', '.join('?' * len(models))})")
            args.extend(models)
        if matches:
            where += f" AND ({' OR '.join(matches)})"
        if skip:
            where += f" AND job_id NOT IN ({', '.join('?' * len(skip))})"
            args.extend(skip)
        rows = self._db.execute(
            f"SELECT job_id, size FROM jobs WHERE {where} ORDER BY priority, seq LIMIT ?", (*args, limit)
        ).fetchall()
        claimed: list[Job] = []
        total = 0
        for job_id, size in rows:
            total += size
            if claimed and max_bytes is not None and total > max_bytes:
                break
            row = self._db.execute(
                f"UPDATE jobs SET {CLAIMED} WHERE job_id = ? RETURNING *",
                (holder, dispatch, new_lease_token(), now + lease_seconds, now, job_id),
            ).fetchone()
            claimed.append(job_from_row(row))
            self._queued_changed(claimed[-1].priority, -1)
        return claimed

    def claim_job(self, job_id: str, holder: str, dispatch: str, lease_seconds: float) -> Job | None:
        """Take one given job if it is still queued (None if another took it, or it was cancelled)."""
        return self.claim_jobs([(job_id, holder)], dispatch, lease_seconds)[0]

    def claim_jobs(self, wanted: Sequence[tuple[str, str]], dispatch: str, lease_seconds: float) -> list[Job | None]:
        """Take each given job (id, holder) that is still queued, all in one commit; None for each that is not."""
        return self._batched(self._claim_jobs, tuple(wanted), dispatch, lease_seconds)

    def _claim_jobs(self, wanted: tuple[tuple[str, str], ...], dispatch: str, lease_seconds: float) -> list[Job | None]:
        return [self._claim_job(job_id, holder, dispatch, lease_seconds) for job_id, holder in wanted]

    def _claim_job(self, job_id: str, holder: str, dispatch: str, lease_seconds: float) -> Job | None:
        now = self.clock()
        row = self._db.execute(
            f"UPDATE jobs SET {CLAIMED} WHERE job_id = ? AND status = 'queued' RETURNING *",
            (holder, dispatch, new_lease_token(), now + lease_seconds, now, job_id),
        ).fetchone()
        if row is None:
            return None
        job = job_from_row(row)
        self._queued_changed(job.priority, -1)
        return job

    def heartbeat(self, job_id: str, token: str, lease_seconds: float) -> Job:
        """Extend a running job's lease; StaleLease if `token` is not its current lease."""
        return self._run(self._heartbeat, job_id, token, lease_seconds)

    def _heartbeat(self, job_id: str, token: str, lease_seconds: float) -> Job:
        job = self._held(job_id, token)
        if job.status != RUNNING:
            return job  # cancelled while it ran: the caller tells the worker to stop
        self._db.execute(
            "UPDATE jobs SET lease_expires_at = ? WHERE job_id = ?", (self.clock() + lease_seconds, job_id)
        )
        held = self._get(job_id)
        assert held is not None
        return held

    def _held(self, job_id: str, token: str) -> Job:
        """The job, if `token` is its current lease (a cancelled job keeps its last token)."""
        self._holding(job_id, token)
        job = self._get(job_id)
        assert job is not None  # read just now, in this transaction
        return job

    def _holding(self, job_id: str, token: str) -> str:
        """The job's status, if `token` is its current lease: _held's checks, without reading the whole row."""
        row = self._db.execute("SELECT status, lease_token FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id}")
        status, lease_token = row
        if lease_token is None or not same(lease_token, token):
            raise StaleLease(f"job {job_id} is not leased with this token: its lease expired or moved on")
        if status not in (RUNNING, CANCELLED):
            raise StaleLease(f"job {job_id} is {status}: its lease is over")
        return str(status)

    def succeed(self, job_id: str, token: str, result: JobResult) -> Job:
        """Keep a running job's answer; StaleLease unless `token` is its current lease."""
        return self._batched(self._finish, job_id, token, SUCCEEDED, None, result)

    def fail(
        self, job_id: str, token: str, error: str, retry: bool, max_attempts: int, result: JobResult | None = None
    ) -> Job:
        """End a running job's attempt: re-queued when `retry` and attempts are left, else failed.

        A failed job keeps `result` (a server's 5xx answer, say) for the client to see.
        """
        if retry:
            return self._batched(self._requeue, job_id, token, error, max_attempts, True, result)
        return self._batched(self._finish, job_id, token, FAILED, error, result)

    def release(self, job_id: str, token: str, error: str) -> Job:
        """Put a running job back in the queue, its attempt not counted: nothing reached a server."""
        return self._batched(self._requeue, job_id, token, error, 0, False)

    def _finish(self, job_id: str, token: str, status: str, error: str | None, result: JobResult | None) -> Job:
        if self._holding(job_id, token) != RUNNING:
            return self._held(job_id, token)  # cancelled meanwhile: the cancel stands
        now = self.clock()
        changes = f"status = ?, error = ?, finished_at = ?, lease_expires_at = NULL, {CALLBACK_DUE}"
        values: list[Any] = [status, error, now, now]
        size_delta = 0
        if result is not None:  # else a result kept from an attempt before stays
            headers = json.dumps(result.headers)
            size_delta = len(result.body) + len(headers)
            changes += ", result_status = ?, result_headers = ?, result_body = ?, size = size + ?"
            values += [result.status, headers, result.body, size_delta]
        row = self._db.execute(f"UPDATE jobs SET {changes} WHERE job_id = ? RETURNING *", (*values, job_id)).fetchone()
        self._bytes += size_delta
        return job_from_row(row)  # the row as the one UPDATE left it: no second read

    def _requeue(
        self, job_id: str, token: str, error: str, max_attempts: int, counted: bool, result: JobResult | None = None
    ) -> Job:
        job = self._held(job_id, token)
        if job.status != RUNNING:
            return job
        if counted and job.attempts >= max_attempts:
            return self._finish(job_id, token, FAILED, f"{error} (after {job.attempts} attempts)", result)
        self._db.execute(
            "UPDATE jobs SET status = 'queued', error = ?, server_id = NULL, dispatch = NULL, lease_token = NULL,"
            " lease_expires_at = NULL, attempts = attempts - ? WHERE job_id = ?",
            (error, 0 if counted else 1, job_id),
        )
        self._queued_changed(job.priority, 1)
        back = self._get(job_id)
        assert back is not None
        return back

    def cancel(self, job_id: str) -> tuple[Job, Job]:
        """Cancel a job that has not finished; (before, after), so that a caller can stop its run."""
        return self._run(self._cancel, job_id)

    def _cancel(self, job_id: str) -> tuple[Job, Job]:
        job = self._get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        if job.status not in FINISHED:
            if job.status == QUEUED:
                self._queued_changed(job.priority, -1)
            now = self.clock()
            self._db.execute(
                f"UPDATE jobs SET status = 'cancelled', finished_at = ?, lease_expires_at = NULL, {CALLBACK_DUE}"
                " WHERE job_id = ?",
                (now, now, job_id),
            )
        after = self._get(job_id)
        assert after is not None
        return job, after

    def retry(self, job_id: str) -> Job:
        """Queue a failed (or expired, or cancelled) job again, with its attempts reset."""
        return self._run(self._retry, job_id)

    def _retry(self, job_id: str) -> Job:
        job = self._get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        if job.status not in (FAILED, EXPIRED, CANCELLED):
            raise StaleLease(f"job {job_id} is {job.status}: only a failed, expired or cancelled job is retried")
        self._seq += 1
        self._db.execute(
            "UPDATE jobs SET status = 'queued', attempts = 0, error = NULL, server_id = NULL, dispatch = NULL,"
            " lease_token = NULL, lease_expires_at = NULL, started_at = NULL, finished_at = NULL, seq = ?,"
            " created_at = ?, callback_state = NULL, callback_due_at = NULL, callback_attempts = 0"
            " WHERE job_id = ?",
            (self._seq, self.clock(), job_id),
        )
        self._queued_changed(job.priority, 1)
        back = self._get(job_id)
        assert back is not None
        return back

    # -- callbacks -------------------------------------------------------------------------

    def callbacks_due(self, limit: int = 50) -> list[Job]:
        """Finished jobs whose callback is due now (first try, or a retry whose wait is over)."""
        return self._run(self._callbacks_due, limit)

    def _callbacks_due(self, limit: int) -> list[Job]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE callback_state = 'pending' AND callback_due_at <= ?"
            " ORDER BY callback_due_at LIMIT ?",
            (self.clock(), limit),
        )
        return [job_from_row(row) for row in rows.fetchall()]

    def callback_tried(self, job_id: str, error: str | None, backoff: float, max_attempts: int) -> tuple[str, float]:
        """Record one delivery: delivered (no error), due again after a backoff, or failed for good.

        The n-th retry waits `backoff` * 4^(n-1) s, at most an hour. Returns the state and the wait.
        """
        return self._run(self._callback_tried, job_id, error, backoff, max_attempts)

    def _callback_tried(self, job_id: str, error: str | None, backoff: float, max_attempts: int) -> tuple[str, float]:
        row = self._db.execute("SELECT callback_attempts FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        tried = (0 if row is None else int(row[0])) + 1
        wait = min(CALLBACK_BACKOFF_CAP, backoff * 4 ** (tried - 1))
        state = "delivered" if error is None else "failed" if tried >= max_attempts else "pending"
        self._db.execute(
            "UPDATE jobs SET callback_state = ?, callback_due_at = ?, callback_error = ?, callback_attempts = ?"
            " WHERE job_id = ?",
            (state, self.clock() + wait if state == "pending" else None, error, tried, job_id),
        )
        return state, wait

    # -- sweeps ----------------------------------------------------------------------------

    def expire_leases(self, max_attempts: int) -> list[Job]:
        """Re-queue (or fail, out of attempts) every running job whose lease ran out; the jobs after."""
        return self._run(self._expire_leases, max_attempts)

    def _expire_leases(self, max_attempts: int) -> list[Job]:
        now = self.clock()
        rows = self._db.execute(
            "SELECT job_id, lease_token FROM jobs WHERE status = 'running' AND lease_expires_at <= ?", (now,)
        ).fetchall()
        return [self._requeue(job_id, token, "its lease expired", max_attempts, True) for job_id, token in rows]

    def recover(self) -> int:
        """At start: pushed jobs that were running go back to the queue now (their requests died
        with the process); pulled ones keep their lease, since their worker may still finish."""
        return self._run(self._recover)

    def _recover(self) -> int:
        cursor = self._db.execute(
            "UPDATE jobs SET status = 'queued', attempts = attempts - 1, server_id = NULL, dispatch = NULL,"
            " lease_token = NULL, lease_expires_at = NULL, error = 'the gateway restarted while it ran'"
            " WHERE status = 'running' AND dispatch = 'push'"
        )
        self._recount()
        return cursor.rowcount

    def purge(self) -> tuple[int, int]:
        """Expire queued jobs past JOB_QUEUE_TTL and delete finished ones past JOB_RESULT_TTL."""
        return self._run(self._purge)

    def _purge(self) -> tuple[int, int]:
        now = self.clock()
        expired = self._db.execute(
            f"UPDATE jobs SET status = 'expired', finished_at = ?, {CALLBACK_DUE},"
            " error = 'no server took it within JOB_QUEUE_TTL' WHERE status = 'queued' AND created_at <= ?",
            (now, now, now - self.queue_ttl),
        ).rowcount
        finished = tuple(FINISHED)
        placeholders = ", ".join("?" * len(finished))
        freed = self._db.execute(
            f"DELETE FROM jobs WHERE status IN ({placeholders}) AND finished_at <= ? RETURNING size",
            (*finished, now - self.result_ttl),
        ).fetchall()
        self._db.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
        self._bytes -= sum(size for (size,) in freed)
        self._recount()
        return expired, len(freed)
