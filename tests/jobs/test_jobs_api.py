"""Jobs over HTTP: the gateway as deployed (gunicorn + gevent) and in-process, fake GPUs on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import requests
from conftest import SECRET, wait_until

ASYNC = {"Prefer": "respond-async"}
ADMIN = {"Authorization": f"Bearer {SECRET}"}


def register(gateway, server, server_id: str | None = None, **options) -> None:
    body = {"server_id": server_id or server.server_id, "ip": "127.0.0.1", "port": server.port, "secret": SECRET}
    requests.post(gateway.url + "/webhook/register", json={**body, **options}, timeout=5).raise_for_status()


def job_state(gateway, job_id: str) -> dict:
    return requests.get(f"{gateway.url}/jobs/{job_id}", timeout=5).json()


def finished(gateway, job_id: str, timeout: float = 15.0) -> dict:
    done = ("succeeded", "failed", "cancelled", "expired")
    assert wait_until(lambda: job_state(gateway, job_id)["status"] in done, timeout), job_state(gateway, job_id)
    return job_state(gateway, job_id)


def test_a_job_sent_with_no_gpu_up_runs_when_one_registers(gateway_process, fake_servers):
    gateway = gateway_process()
    answer = requests.post(gateway.url + "/api/enhance", json={"image": "abc"}, headers=ASYNC, timeout=5)
    assert answer.status_code == 202
    body = answer.json()
    assert answer.headers["Location"] == f"/jobs/{body['job_id']}"
    assert 1 <= int(answer.headers["Retry-After"]) <= 30
    assert (body["success"], body["status"], body["position"]) == (True, "queued", 1)
    assert body["estimated_wait_seconds"] is None
    assert "no GPU server is online" in body["message"]
    pending = requests.get(f"{gateway.url}/jobs/{body['job_id']}/result", timeout=5)
    assert pending.status_code == 202 and pending.json()["status"] == "queued"
    server = fake_servers("B1")
    register(gateway, server)
    state = finished(gateway, body["job_id"])
    assert (state["status"], state["server_id"], state["attempts"]) == ("succeeded", "B1", 1)
    assert state["created_at"] <= state["started_at"] <= state["finished_at"]
    result = requests.get(f"{gateway.url}/jobs/{body['job_id']}/result", timeout=5)
    assert result.status_code == 200
    assert result.headers["X-Backend-Server"] == "B1"
    assert result.headers["X-Job-Id"] == body["job_id"]
    task_id = result.json()["task_id"]
    # The answer named a task: it belongs to B1, as a synchronous answer's would.
    register(gateway, fake_servers("B2"))
    assert {requests.get(f"{gateway.url}/api/status/{task_id}", timeout=5).json()["server_id"] for _ in range(4)} == {
        "B1"
    }


def test_prefer_wait_answers_with_the_result_when_it_comes_in_time(live_gateway, fake_servers):
    gateway = live_gateway()
    register(gateway, fake_servers("B1"))
    answer = requests.post(
        gateway.url + "/api/echo", data=b"hello", headers={"Prefer": "respond-async, wait=10"}, timeout=15
    )
    assert answer.status_code == 200
    assert answer.json()["body"] == "hello"
    assert answer.headers["X-Job-Id"]


def test_twenty_concurrent_submissions_with_one_key_make_one_job(gateway_process, fake_servers):
    gateway = gateway_process()
    headers = {**ASYNC, "Idempotency-Key": "order-42"}

    def submit(_: int) -> requests.Response:
        return requests.post(gateway.url + "/api/echo", data=b"same", headers=headers, timeout=10)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(submit, range(20)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["job_id"] for a in answers}) == 1
    server = fake_servers("B1")
    register(gateway, server)
    finished(gateway, answers[0].json()["job_id"])
    assert [r["path"] for r in server.requests].count("/api/echo") == 1


def test_one_key_with_another_request_is_refused_with_422(live_gateway):
    gateway = live_gateway()
    headers = {**ASYNC, "Idempotency-Key": "k-1"}
    assert requests.post(gateway.url + "/api/echo", data=b"one", headers=headers, timeout=5).status_code == 202
    refused = requests.post(gateway.url + "/api/echo", data=b"two", headers=headers, timeout=5)
    assert refused.status_code == 422
    assert "Idempotency-Key" in refused.json()["message"]


def test_a_synchronous_request_with_a_key_runs_once_and_its_retry_gets_the_answer(live_gateway, fake_servers):
    gateway = live_gateway()
    server = fake_servers("B1")
    register(gateway, server)
    headers = {"Idempotency-Key": "pay-7"}
    first = requests.post(gateway.url + "/api/enhance", json={"n": 1}, headers=headers, timeout=15)
    again = requests.post(gateway.url + "/api/enhance", json={"n": 1}, headers=headers, timeout=15)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()  # the same task id: the GPU did the work once
    assert first.headers["X-Job-Id"] == again.headers["X-Job-Id"]
    assert [r["path"] for r in server.requests].count("/api/enhance") == 1


def test_jobs_run_by_priority(live_gateway, fake_servers):
    gateway = live_gateway()
    ids = []
    for priority in ("9", "0", "5"):
        headers = {**ASYNC, "X-Job-Priority": priority}
        ids.append(requests.get(f"{gateway.url}/api/echo?p={priority}", headers=headers, timeout=5).json()["job_id"])
    assert [job_state(gateway, i)["position"] for i in ids] == [3, 1, 2]
    server = fake_servers("B1")
    register(gateway, server, max_concurrent=1)
    for job_id in ids:
        finished(gateway, job_id)
    assert [r["query"]["p"] for r in server.requests if r["path"] == "/api/echo"] == ["0", "5", "9"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Prefer": "respond-async, wait=soon"}, "Prefer: wait=soon"),
        ({"Prefer": "respond-async, wait=-1"}, "0 or more seconds"),
        ({**ASYNC, "X-Job-Priority": "12"}, "X-Job-Priority"),
        ({**ASYNC, "X-Job-Priority": "high"}, "X-Job-Priority"),
        ({**ASYNC, "Idempotency-Key": "k" * 256}, "Idempotency-Key"),
        ({**ASYNC, "Idempotency-Key": "caf\u00e9".encode().decode("latin-1")}, "Idempotency-Key"),
    ],
)
def test_a_bad_job_header_is_a_400_that_names_it(live_gateway, headers, message):
    gateway = live_gateway()
    answer = requests.post(gateway.url + "/api/echo", data=b"x", headers=headers, timeout=5)
    assert answer.status_code == 400
    assert message in answer.json()["message"]
    assert requests.get(gateway.url + "/admin/jobs", headers=ADMIN, timeout=5).json()["data"]["jobs"] == []


@pytest.mark.parametrize("job_id", ["nothex", "0" * 32, "A" * 32])
def test_an_unknown_job_is_a_404(live_gateway, job_id):
    gateway = live_gateway()
    for suffix in ("", "/result"):
        answer = requests.get(f"{gateway.url}/jobs/{job_id}{suffix}", timeout=5)
        assert answer.status_code == 404
        assert "no job" in answer.json()["message"]


def test_a_cancelled_job_never_runs(live_gateway, fake_servers):
    gateway = live_gateway()
    job_id = requests.get(gateway.url + "/api/echo?cancelled=1", headers=ASYNC, timeout=5).json()["job_id"]
    cancelled = requests.delete(f"{gateway.url}/jobs/{job_id}", timeout=5)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert requests.delete(f"{gateway.url}/jobs/{job_id}", timeout=5).status_code == 409
    assert requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5).status_code == 410
    server = fake_servers("B1")
    register(gateway, server)
    later = requests.get(gateway.url + "/api/echo", headers=ASYNC, timeout=5).json()["job_id"]
    finished(gateway, later)
    assert all("cancelled" not in r["query"] for r in server.requests)


def test_queue_when_offline_turns_a_503_into_a_job(live_gateway, fake_servers):
    plain = live_gateway()
    assert requests.post(plain.url + "/api/enhance", json={}, timeout=5).status_code == 503
    gateway = live_gateway(queue_when_offline=("/api/enhance",))
    queued = requests.post(gateway.url + "/api/enhance", json={}, timeout=5)
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    assert requests.get(gateway.url + "/api/other", timeout=5).status_code == 503  # not under the prefix
    register(gateway, fake_servers("B1"))
    assert finished(gateway, queued.json()["job_id"])["status"] == "succeeded"


def test_a_full_store_answers_507_and_keeps_what_it_has(live_gateway):
    gateway = live_gateway(job_store_max_bytes=1024 * 1024)
    first = requests.post(gateway.url + "/api/echo", data=b"x" * 600_000, headers=ASYNC, timeout=5)
    assert first.status_code == 202
    full = requests.post(gateway.url + "/api/echo", data=b"y" * 600_000, headers=ASYNC, timeout=5)
    assert full.status_code == 507
    assert "full" in full.json()["message"]
    assert job_state(gateway, first.json()["job_id"])["status"] == "queued"


def test_the_operator_lists_jobs_and_queues_a_failed_one_again(live_gateway, fake_servers):
    gateway = live_gateway(job_max_attempts=1)
    server = fake_servers("B1")
    register(gateway, server)
    job_id = requests.get(gateway.url + "/api/status-code?code=500", headers=ASYNC, timeout=5).json()["job_id"]
    assert finished(gateway, job_id)["status"] == "failed"
    assert requests.get(gateway.url + "/admin/jobs", timeout=5).status_code == 401
    assert requests.get(gateway.url + "/admin/jobs?status=bogus", headers=ADMIN, timeout=5).status_code == 400
    listed = requests.get(gateway.url + "/admin/jobs?status=failed", headers=ADMIN, timeout=5).json()["data"]
    assert [job["job_id"] for job in listed["jobs"]] == [job_id]
    assert listed["counts"]["failed"] == 1
    result = requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5)
    assert result.status_code == 500  # the server's own answer, kept
    assert requests.post(f"{gateway.url}/admin/jobs/{job_id}/retry", timeout=5).status_code == 401
    again = requests.post(f"{gateway.url}/admin/jobs/{job_id}/retry", headers=ADMIN, timeout=5)
    assert again.status_code == 200
    assert finished(gateway, job_id)["attempts"] == 1
    assert [r["path"] for r in server.requests].count("/api/status-code") == 2


@pytest.mark.slow
def test_queued_jobs_survive_kill_9_and_run_after_the_restart(gateway_process, fake_servers, tmp_path):
    gateway = gateway_process()
    ids = [
        requests.post(f"{gateway.url}/api/echo?n={n}", data=b"%d" % n, headers=ASYNC, timeout=5).json()["job_id"]
        for n in range(50)
    ]
    gateway.kill()  # SIGKILL: nothing is flushed on the way out
    restarted = gateway_process()
    server = fake_servers("B1")
    register(restarted, server)
    for job_id in ids:
        assert finished(restarted, job_id, timeout=30)["status"] == "succeeded"
    ran = sorted(int(json.loads(r["query"]["n"])) for r in server.requests if r["path"] == "/api/echo")
    assert ran == list(range(50))  # every job once


def test_the_queue_shows_in_the_metrics(live_gateway, fake_servers):
    gateway = live_gateway()
    for _ in range(2):
        requests.get(gateway.url + "/api/echo", headers=ASYNC, timeout=5)
    metrics = requests.get(gateway.url + "/metrics", timeout=5).text
    assert "gateway_jobs_queued 2.0" in metrics
    assert 'gateway_jobs_total{status="queued"} 2.0' in metrics
    register(gateway, fake_servers("B1"))
    assert wait_until(lambda: "gateway_jobs_queued 0.0" in requests.get(gateway.url + "/metrics", timeout=5).text)
    assert wait_until(
        lambda: 'gateway_jobs_total{status="succeeded"} 2.0' in requests.get(gateway.url + "/metrics", timeout=5).text
    )
    metrics = requests.get(gateway.url + "/metrics", timeout=5).text
    assert "gateway_job_wait_seconds_count 2.0" in metrics
    assert "gateway_job_run_seconds_count 2.0" in metrics
    assert "gateway_job_dead_letters 0.0" in metrics


@pytest.mark.slow
def test_kill_9_with_a_thousand_queued_and_twenty_running_and_every_job_runs_once(gateway_process, fake_servers):
    """The issue's own test: a GPU that keeps Idempotency-Keys sees each job's work done once, whatever died."""
    gateway = gateway_process()
    server = fake_servers("B1", keep_keys=True)
    register(gateway, server, max_concurrent=20)
    session = requests.Session()
    running = [
        session.get(f"{gateway.url}/api/slow?delay=25&n={n}", headers=ASYNC, timeout=5).json()["job_id"]
        for n in range(20)
    ]
    assert wait_until(lambda: sum(1 for r in server.requests if r["path"] == "/api/slow") >= 20, 20)
    queued = [
        session.post(f"{gateway.url}/api/echo?n={n}", data=b"%d" % n, headers=ASYNC, timeout=5).json()["job_id"]
        for n in range(1000)
    ]
    counts = requests.get(gateway.url + "/admin/jobs?limit=1", headers=ADMIN, timeout=5).json()["data"]["counts"]
    assert (counts["running"], counts["queued"]) == (20, 1000)
    gateway.kill()  # SIGKILL, with 20 requests on the GPU and 1,000 jobs waiting
    restarted = gateway_process()
    register(restarted, server, max_concurrent=20)
    for job_id in running + queued:
        assert finished(restarted, job_id, timeout=60)["status"] == "succeeded"
    assert set(server.runs) == set(running + queued)  # the key each job went with is its id
    assert set(server.runs.values()) == {1}  # and each one's work was done once
    session.close()


def test_a_tasks_own_request_goes_to_its_owner_even_when_it_asks_to_be_a_job(live_gateway, fake_servers):
    gateway = live_gateway()
    register(gateway, fake_servers("B1"))
    task_id = requests.post(gateway.url + "/api/enhance", json={}, timeout=5).json()["task_id"]  # B1 owns it
    register(gateway, fake_servers("B2"))
    for _ in range(3):
        answer = requests.get(f"{gateway.url}/api/status/{task_id}", headers=ASYNC, timeout=5)
        assert answer.status_code == 200 and answer.json()["server_id"] == "B1"  # not a job another server ran
