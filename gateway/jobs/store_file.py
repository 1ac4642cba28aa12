"""The jobs' SQLite file: the store's settings, and what it keeps in memory beside the table.

Every side of the SQLite job store (store_reads.py, store_runs.py, store_sweeps.py, store.py)
builds on JobFile, which commits through GroupCommits (group_commit.py) and SQLiteFile (sqlite.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.jobs.group_commit import GroupCommits
from gateway.jobs.records import Job
from gateway.jobs.rows import SCHEMA, job_from_row

T = TypeVar("T")


class JobFile(GroupCommits):
    """The jobs' table in one SQLite file; its sequence, bytes and queued jobs per priority kept in memory."""

    schema = SCHEMA
    what = "job store"

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = 1 << 30,
        idempotency_ttl: float = 86400.0,
        result_ttl: float = 86400.0,
        queue_ttl: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path)
        self.max_bytes = max_bytes
        self.idempotency_ttl = idempotency_ttl
        self.result_ttl = result_ttl
        self.queue_ttl = queue_ttl
        self.clock = clock
        self._bytes = int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM jobs").fetchone()[0])
        self._seq = int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0])
        # Queued jobs per priority, kept as they change (under the lock), so that a submission's
        # place in the queue costs no count over the queue; counted again from the table at every
        # purge (a minute), so that a mistake here could not last.
        self._queued_counts: dict[int, int] = {}
        self._recount()

    def _recount(self) -> None:
        rows = self._db.execute("SELECT priority, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY priority")
        self._queued_counts = {int(priority): int(count) for priority, count in rows.fetchall()}

    def _queued_changed(self, priority: int, delta: int) -> None:
        self._queued_counts[priority] = self._queued_counts.get(priority, 0) + delta

    def _locked(self, func: Callable[..., T], *args: Any) -> T:
        """As SQLiteFile's, and what is kept in memory goes back too when the transaction does."""
        kept = self._seq, self._bytes, dict(self._queued_counts)
        try:
            return super()._locked(func, *args)
        except BaseException:
            self._seq, self._bytes, self._queued_counts = kept
            raise

    def _get(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else job_from_row(row)
