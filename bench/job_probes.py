"""The measurements of the job queue that bench/jobs_bench.py runs, each against a running gateway."""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # demo.fake_gpu_server, run from anywhere

from gateways import Gateway, post_json
from http_load import JSON_HEADERS, Call, LoadRun, send_all
from plan import say
from processes import HOST, descendants
from store_reader import StoreReader

from demo.fake_gpu_server import FakeGPUServer, Handler

JOB_PATH = "/api/echo"  # the fake answers it at once, echoing the request
JOB_BODY = json.dumps({"image": "x" * 200, "size": 2}).encode()
ASYNC_JOB = Call("POST", JOB_PATH, JOB_BODY, {**JSON_HEADERS, "Prefer": "respond-async"})  # answered 202
SYNC_JOB = Call("POST", JOB_PATH, JOB_BODY, JSON_HEADERS)  # the same request, proxied as it comes
MIB = 1024 * 1024
SETTLE_S = 0.3  # for a long poll to be waiting, or a job's answer to be back, before the next step
LEASE_WAIT_S = 30  # the worker's wait_seconds
FIRST_JOB_TIMEOUT_S = 10.0


class TimedHandler(Handler):
    """The fake's handler, noting when each request arrives (its head read) before it is answered."""

    server: TimedFake

    def route(self) -> None:
        self.server.arrived(self.path)
        super().route()


class TimedFake(FakeGPUServer):
    """A fake GPU server in this process, on the bench's clock: when its first request and first job came."""

    def __init__(self, server_id: str) -> None:
        super().__init__(server_id)
        self.RequestHandlerClass = TimedHandler
        self.first_request: float | None = None
        self.first_job: float | None = None
        self.got_job = threading.Event()
        self._times_lock = threading.Lock()

    def arrived(self, path: str) -> None:
        now = time.perf_counter()
        with self._times_lock:
            if self.first_request is None:
                self.first_request = now
            if self.first_job is None and path.startswith(JOB_PATH):
                self.first_job = now
                self.got_job.set()


# -- submissions and the long-poll lease -------------------------------------------------------


def submit_jobs(gateway: Gateway, store: StoreReader, count: int, clients: int, deadline_s: float) -> dict[str, Any]:
    """`count` jobs submitted with `Prefer: respond-async` from `clients` clients; each 202 is a durable job."""
    queued_before = store.counts().get("queued", 0)
    cpu_before = gateway.service.cpu_seconds()
    run = send_all(gateway.port, itertools.repeat(ASYNC_JOB, count), clients, deadline_s, expect=202)
    cpu = gateway_cpu(gateway, cpu_before, run.attempted, run.seconds)
    say(f"  submissions, {clients:>2} clients: {run.succeeded} in {run.seconds:.2f}s = {run.per_s:8.1f}/s, "
        f"p50 {run.latency_p50_ms} ms, p99 {run.latency_p99_ms} ms, failures {run.failures or 0}")  # fmt: skip
    return {**_load_row(run), **cpu, "queued_before": queued_before, "queued_after": store.counts().get("queued", 0)}


def time_leases(gateway: Gateway, repeats: int) -> dict[str, Any]:
    """A worker waits in POST /workers/lease; one job is submitted; from its 202 to the lease's answer."""
    samples: list[dict[str, float]] = []
    failures: dict[str, int] = {}
    for _ in range(repeats):
        leased: dict[str, Any] = {}
        worker = threading.Thread(target=lambda found=leased: found.update(lease_one(gateway)), daemon=True)
        worker.start()
        time.sleep(SETTLE_S)  # the poll is open and waiting
        sent = time.perf_counter()
        status, reply = post_json(HOST, gateway.port, JOB_PATH, {"image": "x"}, headers={"Prefer": "respond-async"})
        accepted = time.perf_counter()
        worker.join(LEASE_WAIT_S + 10)
        job = leased.get("job")
        if status != 202 or job is None or job["job_id"] != dict(reply).get("job_id"):
            reason = f"submit HTTP {status}" if status != 202 else f"lease HTTP {leased.get('status')}"
            failures[reason] = failures.get(reason, 0) + 1
            continue
        complete(gateway, job)
        samples.append(
            {"after_202_ms": (leased["at"] - accepted) * 1000, "after_submit_sent_ms": (leased["at"] - sent) * 1000}
        )
    after_202 = [s["after_202_ms"] for s in samples]
    after_sent = [s["after_submit_sent_ms"] for s in samples]
    row = {
        "repeats": repeats,
        "samples": [{key: round(value, 3) for key, value in s.items()} for s in samples],
        "median_after_202_ms": _median(after_202),
        "max_after_202_ms": round(max(after_202), 3) if after_202 else None,
        "median_after_submit_sent_ms": _median(after_sent),
        "failures": failures,
    }
    say(f"  long-poll lease: median {row['median_after_202_ms']} ms after the 202, "
        f"{row['median_after_submit_sent_ms']} ms after the submit was sent ({len(samples)} of {repeats})")  # fmt: skip
    return row


