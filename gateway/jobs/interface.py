"""What every job store offers: the operations the service, the dispatcher and the views call.

Two stores implement it: `SQLiteJobStore` (one process, the embedded default) and
`RedisJobStore` (every process and host that shares one Redis). Both keep the same rules:
a submission is answered once it is stored, every state change is one transaction, and a
lease token fences off a holder whose lease ran out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.jobs.records import Job, JobResult, NewJob

CALLBACK_BACKOFF_CAP = 3600.0  # the longest wait between two deliveries of one callback
ROW_OVERHEAD = 512  # bytes a job costs beyond its bodies and headers, for the size budget


@dataclass(frozen=True)
class Submitted:
    """A submission's outcome: the job, and whether this submission made it (False: a repeat)."""

    job: Job
    created: bool
    position: int | None = None  # its place in the queue at that moment, counted in the same transaction


@dataclass(frozen=True)
class QueueCounts:
    """The queue at a glance: jobs per status, queued per priority, and the oldest wait."""

    by_status: dict[str, int]
    queued_by_priority: dict[int, int]
    oldest_queued_at: float | None
    stored_bytes: int


class JobStore(Protocol):
    """The one owner of the jobs; see SQLiteJobStore for what each operation promises."""

    clock: Callable[[], float]

    def submit(self, job: NewJob) -> Submitted: ...

    def get(self, job_id: str) -> Job: ...

    def position(self, job: Job) -> int | None: ...

    def recent(self, status: str | None = None, limit: int = 100) -> list[Job]: ...

    def counts(self) -> QueueCounts: ...

    def claim(
        self,
        holder: str,
        dispatch: str,
        lease_seconds: float,
        task_types: Sequence[str] | None = None,
        skip: Iterable[str] = (),
    ) -> Job | None: ...

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
    ) -> list[Job]: ...

    def claim_job(self, job_id: str, holder: str, dispatch: str, lease_seconds: float) -> Job | None: ...

    def claim_jobs(
        self, wanted: Sequence[tuple[str, str]], dispatch: str, lease_seconds: float
    ) -> list[Job | None]: ...

    def holders(self, dispatch: str) -> dict[str, list[str]]: ...

    def queue_heads(self, limit: int = 200) -> list[tuple[str, str | None, str]]: ...

    def heartbeat(self, job_id: str, token: str, lease_seconds: float) -> Job: ...

    def succeed(self, job_id: str, token: str, result: JobResult) -> Job: ...

    def fail(
        self, job_id: str, token: str, error: str, retry: bool, max_attempts: int, result: JobResult | None = None
    ) -> Job: ...

    def release(self, job_id: str, token: str, error: str) -> Job: ...

    def cancel(self, job_id: str) -> tuple[Job, Job]: ...

    def retry(self, job_id: str) -> Job: ...

    def callbacks_due(self, limit: int = 50) -> list[Job]: ...

    def callback_tried(
        self, job_id: str, error: str | None, backoff: float, max_attempts: int
    ) -> tuple[str, float]: ...

    def expire_leases(self, max_attempts: int) -> list[Job]: ...

    def recover(self) -> int: ...

    def purge(self) -> tuple[int, int]: ...

    def close(self) -> None: ...
