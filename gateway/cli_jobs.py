"""`gpu-gateway-client jobs ...`: the operator's view of the durable job queue."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

import click

from gateway.cli import ADMIN_EPILOG, admin_options, cli, format_rows
from gateway.client import Gateway

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
COLUMNS = ("JOB", "STATUS", "PRIORITY", "TASK TYPE", "ATTEMPTS", "SERVER", "AGE", "ERROR")


@cli.group(epilog=ADMIN_EPILOG)
def jobs() -> None:
    """List, show, cancel and retry durable jobs."""


@jobs.command("list", epilog=ADMIN_EPILOG)
@click.option("--status", type=click.Choice(STATUSES), help="Only jobs in this status.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="The newest this many.")
@click.option("--json", "as_json", is_flag=True, help="Print the gateway's raw JSON reply.")
@admin_options
def list_jobs(gateway: Gateway, status: str | None, limit: int, as_json: bool) -> None:
    """The newest jobs, and the queue at a glance."""
    query = f"?limit={limit}" + (f"&status={status}" if status else "")
    reply = gateway.call("GET", "/admin/jobs" + query)
    if as_json:
        click.echo(json.dumps(reply, indent=2, ensure_ascii=False))
        return
    data = reply.get("data") or {}
    now = time.time()
    click.echo(format_rows(COLUMNS, [job_row(job, now) for job in data.get("jobs") or []]))
    counts = data.get("counts") or {}
    click.echo(", ".join(f"{counts.get(name, 0)} {name}" for name in STATUSES))


@jobs.command("show", epilog=ADMIN_EPILOG)
@click.argument("job_id")
@admin_options
def show_job(gateway: Gateway, job_id: str) -> None:
    """A job's state, place in the queue and estimated wait, as JSON."""
    click.echo(json.dumps(gateway.call("GET", job_path(job_id)), indent=2, ensure_ascii=False))


@jobs.command("cancel", epilog=ADMIN_EPILOG)
@click.argument("job_id")
@admin_options
def cancel_job(gateway: Gateway, job_id: str) -> None:
    """Cancel JOB_ID: queued, it never runs; running, its request is closed."""
    reply = gateway.call("DELETE", job_path(job_id))
    click.echo(f"job {job_id} {reply.get('status', 'cancelled')}")


@jobs.command("retry", epilog=ADMIN_EPILOG)
@click.argument("job_id")
@admin_options
def retry_job(gateway: Gateway, job_id: str) -> None:
    """Queue a failed, expired or cancelled JOB_ID again."""
    reply = gateway.call("POST", f"/admin{job_path(job_id)}/retry")
    click.echo(f"job {job_id} {reply.get('status', 'queued')} again")


def job_path(job_id: str) -> str:
    return f"/jobs/{quote(job_id, safe='')}"


def job_row(job: dict[str, Any], now: float) -> tuple[str, ...]:
    """One job's table cells."""
    created = job.get("created_at")
    age = f"{max(0, round(now - created))}s" if isinstance(created, (int, float)) else "?"
    return (
        str(job.get("job_id", "?")),
        str(job.get("status", "?")),
        str(job.get("priority", "?")),
        str(job.get("task_type", "?")),
        str(job.get("attempts", "?")),
        str(job.get("server_id") or "-"),
        age,
        str(job.get("error") or ""),
    )
