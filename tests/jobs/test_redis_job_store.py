"""The Redis job store's own: several stores (as several processes) on one real redis-server.

The behaviour both stores share is tested against each in test_job_store.py; here is what only
sharing brings: one lease moved once by many sweepers, one key across processes, a job taken
through one store and ended through another, Redis going away and coming back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from conftest import wait_until

from gateway.cluster.connection import Redis, RedisUnavailable
from gateway.jobs.records import PULL, PUSH, QUEUED, RUNNING, SUCCEEDED, JobRequest, JobResult, NewJob
from gateway.jobs.redis_store import RedisJobStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_store(redis_server, clock):
    """Stores on one redis-server, each with a connection of its own, as separate processes have."""
    connections: list[Redis] = []

    def build(prefix: str = "test:", **options) -> RedisJobStore:
        connections.append(Redis(redis_server.url, prefix, timeout=1.0))
        return RedisJobStore(connections[-1], **{"clock": clock, **options})

    yield build
    for connection in connections:
        connection.close()


def new_job(body: bytes = b"{}", **options) -> NewJob:
    request = JobRequest("POST", "/api/enhance", (("Content-Type", "application/json"),), body)
    return NewJob(request, task_type=options.pop("task_type", "/api/"), **options)


def together(count: int, work: Callable[[int], object]) -> list[object]:
    """Run `work(i)` in `count` threads started at one moment; their outcomes, every one required."""
    barrier, outcomes, errors = threading.Barrier(count), [None] * count, []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            outcomes[i] = work(i)
        except Exception as exc:  # handed to the test, which fails with it
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return outcomes


def test_two_sweepers_move_each_expired_lease_once_and_count_its_attempt_once(make_store, clock):
    first, second = make_store(), make_store()
    ids = {first.submit(new_job(b"%d" % i)).job.job_id for i in range(50)}
    for round_ in range(1, 4):  # three rounds: each claims all 50, lets the leases run out, and sweeps twice at once
        claimed = first.claim_many("W1", PULL, 30, 50)
        assert {job.job_id for job in claimed} == ids and {job.attempts for job in claimed} == {round_}
        clock.now += 31
        moved = together(2, lambda i: (first, second)[i].expire_leases(max_attempts=10))
        by_first, by_second = ({job.job_id for job in jobs} for jobs in moved)  # type: ignore[union-attr]
        assert not by_first & by_second, "a lease was moved twice"
        assert by_first | by_second == ids
        for job_id in ids:
            job = second.get(job_id)
            assert (job.status, job.attempts, job.lease_token) == (QUEUED, round_, None)
        assert first.counts().by_status[QUEUED] == 50
        assert second.counts().queued_by_priority == {5: 50}


def test_a_sweep_leaves_a_lease_renewed_since_it_was_seen_expired(make_store, clock):
    store = make_store()
    store.submit(new_job())
    job = store.claim("B1", PUSH, 30)
    assert job is not None and job.lease_token
    clock.now += 31
    store.heartbeat(job.job_id, job.lease_token, 30)  # the holder renewed it: its expiry is in the future again
    assert store._requeue(job.job_id, job.lease_token, "its lease expired", 3, True, expiring=True) is None
    assert store.expire_leases(max_attempts=3) == []
    assert store.get(job.job_id).status == RUNNING


def test_two_processes_submitting_one_key_at_once_make_one_job(make_store):
    stores = [make_store() for _ in range(2)]
    outcomes = together(20, lambda i: stores[i % 2].submit(new_job(idempotency_key="same", fingerprint="f")))
    assert len({outcome.job.job_id for outcome in outcomes}) == 1  # type: ignore[union-attr]
    assert sum(outcome.created for outcome in outcomes) == 1  # type: ignore[union-attr]
    assert stores[1].counts().by_status[QUEUED] == 1


def test_a_job_submitted_through_one_store_is_seen_taken_and_ended_through_another(make_store):
    one, other = make_store(), make_store()
    submitted = one.submit(new_job(b'{"image": 1}', priority=2, callback_url="http://127.0.0.1:9/hook")).job
    seen = other.get(submitted.job_id)
    assert seen == submitted
    assert other.position(seen) == 1 and [head[0] for head in other.queue_heads()] == [submitted.job_id]
    claimed = other.claim_many("W1", PULL, 30, 5, ["/api/"])
    assert [job.job_id for job in claimed] == [submitted.job_id]
    assert one.holders(PULL) == {"W1": [submitted.job_id]}
    assert claimed[0].lease_token
    done = other.succeed(submitted.job_id, claimed[0].lease_token, JobResult(200, (("X-A", "1"),), b"ok"))
    assert done.status == SUCCEEDED
    finished = one.get(submitted.job_id)
    assert (finished.status, finished.result, finished.server_id) == (
        SUCCEEDED,
        JobResult(200, (("X-A", "1"),), b"ok"),
        "W1",
    )
    [due] = one.callbacks_due()
    assert due.job_id == submitted.job_id
    assert other.callbacks_due() == []  # taken by the first: another process does not send it too
    assert one.callback_tried(due.job_id, None, 5.0, 8) == ("delivered", 5.0)


def test_a_starting_process_takes_no_running_job_and_an_expired_lease_is_what_recovers_it(make_store, clock):
    live = make_store()
    live.submit(new_job())
    pushed = live.claim("B1", PUSH, 30)
    assert pushed is not None
    starting = make_store()
    assert starting.recover() == 0  # the job may be a live process's: it keeps its lease
    assert starting.get(pushed.job_id).status == RUNNING
    assert starting.expire_leases(max_attempts=3) == []
    clock.now += 31  # its process died: nobody renews the lease
    [requeued] = starting.expire_leases(max_attempts=3)
    assert (requeued.job_id, requeued.status, requeued.attempts) == (pushed.job_id, QUEUED, 1)


def test_without_a_clock_every_time_is_redis_own(make_store):
    store = make_store(clock=None)
    job = store.submit(new_job()).job
    assert abs(job.created_at - store.clock()) < 60  # Redis's clock and this host's: the same machine
    running = store.claim("W1", PULL, 0.2)
    assert running is not None and running.lease_expires_at is not None and running.started_at is not None
    assert running.lease_expires_at - running.started_at == pytest.approx(0.2)
    assert wait_until(lambda: store.expire_leases(max_attempts=3) != [])
    assert store.get(job.job_id).status == QUEUED


def test_every_key_is_under_the_prefix_and_two_prefixes_share_nothing(make_store, redis_server):
    ours, theirs = make_store("fleet-a:"), make_store("fleet-b:")
    ours.submit(new_job(idempotency_key="k", fingerprint="f"))
    assert theirs.counts().by_status[QUEUED] == 0 and theirs.claim("W1", PULL, 30) is None
    keys = Redis(redis_server.url, "fleet-a:")
    try:
        assert keys.client.keys("*") and all(key.startswith(b"fleet-a:jobs:") for key in keys.client.keys("*"))
    finally:
        keys.close()


def test_redis_away_is_redis_unavailable_and_back_every_job_is_still_there(make_store, redis_server):
    store = make_store()
    store.submit(new_job(b"taken"))
    running = store.claim("W1", PULL, 30)
    assert running is not None and running.lease_token
    queued = store.submit(new_job(b"kept")).job
    redis_server.kill()
    calls = [
        lambda: store.submit(new_job()),
        lambda: store.get(queued.job_id),
        lambda: store.position(queued),
        lambda: store.recent(),
        lambda: store.counts(),
        lambda: store.claim_many("W1", PULL, 30, 1),
        lambda: store.claim_job(queued.job_id, "B1", PUSH, 30),
        lambda: store.queue_heads(),
        lambda: store.holders(PULL),
        lambda: store.heartbeat(running.job_id, running.lease_token or "", 30),
        lambda: store.succeed(running.job_id, running.lease_token or "", JobResult(200, (), b"")),
        lambda: store.cancel(queued.job_id),
        lambda: store.retry(queued.job_id),
        lambda: store.callbacks_due(),
        lambda: store.expire_leases(max_attempts=3),
        lambda: store.purge(),
    ]
    for call in calls:
        with pytest.raises(RedisUnavailable):
            call()
    redis_server.start()  # the same port and append-only file
    assert store.get(queued.job_id) == queued
    assert store.get(running.job_id).status == RUNNING
    assert store.counts().by_status == {**store.counts().by_status, QUEUED: 1, RUNNING: 1}
    done = store.succeed(running.job_id, running.lease_token, JobResult(200, (), b"ok"))
    assert done.status == SUCCEEDED
    again = store.submit(new_job(b"after")).job
    assert again.seq == 3  # the sequence went on from where it was
