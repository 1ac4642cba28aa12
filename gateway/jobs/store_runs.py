"""The SQLite job store's runs: claims, each with a lease token of its own; heartbeats; a run's end.

Taking given jobs (claim_jobs) and a run's end (succeeded, failed, released) wait for the next
group commit with the submissions; taking the next jobs in order (claim_many) and a heartbeat
commit alone. A heartbeat and an end change a job only under the lease token they are given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from gateway.jobs.records import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobNotFound,
    JobResult,
    StaleLease,
    new_lease_token,
)
from gateway.jobs.rows import CALLBACK_DUE, CLAIMED, job_from_row, same
from gateway.jobs.store_file import JobFile


class JobRuns(JobFile):
    """SQLiteJobStore's side that hands out jobs under leases and takes their outcomes back."""

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
        job = self._get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        _check_lease(job_id, job.status, job.lease_token, token)
        return job

    def _holding(self, job_id: str, token: str) -> str:
        """The job's status, if `token` is its current lease: _held's checks, without reading the whole row."""
        row = self._db.execute("SELECT status, lease_token FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id}")
        _check_lease(job_id, row[0], row[1], token)
        return str(row[0])

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


def _check_lease(job_id: str, status: str, lease_token: str | None, token: str) -> None:
    """StaleLease unless `token` is the job's current lease and the job runs (or was cancelled as it ran)."""
    if lease_token is None or not same(lease_token, token):
        raise StaleLease(f"job {job_id} is not leased with this token: its lease expired or moved on")
    if status not in (RUNNING, CANCELLED):
        raise StaleLease(f"job {job_id} is {status}: its lease is over")
