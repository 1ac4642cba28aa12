"""The job stores, each on the real thing (a SQLite file, a redis-server): order, idempotency, leases, budget, crashes.

Every test that names `store` or `make_store` runs against both; the SQLite file's own matters
(restart recovery, a corrupt file, kill -9) are at the end, and Redis's own in test_redis_job_store.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from gateway.cluster.connection import Redis
from gateway.jobs.records import (
    CANCELLED,
    EXPIRED,
    FAILED,
    PULL,
    PUSH,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    IdempotencyConflict,
    JobNotFound,
    JobRequest,
    JobResult,
    NewJob,
    StaleLease,
    StoreFull,
)
from gateway.jobs.redis_store import RedisJobStore
from gateway.jobs.store import SQLiteJobStore

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path, clock):
    """Build stores of one kind on the test clock (SQLite on tmp_path, Redis on a real redis-server)."""
    built, connections = [], []

    def build(**options):
        if request.param == "sqlite":
            made = SQLiteJobStore(tmp_path / "jobs.db", clock=clock, **options)
        else:
            server = request.getfixturevalue("redis_server")
            connections.append(Redis(server.url, "test:"))
            made = RedisJobStore(connections[-1], clock=clock, **options)
        built.append(made)
        return made

    yield build
    for made in built:
        made.close()
    for connection in connections:
        connection.close()


@pytest.fixture
def store(make_store):
    return make_store()


def new_job(body: bytes = b"{}", **options) -> NewJob:
    request = JobRequest("POST", "/api/enhance", (("Content-Type", "application/json"),), body)
    return NewJob(request, task_type=options.pop("task_type", "/api/"), **options)


def test_a_submitted_job_is_queued_with_its_exact_request(store):
    submitted = store.submit(new_job(b'{"image": 1}'))
    assert submitted.created
    job = store.get(submitted.job.job_id)
    assert job.status == QUEUED
    assert job.request == JobRequest("POST", "/api/enhance", (("Content-Type", "application/json"),), b'{"image": 1}')
    assert len(job.job_id) == 32 and int(job.job_id, 16) >= 0  # 128 random bits
    assert store.position(job) == 1


def test_an_unknown_job_is_not_found(store):
    with pytest.raises(JobNotFound):
        store.get("0" * 32)


def test_jobs_run_by_priority_then_in_order(store):
    ids = {
        name: store.submit(new_job(priority=priority)).job.job_id
        for name, priority in [("a", 5), ("b", 9), ("c", 0), ("d", 5)]
    }
    assert [store.position(store.get(ids[name])) for name in "abcd"] == [2, 4, 1, 3]
    claimed = [store.claim("B1", PUSH, 30).job_id for _ in range(4)]  # type: ignore[union-attr]
    assert claimed == [ids["c"], ids["a"], ids["d"], ids["b"]]
    assert store.claim("B1", PUSH, 30) is None


def test_a_claim_takes_only_the_task_types_asked_for_and_skips_what_it_is_told(store):
    chat = store.submit(new_job(task_type="qwen3:14b")).job
    image = store.submit(new_job(task_type="/api/")).job
    assert store.claim("W1", PULL, 30, task_types=["/api/"]).job_id == image.job_id  # type: ignore[union-attr]
    assert store.claim("W1", PULL, 30, task_types=["/api/"]) is None
    assert store.claim("B1", PUSH, 30, skip=[chat.job_id]) is None
    running = store.claim("B1", PUSH, 30)
    assert running is not None and running.job_id == chat.job_id
    assert (running.status, running.server_id, running.attempts, running.dispatch) == (RUNNING, "B1", 1, PUSH)
    assert running.lease_token and running.lease_expires_at == store.clock() + 30


def test_a_batch_claim_takes_up_to_its_limit_within_its_bytes_and_matches_routes_or_models(store):
    big = [store.submit(new_job(b"x" * 10_000)).job.job_id for _ in range(3)]
    chat = store.submit(new_job(task_type="llama3", model="llama3")).job.job_id
    first = store.claim_many("W1", PULL, 30, 10, ["/api/"], max_bytes=15_000)
    assert [job.job_id for job in first] == big[:1]  # the first always, however large; the second is over
    second = store.claim_many("W1", PULL, 30, 1, ["/api/"], ["llama3"])
    assert [job.job_id for job in second] == big[1:2]
    third = store.claim_many("W1", PULL, 30, 10, models=["llama3"])
    assert [job.job_id for job in third] == [chat]  # the model only: the /api/ job stays
    assert len({job.lease_token for job in first + second + third}) == 3
    assert store.holders(PULL) == {"W1": [big[0], big[1], chat]}
    assert store.holders(PUSH) == {}
    assert [job.job_id for job in store.claim_many("W2", PULL, 30, 10, ["/api/"], ["llama3"])] == big[2:]


def test_given_jobs_are_claimed_together_each_for_its_holder_and_one_no_longer_queued_is_none(store):
    first, taken, cancelled, last = (store.submit(new_job(b"%d" % i)).job for i in range(4))
    assert store.claim_job(taken.job_id, "B9", PUSH, 30) is not None
    store.cancel(cancelled.job_id)
    wanted = [(first.job_id, "B1"), (taken.job_id, "B1"), (cancelled.job_id, "B2"), (last.job_id, "B2"), ("nope", "B1")]
    claimed = store.claim_jobs(wanted, PUSH, 30)
    assert [job and (job.job_id, job.server_id) for job in claimed] == [
        (first.job_id, "B1"), None, None, (last.job_id, "B2"), None
    ]  # fmt: skip
    ran = [job for job in claimed if job is not None]
    assert {(job.status, job.attempts, job.dispatch) for job in ran} == {(RUNNING, 1, PUSH)}
    assert all(job.lease_token and job.lease_expires_at == store.clock() + 30 for job in ran)
    assert ran[0].lease_token != ran[1].lease_token
    assert store.get(taken.job_id).server_id == "B9"  # the claim that came first stands
    assert store.counts().by_status[QUEUED] == 0
    assert store.claim_jobs([], PUSH, 30) == []


def test_one_key_with_one_request_is_one_job(store):
    first = store.submit(new_job(idempotency_key="k1", fingerprint="POST /api/enhance abc"))
    again = store.submit(new_job(idempotency_key="k1", fingerprint="POST /api/enhance abc"))
    assert first.created and not again.created
    assert again.job.job_id == first.job.job_id


def test_one_key_with_another_request_is_refused_and_stores_nothing(store):
    store.submit(new_job(idempotency_key="k1", fingerprint="one"))
    with pytest.raises(IdempotencyConflict) as refused:
        store.submit(new_job(idempotency_key="k1", fingerprint="two"))
    assert refused.value.status == 422
    assert store.counts().by_status[QUEUED] == 1


def test_a_key_is_forgotten_after_its_ttl(make_store, clock):
    store = make_store(idempotency_ttl=60)
    first = store.submit(new_job(idempotency_key="k1", fingerprint="one"))
    clock.now += 61
    later = store.submit(new_job(idempotency_key="k1", fingerprint="two"))
    assert later.created and later.job.job_id != first.job.job_id


def test_twenty_concurrent_submissions_with_one_key_make_one_job(store):
    barrier, outcomes = threading.Barrier(20), []

    def submit() -> None:
        barrier.wait(timeout=10)
        outcomes.append(store.submit(new_job(idempotency_key="same", fingerprint="f")))

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(outcomes) == 20
    assert len({outcome.job.job_id for outcome in outcomes}) == 1
    assert sum(outcome.created for outcome in outcomes) == 1
    assert store.counts().by_status[QUEUED] == 1


def test_concurrent_submissions_are_all_kept(store):
    barrier, ids = threading.Barrier(16), []

    def submit(n: int) -> None:
        barrier.wait(timeout=10)
        for i in range(25):
            ids.append(store.submit(new_job(f"{n}-{i}".encode())).job.job_id)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(set(ids)) == 400
    assert store.counts().by_status[QUEUED] == 400
    assert sorted({job.seq for job in store.recent(limit=1000)}) == list(range(1, 401))


def test_over_the_budget_a_job_is_refused_with_507_and_nothing_is_stored(make_store):
    store = make_store(max_bytes=4096)
    store.submit(new_job(b"x" * 2000))
    with pytest.raises(StoreFull) as full:
        store.submit(new_job(b"x" * 2000))
    assert full.value.status == 507
    assert store.counts().by_status[QUEUED] == 1


def test_a_heartbeat_extends_the_lease_and_a_stale_token_changes_nothing(store, clock):
    store.submit(new_job())
    job = store.claim("W1", PULL, 30)
    assert job is not None and job.lease_token
    clock.now += 20
    assert store.heartbeat(job.job_id, job.lease_token, 30).lease_expires_at == clock.now + 30
    with pytest.raises(StaleLease) as stale:
        store.heartbeat(job.job_id, "not-the-token", 30)
    assert stale.value.status == 409
    with pytest.raises(StaleLease):
        store.succeed(job.job_id, "not-the-token", JobResult(200, (), b"x"))
    assert store.get(job.job_id).status == RUNNING


def test_an_expired_lease_goes_back_to_the_queue_and_the_late_worker_gets_409(store, clock):
    store.submit(new_job())
    first = store.claim("W1", PULL, 30)
    assert first is not None and first.lease_token
    clock.now += 31
    [requeued] = store.expire_leases(max_attempts=3)
    assert (requeued.status, requeued.attempts, requeued.error) == (QUEUED, 1, "its lease expired")
    second = store.claim("W2", PULL, 30)
    assert second is not None and second.attempts == 2 and second.server_id == "W2"
    with pytest.raises(StaleLease):
        store.succeed(first.job_id, first.lease_token, JobResult(200, (), b"late"))
    assert second.lease_token
    done = store.succeed(second.job_id, second.lease_token, JobResult(200, (("X-A", "1"),), b"ok"))
    assert done.status == SUCCEEDED and done.result == JobResult(200, (("X-A", "1"),), b"ok")


def test_a_job_out_of_attempts_is_a_dead_letter(store, clock):
    store.submit(new_job())
    for _ in range(3):
        job = store.claim("W1", PULL, 30)
        assert job is not None
        clock.now += 31
        store.expire_leases(max_attempts=3)
    dead = store.recent()[0]
    assert (dead.status, dead.attempts) == (FAILED, 3)
    assert dead.error == "its lease expired (after 3 attempts)"
    assert store.claim("W1", PULL, 30) is None


def test_a_retryable_failure_requeues_and_a_final_one_fails(store):
    store.submit(new_job())
    job = store.claim("B1", PUSH, 30)
    assert job is not None and job.lease_token
    assert store.fail(job.job_id, job.lease_token, "HTTP 503", retry=True, max_attempts=3).status == QUEUED
    job = store.claim("B1", PUSH, 30)
    assert job is not None and job.lease_token
    failed = store.fail(job.job_id, job.lease_token, "connection broken after sending", retry=False, max_attempts=3)
    assert (failed.status, failed.error, failed.attempts) == (FAILED, "connection broken after sending", 2)


def test_a_release_after_a_failed_connect_does_not_count_an_attempt(store):
    store.submit(new_job())
    job = store.claim("B1", PUSH, 30)
    assert job is not None and job.lease_token
    back = store.release(job.job_id, job.lease_token, "connection refused")
    assert (back.status, back.attempts, back.server_id, back.error) == (QUEUED, 0, None, "connection refused")


def test_a_cancelled_job_never_runs_and_a_cancel_while_running_stands(store):
    queued = store.submit(new_job()).job
    before, after = store.cancel(queued.job_id)
    assert (before.status, after.status) == (QUEUED, CANCELLED)
    assert store.claim("B1", PUSH, 30) is None
    store.submit(new_job())
    running = store.claim("B1", PUSH, 30)
    assert running is not None and running.lease_token
    before, after = store.cancel(running.job_id)
    assert (before.status, before.server_id, after.status) == (RUNNING, "B1", CANCELLED)
    assert store.heartbeat(running.job_id, running.lease_token, 30).status == CANCELLED  # the worker is told
    assert store.succeed(running.job_id, running.lease_token, JobResult(200, (), b"")).status == CANCELLED


def test_a_failed_job_can_be_queued_again(store):
    store.submit(new_job())
    job = store.claim("B1", PUSH, 30)
    assert job is not None and job.lease_token
    store.fail(job.job_id, job.lease_token, "boom", retry=False, max_attempts=3)
    again = store.retry(job.job_id)
    assert (again.status, again.attempts, again.error) == (QUEUED, 0, None)
    with pytest.raises(StaleLease):
        store.retry(job.job_id)  # queued: nothing to retry


def test_old_queued_jobs_expire_and_old_results_go(make_store, clock):
    store = make_store(queue_ttl=100, result_ttl=50)
    store.submit(new_job(b"y" * 1000))
    done = store.claim("B1", PUSH, 30)
    waiting = store.submit(new_job()).job
    assert done is not None and done.lease_token
    store.succeed(done.job_id, done.lease_token, JobResult(200, (), b"z" * 1000))
    stored = store.counts().stored_bytes
    clock.now += 101
    assert store.purge() == (1, 1)  # one expired, one (finished 101 s ago) deleted
    assert store.get(waiting.job_id).status == EXPIRED
    with pytest.raises(JobNotFound):
        store.get(done.job_id)
    assert store.counts().stored_bytes < stored - 2000


def test_a_submissions_place_is_counted_right_through_every_change_of_the_queue(store, clock):
    """The place a 202 tells is kept in memory: after claims, requeues, cancels, retries and expiry it still
    matches the table, and a new job's place is one behind every queued job of its priority or a lower one."""
    ids = [store.submit(new_job(priority=p)).job.job_id for p in (5, 5, 2, 9, 5, 0)]
    claimed = store.claim("B1", PUSH, 30)
    assert claimed is not None and claimed.lease_token
    store.release(claimed.job_id, claimed.lease_token, "refused")  # back
    taken = store.claim_many("W1", PULL, 30, 2)
    store.cancel(ids[0])
    store.fail(taken[0].job_id, taken[0].lease_token or "", "boom", retry=False, max_attempts=3)
    store.retry(taken[0].job_id)
    clock.now += 31
    store.expire_leases(max_attempts=3)
    for priority in range(10):
        submitted = store.submit(new_job(priority=priority))
        assert submitted.position == store.position(submitted.job)
    if isinstance(store, SQLiteJobStore):  # its counts in memory match the table's
        assert store._queued_counts == {p: n for p, n in store.counts().queued_by_priority.items()}


