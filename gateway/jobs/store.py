"""The embedded job store: SQLite, every change committed (and fsynced) before it is answered.

The store is the one owner of the jobs. Its operations are the narrow interface that a Redis
store implements too: submit, get, claim, heartbeat, finish, release, cancel, and the sweeps
that expire leases and old jobs. Every operation runs in a native thread under gevent (the
commit's fsync would otherwise stop every request) and holds one native lock around its
transaction; the changes that wait together (submissions, claims, a job's end) are committed
together, one fsync for all, by one of their callers while the others wait in the event loop
(group_commit.py).

SQLiteJobStore submits, cancels and retries jobs and keeps their callbacks' state here; its other
sides are its bases: JobSweeps (store_sweeps.py: leases that ran out, recovery at start,
retention), JobRuns (store_runs.py: claims, heartbeats, a run's end) and JobReads
(store_reads.py), each on JobFile (store_file.py: the settings, and what is kept in memory).
"""

from __future__ import annotations

import json
import logging

from gateway.jobs.interface import CALLBACK_BACKOFF_CAP, ROW_OVERHEAD, Submitted
from gateway.jobs.records import (
    CANCELLED,
    EXPIRED,
    FAILED,
    FINISHED,
    QUEUED,
    IdempotencyConflict,
    Job,
    JobNotFound,
    NewJob,
    StaleLease,
    StoreFull,
)
from gateway.jobs.rows import CALLBACK_DUE, job_from_row
from gateway.jobs.store_reads import JobReads
from gateway.jobs.store_runs import JobRuns
from gateway.jobs.store_sweeps import JobSweeps

log = logging.getLogger(__name__)


class SQLiteJobStore(JobSweeps, JobRuns, JobReads):
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
