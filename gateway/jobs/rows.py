"""How jobs lie in SQLite: the schema, the SQL that state changes share, and a row read as a Job."""

from __future__ import annotations

import hmac
import json
from typing import Any

from gateway.jobs.records import Job, JobRequest, JobResult

# What a claim sets: the holder, the dispatch kind, a new lease token and expiry, the start time.
CLAIMED = (
    "status = 'running', attempts = attempts + 1, server_id = ?, dispatch = ?, lease_token = ?,"
    " lease_expires_at = ?, started_at = ?, error = NULL"
)
# What ending a job sets for its callback: due now, if it has a callback URL.
CALLBACK_DUE = (
    "callback_state = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END,"
    " callback_due_at = CASE WHEN callback_url IS NULL THEN NULL ELSE ? END"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    task_type TEXT NOT NULL,
    model TEXT,
    method TEXT NOT NULL,
    target TEXT NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    server_id TEXT,
    dispatch TEXT,
    lease_token TEXT,
    lease_expires_at REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    callback_url TEXT,
    result_status INTEGER,
    result_headers TEXT,
    result_body BLOB,
    size INTEGER NOT NULL,
    callback_due_at REAL,
    callback_attempts INTEGER NOT NULL DEFAULT 0,
    callback_state TEXT,
    callback_error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_callbacks ON jobs (callback_due_at) WHERE callback_state = 'pending';
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (priority, seq) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    job_id TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def job_from_row(row: tuple[Any, ...]) -> Job:
    (
        job_id,
        status,
        priority,
        seq,
        task_type,
        model,
        method,
        target,
        headers,
        body,
        attempts,
        server_id,
        dispatch,
        lease_token,
        lease_expires_at,
        created_at,
        started_at,
        finished_at,
        error,
        callback_url,
        result_status,
        result_headers,
        result_body,
        _size,
        _callback_due_at,
        _callback_attempts,
        callback_state,
        _callback_error,
    ) = row
    result = None
    if result_status is not None:
        result = JobResult(result_status, pairs(result_headers), bytes(result_body or b""))
    return Job(
        job_id=job_id,
        status=status,
        priority=priority,
        seq=seq,
        task_type=task_type,
        model=model,
        request=JobRequest(method, target, pairs(headers), bytes(body)),
        attempts=attempts,
        server_id=server_id,
        dispatch=dispatch,
        lease_token=lease_token,
        lease_expires_at=lease_expires_at,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        error=error,
        callback_url=callback_url,
        result=result,
        callback_state=callback_state,
    )


def pairs(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(name), str(value)) for name, value in json.loads(text))