# -- the SQLite file's own ------------------------------------------------------------------


def test_after_a_restart_pushed_jobs_are_queued_again_and_pulled_ones_keep_their_lease(tmp_path, clock):
    path = tmp_path / "jobs.db"
    store = SQLiteJobStore(path, clock=clock)
    for _ in range(3):
        store.submit(new_job())
    pushed, pulled = store.claim("B1", PUSH, 30), store.claim("W1", PULL, 30)
    assert pushed is not None and pulled is not None
    store.close()
    reopened = SQLiteJobStore(path, clock=clock)
    assert reopened.recover() == 1
    assert (reopened.get(pushed.job_id).status, reopened.get(pushed.job_id).attempts) == (QUEUED, 0)
    assert reopened.get(pulled.job_id).status == RUNNING
    assert reopened.counts().by_status[QUEUED] == 2
    new = reopened.submit(new_job()).job
    assert new.seq == 4  # the order goes on after the stored jobs
    reopened.close()


def test_a_corrupt_file_is_moved_aside(tmp_path, clock):
    path = tmp_path / "jobs.db"
    path.write_bytes(b"this is not a database" * 100)
    store = SQLiteJobStore(path, clock=clock)
    assert store.counts().by_status[QUEUED] == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("jobs.db.corrupt")]
    store.close()


