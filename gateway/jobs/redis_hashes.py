"""How a job lies in Redis, read back: its hash (as HGETALL gives it, or a script's flat reply) as a Job."""

from __future__ import annotations

from gateway.jobs.records import Job, JobRequest, JobResult
from gateway.jobs.rows import pairs


def job_from_hash(flat: list[bytes]) -> Job:
    """A job from a script's HGETALL reply: field, value, field, value ..."""
    return job_from_fields(dict(zip(flat[::2], flat[1::2], strict=True)))


def job_from_fields(fields: dict[bytes, bytes]) -> Job:
    """A job from its hash; an absent field is NULL."""

    def text(name: bytes) -> str | None:
        value = fields.get(name)
        return None if value is None else value.decode()

    def number(name: bytes) -> float | None:
        value = fields.get(name)
        return None if value is None else float(value)

    result = None
    if b"result_status" in fields:
        result = JobResult(
            int(fields[b"result_status"]), pairs(fields[b"result_headers"].decode()), fields.get(b"result_body", b"")
        )
    return Job(
        job_id=fields[b"job_id"].decode(),
        status=fields[b"status"].decode(),
        priority=int(fields[b"priority"]),
        seq=int(fields[b"seq"]),
        task_type=fields[b"task_type"].decode(),
        model=text(b"model"),
        request=JobRequest(
            fields[b"method"].decode(), fields[b"target"].decode(), pairs(fields[b"headers"].decode()), fields[b"body"]
        ),
        attempts=int(fields[b"attempts"]),
        server_id=text(b"server_id"),
        dispatch=text(b"dispatch"),
        lease_token=text(b"lease_token"),
        lease_expires_at=number(b"lease_expires_at"),
        created_at=float(fields[b"created_at"]),
        started_at=number(b"started_at"),
        finished_at=number(b"finished_at"),
        error=text(b"error"),
        callback_url=text(b"callback_url"),
        result=result,
        callback_state=text(b"callback_state"),
    )