def lease_one(gateway: Gateway) -> dict[str, Any]:
    """One long poll for one job; the job and the moment its answer was read."""
    body = {"worker_id": "bench-worker", "routes": ["/api/"], "max_jobs": 1, "wait_seconds": LEASE_WAIT_S}
    status, reply = post_json(HOST, gateway.port, "/workers/lease", body, LEASE_WAIT_S + 5, _worker(gateway))
    at = time.perf_counter()
    jobs = reply.get("jobs") if status == 200 and isinstance(reply, dict) else None
    return {"status": status, "at": at, "job": jobs[0] if jobs else None}


def complete(gateway: Gateway, job: dict[str, Any]) -> None:
    """Complete a leased job, as a worker does, so that the queue is empty again."""
    body = {"lease_token": job["lease_token"], "status": 200, "headers": [["Content-Type", "application/json"]]}
    status, reply = post_json(
        HOST, gateway.port, f"/jobs/{job['job_id']}/complete", {**body, "body": "e30="}, headers=_worker(gateway)
    )
    if status != 200:
        raise RuntimeError(f"completing job {job['job_id']} got HTTP {status}: {reply}")


def _worker(gateway: Gateway) -> dict[str, str]:
    return {"Authorization": f"Bearer {gateway.secret}"}  # the worker credential while WORKER_TOKEN is unset


# -- first dispatch, the drain and the synchronous baseline ------------------------------------


def time_first_dispatch(gateway: Gateway, store: StoreReader, repeats: int) -> dict[str, Any]:
    """Register a fake (in this process) to the waiting backlog; time its first request and first job."""
    samples = []
    for number in range(repeats):
        server_id = f"D{number + 1}"
        fake = TimedFake(server_id).start()
        try:
            queued = store.counts().get("queued", 0)
            started = time.perf_counter()
            gateway.register(server_id, fake.port, max_concurrent=1)  # at most one of the backlog's jobs at a time
            answered = time.perf_counter()
            fake.got_job.wait(FIRST_JOB_TIMEOUT_S)
            gateway.unregister(server_id)
            time.sleep(SETTLE_S)  # the job it holds is answered before the fake goes
        finally:
            fake.stop()
        samples.append(
            {
                "queued": queued,
                "register_reply_ms": round((answered - started) * 1000, 3),
                "first_request_ms": _ms_since(started, fake.first_request),
                "first_job_ms": _ms_since(started, fake.first_job),
            }
        )
    firsts = [s["first_job_ms"] for s in samples if s["first_job_ms"] is not None]
    row = {
        "repeats": repeats,
        "samples": samples,
        "median_first_job_ms": _median(firsts),
        "max_first_job_ms": round(max(firsts), 3) if firsts else None,
        "median_first_request_ms": _median([s["first_request_ms"] for s in samples]),
        "median_register_reply_ms": _median([s["register_reply_ms"] for s in samples]),
        "missed": repeats - len(firsts),
    }
    say(f"  first dispatch: median {row['median_first_job_ms']} ms from the register call to the first job "
        f"(backlog {samples[0]['queued'] if samples else '?'}; {len(firsts)} of {repeats})")  # fmt: skip
    return row