def test_an_acknowledged_job_survives_kill_9(tmp_path):
    """A child submits jobs and says each id once submit returned; killed, every id it said is there."""
    path = tmp_path / "jobs.db"
    child = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from gateway.jobs.records import JobRequest, NewJob
        from gateway.jobs.store import SQLiteJobStore
        store = SQLiteJobStore({str(path)!r})
        for i in range(100000):
            job = store.submit(NewJob(JobRequest("POST", "/api/x", (), b"%d" % i), task_type="/api/")).job
            print(job.job_id, flush=True)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    acknowledged = [process.stdout.readline().strip() for _ in range(200)]
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    process.stdout.close()
    store = SQLiteJobStore(path)
    try:
        for job_id in acknowledged:
            assert store.get(job_id).status == QUEUED
    finally:
        store.close()


def test_under_gevent_waiting_callers_share_a_commit_and_a_killed_leader_stalls_nobody(tmp_path):
    """A child under gevent: 50 submissions at once take a few trips to the thread pool, not 50;
    the caller that leads a commit is killed in it, and every other submission is still stored."""
    path = tmp_path / "jobs.db"
    child = textwrap.dedent(
        f"""
        from gevent import monkey
        monkey.patch_all()
        import json, sys
        import gevent
        sys.path.insert(0, {str(ROOT)!r})
        import gateway.jobs.group_commit as commits
        from gateway.jobs.records import JobRequest, NewJob
        from gateway.jobs.store import SQLiteJobStore
        trips = []
        def counted(func, *args):
            trips.append(func.__name__)
            return off(func, *args)
        off, commits.off_the_event_loop = commits.off_the_event_loop, counted
        store = SQLiteJobStore({str(path)!r})
        def submit(i):
            return store.submit(NewJob(JobRequest("POST", "/api/x", (), b"%d" % i), task_type="/api/")).job.job_id
        together = [gevent.spawn(submit, i) for i in range(50)]
        gevent.joinall(together, timeout=30)
        shared = len(trips)
        leader = gevent.spawn(submit, 50)
        gevent.sleep(0)  # it leads: its commit is in a pool thread now
        others = [gevent.spawn(submit, i) for i in range(51, 71)]
        gevent.sleep(0)  # they wait for it
        leader.kill()
        gevent.joinall(others, timeout=30)
        stored = [g.value for g in together + others if g.successful()]
        print(json.dumps({{"shared": shared, "stored": stored, "unfinished": sum(not g.ready() for g in others)}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=True).stdout
    seen = json.loads(out)
    assert 1 <= seen["shared"] <= 10, seen["shared"]  # one leader's trip per commit; the others waited for it
    assert seen["unfinished"] == 0 and len(seen["stored"]) == 70
    store = SQLiteJobStore(path)
    try:
        assert all(store.get(job_id).status == QUEUED for job_id in seen["stored"])
    finally:
        store.close()
