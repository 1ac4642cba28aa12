"""The SQLite job store's sweeps: leases that ran out, the pushed jobs a restart cut off, retention."""

from __future__ import annotations

from gateway.jobs.records import FINISHED, Job
from gateway.jobs.rows import CALLBACK_DUE
from gateway.jobs.store_runs import JobRuns


class JobSweeps(JobRuns):
    """SQLiteJobStore's side that the job sweep (and the start) runs; a lease that ran out ends as a run's attempt."""

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
