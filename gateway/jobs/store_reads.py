"""The SQLite job store's reads: a job, its place in the queue, listings, counts, the queue's heads, the holders."""

from __future__ import annotations

from gateway.jobs.interface import QueueCounts
from gateway.jobs.records import QUEUED, STATUSES, Job, JobNotFound
from gateway.jobs.rows import job_from_row
from gateway.jobs.store_file import JobFile


class JobReads(JobFile):
    """SQLiteJobStore's read side: each read one transaction under the store's lock, changing nothing."""

    def get(self, job_id: str) -> Job:
        """The job; JobNotFound if there is none (or it was purged)."""
        job = self._run(self._get, job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        return job

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, and so on; None once it is no longer queued."""
        if job.status != QUEUED:
            return None
        return self._run(self._position, job.priority, job.seq)

    def _position(self, priority: int, seq: int) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND (priority < ? OR (priority = ? AND seq < ?))",
            (priority, priority, seq),
        ).fetchone()
        return int(row[0]) + 1

    def recent(self, status: str | None = None, limit: int = 100) -> list[Job]:
        """The newest jobs first, of one status or all."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown job status {status!r}: one of {', '.join(STATUSES)}")
        return self._run(self._list, status, limit)

    def unfinished(self) -> list[tuple[Job, str | None, str]]:
        """Every queued or running job, oldest first, with its Idempotency-Key and fingerprint (for a move to Redis)."""
        return self._run(self._unfinished)

    def _unfinished(self) -> list[tuple[Job, str | None, str]]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY priority, seq"
        ).fetchall()
        keys = {job_id: (key, fingerprint) for key, fingerprint, job_id, _ in self._db.execute(
            "SELECT * FROM idempotency WHERE expires_at > ?", (self.clock(),)
        )}  # fmt: skip
        jobs = [job_from_row(row) for row in rows]
        return [(job, *keys.get(job.job_id, (None, ""))) for job in jobs]

    def _list(self, status: str | None, limit: int) -> list[Job]:
        if status is None:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created_at DESC, seq DESC LIMIT ?", (limit,))
        else:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status = ? ORDER BY created_at DESC, seq DESC LIMIT ?", (status, limit)
            )
        return [job_from_row(row) for row in rows.fetchall()]

    def counts(self) -> QueueCounts:
        """Jobs per status, queued jobs per priority, the oldest queued job's time."""
        return self._run(self._counts)

    def _counts(self) -> QueueCounts:
        by_status = dict.fromkeys(STATUSES, 0)
        for status, count in self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            by_status[status] = count
        per_priority = dict(
            self._db.execute("SELECT priority, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY priority").fetchall()
        )
        oldest = self._db.execute("SELECT MIN(created_at) FROM jobs WHERE status = 'queued'").fetchone()[0]
        return QueueCounts(by_status, per_priority, oldest, self._bytes)

    def holders(self, dispatch: str) -> dict[str, list[str]]:
        """The running jobs of one dispatch kind, by the holder that runs them (ids only)."""
        return self._run(self._holders, dispatch)

    def _holders(self, dispatch: str) -> dict[str, list[str]]:
        held: dict[str, list[str]] = {}
        rows = self._db.execute(
            "SELECT server_id, job_id FROM jobs WHERE status = 'running' AND dispatch = ? ORDER BY started_at, seq",
            (dispatch,),
        )
        for holder, job_id in rows:
            held.setdefault(holder, []).append(job_id)
        return held

    def queue_heads(self, limit: int = 200) -> list[tuple[str, str | None, str]]:
        """The next `limit` queued jobs' ids, models and headers (JSON), in order: what routing needs.

        The dispatcher looks at these every round; reading whole jobs (bodies too) would cost it,
        and every submission waiting for the lock, far more.
        """
        return self._run(self._queue_heads, limit)

    def _queue_heads(self, limit: int) -> list[tuple[str, str | None, str]]:
        rows = self._db.execute(
            "SELECT job_id, model, headers FROM jobs WHERE status = 'queued' ORDER BY priority, seq LIMIT ?", (limit,)
        )
        return [(str(job_id), model, str(headers)) for job_id, model, headers in rows.fetchall()]
