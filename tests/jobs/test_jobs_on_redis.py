"""Jobs with REDIS_URL: two gateways in this process share one real redis-server, as two processes or hosts do.

A job submitted at one is run by the other's pull worker or pushed by the other's dispatcher,
also when the first is gone; a client waiting at one sees the other finish it; with Redis away
every job call is a 503 with Retry-After, never a 500; and gunicorn's two workers keep one queue.
"""

from __future__ import annotations

import base64
import concurrent.futures
import time

import pytest
import requests
from conftest import SECRET, wait_until

from gateway.cluster.connection import Redis
from gateway.jobs import service
from gateway.jobs.records import PUSH, QUEUED
from gateway.jobs.redis_store import RedisJobStore

ASYNC = {"Prefer": "respond-async"}
WORKER = {"Authorization": f"Bearer {SECRET}"}
CHAT = {"model": "llama3.1", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def gateway_on_redis(redis_server, live_gateway, tmp_path):  # Redis first: it outlives the gateways
    """Start gateways on the test's redis-server, each with files of its own, listening for the others' wakes."""
    started = []

    def start(**overrides):
        name = f"g{len(started)}"
        gateway = live_gateway(
            redis_url=redis_server.url,
            redis_prefix="test:",
            backend_servers_file=str(tmp_path / f"{name}-servers.json"),
            task_affinity_file=str(tmp_path / f"{name}-affinity.db"),
            job_store_file=str(tmp_path / f"{name}-jobs.db"),
            **overrides,
        )
        assert isinstance(gateway.app.extensions["jobs"].store, RedisJobStore)
        assert wait_until(lambda: gateway.app.extensions["jobs"].wakes.listening.is_set())
        started.append(gateway)
        return gateway

    return start


def submit(gateway, path: str = "/api/echo", headers=None, timeout: float = 5) -> requests.Response:
    return requests.post(gateway.url + path, data=b"hello", headers={**ASYNC, **(headers or {})}, timeout=timeout)


def job_state(gateway, job_id: str) -> dict:
    return requests.get(f"{gateway.url}/jobs/{job_id}", timeout=5).json()


def lease(gateway, wait_seconds: int = 0) -> requests.Response:
    body = {"worker_id": "W1", "routes": ["/api/"], "wait_seconds": wait_seconds}
    return requests.post(gateway.url + "/workers/lease", json=body, headers=WORKER, timeout=wait_seconds + 10)


def polling(gateway) -> bool:
    listed = requests.get(gateway.url + "/admin/workers", headers=WORKER, timeout=5).json()["data"]["workers"]
    return any(row["worker_id"] == "W1" and row["polling"] for row in listed)


def test_a_job_submitted_at_one_gateway_is_done_by_a_worker_polling_another(gateway_on_redis, monkeypatch):
    a, b = gateway_on_redis(), gateway_on_redis()
    # Only the wakes through Redis may end these waits early: no long poll claims again, no wait reads again.
    b.app.extensions["jobs"].workers.recheck = None
    monkeypatch.setattr(service, "WAIT_POLL", 600.0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        poll = pool.submit(lease, b, 25)  # waiting at B before the job exists: woken by A's wake
        assert wait_until(lambda: polling(b))
        waiting = pool.submit(submit, a, headers={"Prefer": "respond-async, wait=25"}, timeout=40)
        leased = poll.result(timeout=40)
        assert leased.status_code == 200, leased.text
        [job] = leased.json()["jobs"]
        answer = {
            "lease_token": job["lease_token"],
            "status": 200,
            "headers": [["Content-Type", "text/plain"]],
            "body": base64.b64encode(b"done at B").decode(),
        }
        completed = requests.post(f"{b.url}/jobs/{job['job_id']}/complete", json=answer, headers=WORKER, timeout=10)
        assert completed.status_code == 200, completed.text
        answered = waiting.result(timeout=40)  # the client waiting at A: woken by B's finish
    assert answered.status_code == 200 and answered.content == b"done at B"
    assert answered.headers["X-Job-Id"] == job["job_id"] and answered.headers["X-Backend-Server"] == "W1"
    assert job_state(a, job["job_id"])["status"] == "succeeded"


def test_a_job_submitted_at_one_gateway_is_pushed_by_another_to_its_server(gateway_on_redis, fake_servers):
    a, b = gateway_on_redis(), gateway_on_redis()
    server = fake_servers("B1")
    b.manager.register_server("B1", "127.0.0.1", server.port)  # the fleet is not shared yet: B alone has it
    accepted = submit(a)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert wait_until(lambda: job_state(a, job_id)["status"] == "succeeded")
    result = requests.get(f"{a.url}/jobs/{job_id}/result", timeout=5)
    assert result.status_code == 200 and result.headers["X-Backend-Server"] == "B1"
    assert [r["path"] for r in server.requests].count("/api/echo") == 1


def test_a_job_whose_gateway_is_gone_is_run_by_another(gateway_on_redis, fake_servers):
    a, b = gateway_on_redis(), gateway_on_redis()
    job_id = submit(a).json()["job_id"]
    a.stop()
    a.app.extensions["gateway_shutdown"]()  # A is gone before any server came
    server = fake_servers("B1")
    b.manager.register_server("B1", "127.0.0.1", server.port)
    assert wait_until(lambda: job_state(b, job_id)["status"] == "succeeded")
    assert job_state(b, job_id)["server_id"] == "B1"


def test_a_job_left_running_by_a_dead_gateway_is_queued_again_by_another_when_its_lease_runs_out(
    gateway_on_redis, fake_servers
):
    a, b = gateway_on_redis(), gateway_on_redis()
    job_id = submit(a).json()["job_id"]
    store: RedisJobStore = a.app.extensions["jobs"].store
    a.app.extensions["jobs"].stop()  # A's dispatcher and sweeps stop, as a process that died: nothing renews
    taken = store.claim_job(job_id, "B9", PUSH, lease_seconds=1)  # what A's dispatcher had taken when it died
    assert taken is not None and taken.attempts == 1
    assert b.app.extensions["jobs"].store.recover() == 0  # B starting takes nothing that may be alive
    assert job_state(b, job_id)["status"] == "running"
    server = fake_servers("B1")
    b.manager.register_server("B1", "127.0.0.1", server.port)
    assert wait_until(lambda: job_state(b, job_id)["status"] == "succeeded")  # B's sweep, then B's dispatcher
    state = job_state(b, job_id)
    assert (state["server_id"], state["attempts"]) == ("B1", 2)


def test_with_redis_away_every_job_call_is_a_503_with_retry_after(gateway_on_redis, redis_server):
    gateway = gateway_on_redis()
    job_id = submit(gateway).json()["job_id"]
    redis_server.kill()
    calls = [
        lambda: submit(gateway),  # a proxied request as a job: the fast path, outside Flask's handlers
        lambda: requests.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=ASYNC, timeout=5),
        lambda: requests.get(f"{gateway.url}/jobs/{job_id}", timeout=5),
        lambda: requests.delete(f"{gateway.url}/jobs/{job_id}", timeout=5),
        lambda: requests.post(f"{gateway.url}/admin/jobs/{job_id}/retry", headers=WORKER, timeout=5),
        lambda: requests.get(f"{gateway.url}/admin/jobs", headers=WORKER, timeout=5),
        lambda: lease(gateway),
    ]
    for call in calls:
        answer = call()
        assert answer.status_code == 503, (answer.request.method, answer.request.url, answer.text)
        assert answer.headers["Retry-After"] == "2"
        body = answer.json()
        assert body.get("success") is False or "error" in body  # the LLM routes answer in their API's shape
    scraped = requests.get(gateway.url + "/metrics", timeout=5)  # what an outage looks like is still told
    assert scraped.status_code == 200 and "gateway_jobs_queued" not in scraped.text
    redis_server.start()
    assert wait_until(lambda: gateway.app.extensions["jobs"].wakes.listening.is_set())
    assert job_state(gateway, job_id)["status"] == "queued"
    assert "gateway_jobs_queued 1.0" in requests.get(gateway.url + "/metrics", timeout=5).text
    assert submit(gateway).status_code == 202


def test_two_gateways_keep_one_queue_in_order(gateway_on_redis):
    a, b = gateway_on_redis(), gateway_on_redis()
    ids = [
        submit(gateway, headers={"X-Job-Priority": str(p)}).json()["job_id"] for gateway, p in ((a, 7), (b, 2), (a, 4))
    ]
    assert [job_state(b, job_id)["position"] for job_id in ids] == [3, 1, 2]
    leased = requests.post(
        b.url + "/workers/lease",
        json={"worker_id": "W1", "routes": ["/api/"], "max_jobs": 3},
        headers=WORKER,
        timeout=10,
    )
    assert [job["job_id"] for job in leased.json()["jobs"]] == [ids[1], ids[2], ids[0]]
    assert {job_state(a, job_id)["status"] for job_id in ids} == {"running"}
    assert a.app.extensions["jobs"].store.counts().by_status[QUEUED] == 0


def test_a_wake_reaches_every_other_process_and_after_an_outage_the_listener_is_back(redis_server):
    from gateway.jobs.wakes import WAKE_QUEUED, JobWakes, Wake

    connections = [Redis(redis_server.url, "test:") for _ in range(2)]
    here, there = (JobWakes(connection) for connection in connections)
    heard: dict[str, list] = {"here": [], "there": []}
    reconnects: list[str] = []
    here.start(heard["here"].append, lambda: reconnects.append("here"))
    there.start(heard["there"].append, lambda: reconnects.append("there"))
    try:
        assert wait_until(lambda: here.listening.is_set() and there.listening.is_set())
        wake = Wake(WAKE_QUEUED, "0" * 32, "/api/", None, 1 << 30)
        here.publish(wake)
        assert wait_until(lambda: heard["there"] == [wake])
        assert heard["here"] == []  # its own wake: it woke this process already
        redis_server.kill()
        assert wait_until(lambda: not there.listening.is_set())
        here.publish(wake)  # lost, and dropped without an error: the rounds catch it
        redis_server.start()
        assert wait_until(lambda: sorted(reconnects) == ["here", "there"])  # each looks at everything once
        there.publish(Wake("finished", "1" * 32))
        assert wait_until(lambda: [w.job_id for w in heard["here"]] == ["1" * 32])
    finally:
        here.stop()
        there.stop()
        for connection in connections:
            connection.close()


def test_under_gunicorn_two_workers_keep_one_queue_and_each_job_runs_once(gateway_process, redis_server):
    gateway = gateway_process(REDIS_URL=redis_server.url, REDIS_PREFIX="test:", GATEWAY_WORKERS="2")
    ids = [submit(gateway, f"/api/echo?n={n}").json()["job_id"] for n in range(20)]  # to either process
    leased: list[dict] = []
    deadline = time.monotonic() + 30
    while len(leased) < 20 and time.monotonic() < deadline:  # each lease to either process, too
        answer = requests.post(
            gateway.url + "/workers/lease",
            json={"worker_id": "W1", "routes": ["/api/"], "max_jobs": 3, "wait_seconds": 1},
            headers=WORKER,
            timeout=15,
        )
        if answer.status_code == 200:
            leased.extend(answer.json()["jobs"])
    assert sorted(job["job_id"] for job in leased) == sorted(ids)  # every job, each once
    for job in leased:
        answer = {"lease_token": job["lease_token"], "status": 200, "headers": [], "body": ""}
        done = requests.post(f"{gateway.url}/jobs/{job['job_id']}/complete", json=answer, headers=WORKER, timeout=10)
        assert done.status_code == 200, done.text
    assert {job_state(gateway, job_id)["status"] for job_id in ids} == {"succeeded"}
