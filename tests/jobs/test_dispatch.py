"""Push dispatch over real HTTP: a JobService on each store, a real manager and fake GPU servers on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket

import pytest
from conftest import wait_until

from gateway.cluster.connection import Redis
from gateway.fleet.store import JsonFileStore
from gateway.jobs.records import CANCELLED, FAILED, PULL, QUEUED, RUNNING, SUCCEEDED, JobRequest, NewJob
from gateway.jobs.redis_store import RedisJobStore
from gateway.jobs.service import JobService, fingerprint
from gateway.jobs.store import SQLiteJobStore
from gateway.manager import BackendManager
from gateway.proxy.upstream import UpstreamPool


@pytest.fixture(params=["sqlite", "redis"])
def make_jobs(request, tmp_path):
    """Build a started JobService on one kind of store (Redis on a real redis-server), stopped at the end."""
    built: list[JobService] = []
    pools: dict[str, UpstreamPool] = {}
    connections: list[Redis] = []

    def pool_for(url: str) -> UpstreamPool:
        return pools.setdefault(url, UpstreamPool(url, 8, 2.0, 10.0))

    def build(lease_seconds: float = 30) -> JobService:
        manager = BackendManager(JsonFileStore(tmp_path / f"servers-{len(built)}.json"))
        manager.load()
        if request.param == "sqlite":
            store = SQLiteJobStore(tmp_path / f"jobs-{len(built)}.db")
        else:
            connections.append(Redis(request.getfixturevalue("redis_server").url))
            store = RedisJobStore(connections[-1])
        service = JobService(store, manager, pool_for, lease_seconds=lease_seconds, max_attempts=3)
        service.start()
        built.append(service)
        return service

    yield build
    for service in built:
        service.stop()
        service.store.close()
    for pool in pools.values():
        pool.close()
    for connection in connections:
        connection.close()


@pytest.fixture
def jobs(make_jobs):
    return make_jobs()


def submit(jobs: JobService, method: str = "GET", target: str = "/api/echo", body: bytes = b"", **options):
    request = JobRequest(method, target, (("X-Request-Id", "r-1"),), body)
    new = NewJob(request, task_type="/api/", fingerprint=fingerprint(request), **options)
    return jobs.submit(new).job


def finished(jobs: JobService, job_id: str, timeout: float = 10.0):
    assert wait_until(lambda: jobs.store.get(job_id).finished, timeout), jobs.store.get(job_id)
    return jobs.store.get(job_id)


def test_a_job_waits_with_no_server_up_and_runs_when_one_registers(jobs, fake_servers):
    job = submit(jobs)
    assert jobs.estimate(job).seconds is None
    assert "no GPU server is online" in jobs.estimate(job).message
    assert jobs.wait(job.job_id, 0.3).status == QUEUED  # nothing can run it yet
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port)  # wakes the dispatcher
    done = jobs.wait(job.job_id, 10)
    assert (done.status, done.server_id, done.attempts) == (SUCCEEDED, "B1", 1)
    assert done.result is not None and done.result.status == 200
    echo = json.loads(done.result.body)
    sent = {name.lower(): value for name, value in echo["headers"].items()}
    assert sent["idempotency-key"] == job.job_id  # the backend may drop a repeat
    assert sent["x-request-id"] == "r-1"


def test_jobs_run_by_priority_and_never_past_a_servers_cap(jobs, fake_servers):
    ids = [submit(jobs, target=f"/api/echo?n={p}", priority=p).job_id for p in (7, 2, 9, 0)]
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port, options={"max_concurrent": 1})
    for job_id in ids:
        assert finished(jobs, job_id).status == SUCCEEDED
    order = [entry["query"]["n"] for entry in server.requests if entry["path"] == "/api/echo"]
    assert order == ["0", "2", "7", "9"]


def test_a_refused_connect_puts_the_job_back_without_an_attempt(jobs):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    job = submit(jobs)
    jobs.manager.register_server("B1", "127.0.0.1", port)
    assert wait_until(lambda: (jobs.store.get(job.job_id).error or "").startswith("B1:"), 10)
    back = jobs.store.get(job.job_id)
    assert back.status in (QUEUED, "running") and back.attempts <= 1  # a run may be starting again
    assert jobs.store.get(job.job_id).result is None


def test_a_post_the_server_broke_off_fails_and_is_not_repeated(jobs, fake_servers):
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port)
    job = submit(jobs, "POST", "/api/short-json", b"{}")
    done = finished(jobs, job.job_id)
    assert done.status == FAILED and "broke off" in (done.error or "")
    assert [r["path"] for r in server.requests].count("/api/short-json") == 1


def test_a_get_the_server_broke_off_is_tried_again_up_to_the_limit(jobs, fake_servers):
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port)
    job = submit(jobs, "GET", "/api/short-json")
    done = finished(jobs, job.job_id)
    assert (done.status, done.attempts) == (FAILED, 3)
    assert [r["path"] for r in server.requests].count("/api/short-json") == 3


def test_a_cancel_closes_a_running_jobs_request_and_frees_its_slot(jobs, fake_servers):
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port, options={"max_concurrent": 1})
    job = submit(jobs, "GET", "/api/slow?delay=20")
    assert wait_until(lambda: job.job_id in jobs.dispatcher.running, 10)
    assert jobs.cancel(job.job_id).status == CANCELLED
    assert wait_until(lambda: not jobs.dispatcher.running, 10)  # the request was abandoned, not awaited
    assert jobs.store.get(job.job_id).status == CANCELLED
    second = submit(jobs)  # the one slot is free again
    assert finished(jobs, second.job_id).status == SUCCEEDED


def test_a_queued_job_that_is_cancelled_never_runs(jobs, fake_servers):
    job = submit(jobs, target="/api/echo?cancelled=1")
    jobs.cancel(job.job_id)
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port)
    later = submit(jobs)
    assert finished(jobs, later.job_id).status == SUCCEEDED
    assert all("cancelled" not in entry["query"] for entry in server.requests)


def test_a_job_that_needs_gpu_memory_goes_only_where_it_fits(jobs, fake_servers):
    import time

    from gateway.fleet.resources import parse_reading
    from tests.fleet.test_resources import report

    small, large = fake_servers("B1"), fake_servers("B2")
    for server_id, server, gpus in (("B1", small, ((24, 20),)), ("B2", large, ((80, 10),))):
        monitor = f"http://127.0.0.1:{server.port}/monitor"
        jobs.manager.register_server(server_id, "127.0.0.1", server.port, monitor_url=monitor)
        jobs.manager.apply_readings([(server_id, monitor, parse_reading(report(gpus=gpus), time.monotonic()))])
    request = JobRequest("GET", "/api/echo", (("X-Required-GPU-Memory-GB", "30"),), b"")
    ids = [jobs.submit(NewJob(request, task_type="/api/")).job.job_id for _ in range(3)]
    assert {finished(jobs, job_id).server_id for job_id in ids} == {"B2"}
    assert not [r for r in small.requests if r["path"] == "/api/echo"]


def test_a_post_is_tried_again_on_a_server_that_keeps_idempotency_keys(jobs, fake_servers):
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port, options={"labels": {"idempotency-keys": "kept"}})
    job = submit(jobs, "POST", "/api/short-json", b"{}")
    done = finished(jobs, job.job_id)
    assert (done.status, done.attempts) == (FAILED, 3)  # a repeat is safe there: each try was a new chance
    assert [r["path"] for r in server.requests].count("/api/short-json") == 3


def test_a_pushed_job_that_runs_past_its_lease_keeps_it_and_runs_once(make_jobs, fake_servers):
    jobs = make_jobs(lease_seconds=1)  # the sweep looks every second: an unrenewed lease would run out mid-run
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port)
    job = submit(jobs, "GET", "/api/slow?delay=3")
    done = finished(jobs, job.job_id)
    assert (done.status, done.attempts, done.error) == (SUCCEEDED, 1, None)
    assert [r["path"] for r in server.requests].count("/api/slow") == 1


def test_a_round_claims_every_job_it_found_a_slot_for_in_one_call(jobs, fake_servers, monkeypatch):
    calls: list[list[tuple[str, str]]] = []
    claim_jobs = jobs.store.claim_jobs

    def counted(wanted, dispatch, lease_seconds):
        calls.append(list(wanted))
        return claim_jobs(wanted, dispatch, lease_seconds)

    monkeypatch.setattr(jobs.store, "claim_jobs", counted)
    ids = [submit(jobs, target=f"/api/echo?n={n}").job_id for n in range(4)]
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port, options={"max_concurrent": 3})
    assert {finished(jobs, job_id).status for job_id in ids} == {SUCCEEDED}
    assert calls[0] == [(job_id, "B1") for job_id in ids[:3]]  # the fourth waited for a slot
    assert wait_until(lambda: not jobs.manager.admission.in_flight, 10)


def test_a_job_taken_between_the_peek_and_the_claim_gives_its_slot_to_the_next(jobs, fake_servers, monkeypatch):
    claim_jobs, stolen = jobs.store.claim_jobs, []

    def taken_first(wanted, dispatch, lease_seconds):
        if not stolen:  # a pull worker (or another process) takes the first job just before this claim
            stolen.extend(claim_jobs(wanted[:1], PULL, 30))
        return claim_jobs(wanted, dispatch, lease_seconds)

    monkeypatch.setattr(jobs.store, "claim_jobs", taken_first)
    first, second = submit(jobs).job_id, submit(jobs).job_id
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port, options={"max_concurrent": 1})
    done = finished(jobs, second)  # the one slot was given back: with it kept, nothing could run
    assert (done.status, done.server_id) == (SUCCEEDED, "B1")
    assert stolen[0] is not None and stolen[0].job_id == first
    assert (jobs.store.get(first).status, jobs.store.get(first).dispatch) == (RUNNING, PULL)
    assert wait_until(lambda: not jobs.manager.admission.in_flight, 10)


def test_claimed_jobs_whose_runs_failed_to_start_give_their_slots_back(make_jobs, fake_servers, monkeypatch):
    jobs = make_jobs(lease_seconds=1)  # the jobs that never started are queued again when their leases run out
    failures, started = [], jobs.dispatcher.started

    def fails_once(job):
        if not failures:
            failures.append(job.job_id)
            raise RuntimeError("a start that failed")
        started(job)

    monkeypatch.setattr(jobs.dispatcher, "started", fails_once)
    ids = [submit(jobs).job_id for _ in range(2)]
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port, options={"max_concurrent": 2})
    runs = [finished(jobs, job_id) for job_id in ids]  # both slots came back: with either kept, one could not run
    assert {job.status for job in runs} == {SUCCEEDED} and {job.attempts for job in runs} == {2}
    assert wait_until(lambda: not jobs.manager.admission.in_flight, 10)


def test_a_pushed_job_logs_its_end_in_one_line_and_a_server_error_apart(jobs, fake_servers, caplog):
    caplog.set_level(logging.INFO, logger="gateway.jobs")
    server = fake_servers("B1")
    jobs.manager.register_server("B1", "127.0.0.1", server.port)
    done = finished(jobs, submit(jobs).job_id)
    broken = finished(jobs, submit(jobs, "GET", "/api/status-code?code=503").job_id)

    def lines(job_id: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if job_id in r.getMessage() and r.levelno >= logging.INFO]

    assert lines(done.job_id) == [  # as a proxied request's one line; dispatched and ran are at DEBUG
        f"job {done.job_id} queued (/api/, priority 5)",
        f"job {done.job_id} succeeded on B1 after 1 attempts (HTTP 200)",
    ]
    assert broken.status == FAILED and sum("ran on B1: HTTP 503" in line for line in lines(broken.job_id)) == 3