def drain(gateway: Gateway, store: StoreReader, ports: list[int], slots: int, deadline_s: float) -> dict[str, Any]:
    """Register the fakes (`slots` jobs at once each) to the queued backlog; time until every job has finished."""
    cpu_before = gateway.service.cpu_seconds()
    since = time.time()  # the store's times are the gateway's wall clock
    for number, port in enumerate(ports, start=1):
        gateway.register(f"S{number}", port, max_concurrent=slots)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        counts = store.counts()
        if not counts.get("queued") and not counts.get("running"):
            break
        time.sleep(0.05)
    span = store.span(since)
    seconds = (span["last_finished"] - since) if span["last_finished"] else None
    done = span["succeeded"] + span["failed"]
    row = {
        "jobs": done,
        "succeeded": span["succeeded"],
        "failed": span["failed"],
        "left": {status: n for status, n in store.counts().items() if status in ("queued", "running")},
        "seconds": round(seconds, 3) if seconds else None,
        "jobs_per_s": round(done / seconds, 1) if seconds else None,
        "first_started_ms": round((span["first_started"] - since) * 1000, 2) if span["first_started"] else None,
        **gateway_cpu(gateway, cpu_before, done, seconds),
    }
    say(f"  drain: {done} jobs in {row['seconds']}s = {row['jobs_per_s']}/s "
        f"({row['failed']} failed, left {row['left'] or 0})")  # fmt: skip
    return row


def send_synchronously(gateway: Gateway, count: int, clients: int, deadline_s: float) -> dict[str, Any]:
    """The same requests, sent as plain proxied calls from `clients` clients at once."""
    cpu_before = gateway.service.cpu_seconds()
    run = send_all(gateway.port, itertools.repeat(SYNC_JOB, count), clients, deadline_s)
    say(f"  synchronous: {run.succeeded} in {run.seconds:.2f}s = {run.per_s:8.1f}/s, failures {run.failures or 0}")
    return {**_load_row(run), **gateway_cpu(gateway, cpu_before, run.attempted, run.seconds)}


def gateway_cpu(gateway: Gateway, cpu_before: float, calls: int, seconds: float | None) -> dict[str, float | None]:
    """The gateway's CPU per call since `cpu_before`, and the cores it kept busy (one worker: 1.0 at most, nearly)."""
    cpu_s = gateway.service.cpu_seconds() - cpu_before
    return {
        "gateway_cpu_ms_per_call": round(cpu_s * 1000 / calls, 3) if calls else None,
        "gateway_cores": round(cpu_s / seconds, 2) if seconds else None,
    }


def top_up(gateway: Gateway, store: StoreReader, target: int, clients: int, deadline_s: float) -> int:
    """Submit jobs until `target` are queued (the first-dispatch runs took a few); how many were added."""
    missing = target - store.counts().get("queued", 0)
    if missing > 0:
        send_all(gateway.port, itertools.repeat(ASYNC_JOB, missing), clients, deadline_s, expect=202)
    return max(missing, 0)


# -- memory ------------------------------------------------------------------------------------


def memory_reading(gateway: Gateway, store: StoreReader) -> dict[str, int]:
    """The gateway worker's RSS, the store's pages and its files on disk, in bytes."""
    worker = (descendants(gateway.service.pid) or [gateway.service.pid])[0]
    return {"rss": psutil.Process(worker).memory_info().rss, **store.sizes()}


def memory_per_job(before: dict[str, int], after: dict[str, int], jobs: int, label: str) -> dict[str, Any]:
    """What `jobs` queued jobs added since `before`, per job; `label` says when `after` was read."""

    def per_job(key: str) -> float | None:
        return round((after[key] - before[key]) / jobs, 1) if jobs else None

    return {
        "label": label,
        "jobs": jobs,
        "rss_before_mib": round(before["rss"] / MIB, 1),
        "rss_mib": round(after["rss"] / MIB, 1),
        "rss_bytes_per_job": per_job("rss"),
        "store_bytes_per_job": per_job("database"),
        "files_bytes_per_job": per_job("files"),
        "store_mib": round(after["database"] / MIB, 2),
    }


def _load_row(run: LoadRun) -> dict[str, Any]:
    return {key: getattr(run, key) for key in run.__dataclass_fields__}


def _median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are there; None when none is."""
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 3) if present else None


def _ms_since(started: float, moment: float | None) -> float | None:
    return round((moment - started) * 1000, 3) if moment is not None else None
