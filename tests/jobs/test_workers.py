"""Pull workers over HTTP: lease, heartbeat, complete, fail; the gateway as deployed and in-process."""

from __future__ import annotations

import base64
import concurrent.futures
import socket

import pytest
import requests
from conftest import SECRET, wait_until

from gateway.jobs.records import JobRequest, NewJob

ASYNC = {"Prefer": "respond-async"}
WORKER = {"Authorization": f"Bearer {SECRET}"}  # WORKER_TOKEN unset: the webhook secret, as a Bearer token
ADMIN = WORKER
WORKER_TOKEN = "worker-token-9c1d5e7a2b"


def lease(gateway, worker_id: str = "W1", headers=WORKER, **body) -> requests.Response:
    body = {name: value for name, value in {"worker_id": worker_id, "routes": ["/api/"], **body}.items() if value}
    timeout = float(body.get("wait_seconds", 0)) + 10
    return requests.post(gateway.url + "/workers/lease", json=body, headers=headers, timeout=timeout)


def submit(gateway, path: str = "/api/echo", data: bytes = b"hello", headers=None) -> str:
    answer = requests.post(gateway.url + path, data=data, headers={**ASYNC, **(headers or {})}, timeout=5)
    assert answer.status_code == 202, answer.text
    return answer.json()["job_id"]


def call(gateway, job_id: str, action: str, auth=WORKER, **body) -> requests.Response:
    return requests.post(f"{gateway.url}/jobs/{job_id}/{action}", json=body, headers=auth, timeout=10)


def complete(gateway, job, status: int = 200, body: bytes = b'{"done": true}', **extra) -> requests.Response:
    answer = {
        "lease_token": job["lease_token"],
        "status": status,
        "headers": [["Content-Type", "application/json"], ["X-Worker", "W1"]],
        "body": base64.b64encode(body).decode(),
        **extra,
    }
    return call(gateway, job["job_id"], "complete", **answer)


def job_state(gateway, job_id: str) -> dict:
    return requests.get(f"{gateway.url}/jobs/{job_id}", timeout=5).json()


def workers(gateway) -> dict[str, dict]:
    listed = requests.get(gateway.url + "/admin/workers", headers=ADMIN, timeout=5)
    assert listed.status_code == 200, listed.text
    return {row["worker_id"]: row for row in listed.json()["data"]["workers"]}


def polling(gateway, worker_id: str) -> bool:
    return workers(gateway).get(worker_id, {}).get("polling", False)


# -- leasing -----------------------------------------------------------------------------------


def test_a_long_poll_returns_a_job_submitted_after_it_began(gateway_process):
    gateway = gateway_process()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lease, gateway, wait_seconds=30)
        assert wait_until(lambda: polling(gateway, "W1")), workers(gateway)
        assert not waiting.done()
        job_id = submit(gateway)
        answer = waiting.result(timeout=40)
    assert answer.status_code == 200, answer.text
    assert [job["job_id"] for job in answer.json()["jobs"]] == [job_id]
    state = job_state(gateway, job_id)
    assert (state["status"], state["server_id"], state["attempts"]) == ("running", "W1", 1)


def test_ten_waiting_workers_take_ten_jobs_each_once(gateway_process):
    gateway = gateway_process()
    names = [f"W{n}" for n in range(10)]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        polls = [pool.submit(lease, gateway, name, wait_seconds=30) for name in names]
        assert wait_until(lambda: all(polling(gateway, name) for name in names)), workers(gateway)
        ids = {submit(gateway, f"/api/echo?n={n}") for n in range(10)}
        answers = [poll.result(timeout=40) for poll in polls]
    assert [answer.status_code for answer in answers] == [200] * 10
    leased = [job["job_id"] for answer in answers for job in answer.json()["jobs"]]
    assert sorted(leased) == sorted(ids)  # every job once: none lost, none leased twice
    assert {job_state(gateway, job_id)["server_id"] for job_id in ids} == set(names)


@pytest.mark.parametrize("wait", [0, 0.5])
def test_an_empty_queue_answers_204_after_the_wait(live_gateway, wait):
    gateway = live_gateway()
    answer = lease(gateway, wait_seconds=wait)
    assert (answer.status_code, answer.content) == (204, b"")


def test_each_job_comes_in_seed_004s_envelope(live_gateway):
    gateway = live_gateway()
    job_id = submit(gateway, "/api/enhance?size=2", b"\x00\xffimage", {"X-Custom": "kept", "Content-Type": "image/x"})
    answer = lease(gateway)
    assert answer.status_code == 200
    reply = answer.json()
    assert (reply["success"], reply["lease_seconds"]) == (True, 30)
    [job] = reply["jobs"]
    assert (job["type"], job["version"], job["request_id"], job["job_id"]) == ("task", 1, job_id, job_id)
    assert (job["task_type"], job["model"], job["attempt"]) == ("/api/", None, 1)
    assert job["lease_token"] and job["lease_expires_at"] > job_state(gateway, job_id)["started_at"]
    payload = job["payload"]
    assert (payload["method"], payload["target"]) == ("POST", "/api/enhance?size=2")
    assert base64.b64decode(payload["body"]) == b"\x00\xffimage"
    assert ["X-Custom", "kept"] in payload["headers"]
    assert ["Content-Type", "image/x"] in payload["headers"]


def test_max_jobs_bounds_a_lease_and_jobs_come_by_priority(live_gateway):
    gateway = live_gateway()
    low = submit(gateway, headers={"X-Job-Priority": "9"})
    high = submit(gateway, headers={"X-Job-Priority": "0"})
    middle = submit(gateway)
    answer = lease(gateway, max_jobs=2)
    assert [job["job_id"] for job in answer.json()["jobs"]] == [high, middle]
    tokens = {job["lease_token"] for job in answer.json()["jobs"]}
    assert len(tokens) == 2  # each job its own fencing token
    assert [job["job_id"] for job in lease(gateway, max_jobs=100).json()["jobs"]] == [low]


def test_routes_match_the_task_type_and_models_the_model(live_gateway):
    gateway = live_gateway()
    service = gateway.app.extensions["jobs"]
    request = JobRequest("POST", "/v1/chat/completions", (), b'{"model": "llama3"}')
    llm_job = service.submit(NewJob(request, task_type="llama3", model="llama3")).job
    api_job = submit(gateway)
    assert lease(gateway, "M1", routes=None, models=["mistral"]).status_code == 204
    by_model = lease(gateway, "M1", routes=None, models=["llama3"], max_jobs=10).json()["jobs"]
    assert [job["job_id"] for job in by_model] == [llm_job.job_id]
    assert by_model[0]["model"] == "llama3"
    assert [job["job_id"] for job in lease(gateway, "R1", max_jobs=10).json()["jobs"]] == [api_job]


def test_a_job_a_worker_took_is_not_pushed_too(live_gateway, fake_servers):
    gateway = live_gateway()
    pulled = submit(gateway, "/api/echo?pulled=1")
    assert lease(gateway).status_code == 200
    server = fake_servers("B1")
    gateway.register(server)
    pushed = submit(gateway, "/api/echo?pushed=1")
    assert wait_until(lambda: job_state(gateway, pushed)["status"] == "succeeded")
    assert job_state(gateway, pulled)["status"] == "running"
    assert [r["query"] for r in server.requests if r["path"] == "/api/echo"] == [{"pushed": "1"}]


def test_too_many_long_polls_are_refused_with_503(live_gateway):
    gateway = live_gateway(worker_max_long_polls=1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lease, gateway, wait_seconds=30)
        assert wait_until(lambda: polling(gateway, "W1"))
        refused = lease(gateway, "W2", wait_seconds=1)
        assert refused.status_code == 503
        assert "WORKER_MAX_LONG_POLLS" in refused.json()["message"]
        assert refused.headers["Retry-After"] == "1"
        job_id = submit(gateway)  # ends the open poll
        assert [job["job_id"] for job in waiting.result(timeout=40).json()["jobs"]] == [job_id]
    assert lease(gateway, "W2").status_code == 204  # its slot is free again


def test_a_worker_that_hung_up_is_handed_no_job(gateway_process):
    gateway = gateway_process()
    body = b'{"worker_id": "W1", "routes": ["/api/"], "wait_seconds": 30}'
    head = (
        f"POST /workers/lease HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SECRET}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        assert wait_until(lambda: polling(gateway, "W1"))
    job_id = submit(gateway)  # wakes W1's poll, whose connection is closed
    answer = lease(gateway, "W2", wait_seconds=10)
    assert answer.status_code == 200
    assert [job["job_id"] for job in answer.json()["jobs"]] == [job_id]


# -- heartbeat, complete, fail -----------------------------------------------------------------


def test_a_completed_job_wakes_its_waiting_client_and_counts_in_the_metrics(live_gateway):
    gateway = live_gateway()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waits = {"Prefer": "respond-async, wait=30"}
        client = pool.submit(requests.post, gateway.url + "/api/echo", data=b"x", headers=waits, timeout=40)
        jobs = lease(gateway, wait_seconds=30).json()["jobs"]
        done = complete(gateway, jobs[0], status=201, body=b'{"made": 1}')
        answer = client.result(timeout=40)
    assert done.status_code == 200
    held = done.json()
    assert (held["status"], held["cancelled"], held["lease_expires_at"]) == ("succeeded", False, None)
    assert (answer.status_code, answer.json(), answer.headers["X-Worker"]) == (201, {"made": 1}, "W1")
    assert answer.headers["X-Backend-Server"] == "W1"
    result = requests.get(f"{gateway.url}/jobs/{jobs[0]['job_id']}/result", timeout=5)
    assert (result.status_code, result.content) == (201, b'{"made": 1}')
    metrics = requests.get(gateway.url + "/metrics", timeout=5).text
    assert 'gateway_jobs_total{status="succeeded"} 1.0' in metrics
    assert "gateway_job_run_seconds_count 1.0" in metrics
    assert "gateway_job_wait_seconds_count 1.0" in metrics
    again = call(gateway, jobs[0]["job_id"], "complete", lease_token=jobs[0]["lease_token"], status=200)
    assert again.status_code == 409  # once only


def test_a_heartbeat_extends_the_lease(live_gateway):
    gateway = live_gateway()
    submit(gateway)
    [job] = lease(gateway).json()["jobs"]
    beat = call(gateway, job["job_id"], "heartbeat", lease_token=job["lease_token"])
    assert beat.status_code == 200
    reply = beat.json()
    assert (reply["status"], reply["cancelled"], reply["attempts"]) == ("running", False, 1)
    assert reply["lease_expires_at"] > job["lease_expires_at"]
    assert workers(gateway)["W1"]["last_heartbeat_at"] is not None


@pytest.mark.slow
def test_an_expired_lease_goes_to_another_worker_and_the_late_complete_gets_409(gateway_process):
    gateway = gateway_process(JOB_LEASE_SECONDS="1")
    job_id = submit(gateway)
    [first] = lease(gateway, "W1").json()["jobs"]
    # W1 sends no heartbeat: its lease runs out, the sweep queues the job again, W2's poll wakes.
    answer = lease(gateway, "W2", wait_seconds=30)
    assert answer.status_code == 200, answer.text
    [second] = answer.json()["jobs"]
    assert (second["job_id"], second["attempt"]) == (job_id, 2)
    assert second["lease_token"] != first["lease_token"]
    late = complete(gateway, first)
    assert late.status_code == 409
    assert "lease" in late.json()["message"]
    assert call(gateway, job_id, "heartbeat", lease_token=first["lease_token"]).status_code == 409
    assert call(gateway, job_id, "fail", lease_token=first["lease_token"], error="x", retry=True).status_code == 409
    state = job_state(gateway, job_id)
    assert (state["status"], state["server_id"], state["attempts"]) == ("running", "W2", 2)  # nothing changed
    assert complete(gateway, second, body=b"from W2").status_code == 200
    assert requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5).content == b"from W2"
    assert "gateway_job_lease_expired_total 1.0" in requests.get(gateway.url + "/metrics", timeout=5).text


@pytest.mark.slow
def test_a_lease_that_keeps_running_out_ends_a_dead_letter(gateway_process):
    gateway = gateway_process(JOB_LEASE_SECONDS="1", JOB_MAX_ATTEMPTS="2")
    job_id = submit(gateway)
    assert lease(gateway, "W1").status_code == 200
    assert lease(gateway, "W1", wait_seconds=30).json()["jobs"][0]["attempt"] == 2
    assert wait_until(lambda: job_state(gateway, job_id)["status"] == "failed", timeout=20)
    state = job_state(gateway, job_id)
    assert "its lease expired (after 2 attempts)" in state["error"]


def test_a_fail_with_retry_queues_the_job_again_until_its_attempts_are_spent(live_gateway):
    gateway = live_gateway(job_max_attempts=2)
    job_id = submit(gateway)
    [job] = lease(gateway).json()["jobs"]
    again = call(gateway, job_id, "fail", lease_token=job["lease_token"], error="CUDA out of memory", retry=True)
    assert again.status_code == 200
    assert (again.json()["status"], again.json()["attempts"]) == ("queued", 1)
    assert job_state(gateway, job_id)["error"] == "CUDA out of memory"
    [job] = lease(gateway, "W2").json()["jobs"]
    assert job["attempt"] == 2
    failed = call(
        gateway,
        job_id,
        "fail",
        lease_token=job["lease_token"],
        error="HTTP 500",
        retry=True,
        status=500,
        body=base64.b64encode(b"oops").decode(),
    )
    assert failed.json()["status"] == "failed"  # out of attempts: a dead letter
    result = requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5)
    assert (result.status_code, result.content) == (500, b"oops")  # the service's own answer, kept


def test_a_fail_without_retry_ends_the_job(live_gateway):
    gateway = live_gateway()
    job_id = submit(gateway)
    [job] = lease(gateway).json()["jobs"]
    failed = call(gateway, job_id, "fail", lease_token=job["lease_token"], error="bad input", retry=False)
    assert (failed.status_code, failed.json()["status"]) == (200, "failed")
    result = requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5)
    assert result.status_code == 502
    assert "bad input" in result.json()["message"]
    assert 'gateway_jobs_total{status="failed"} 1.0' in requests.get(gateway.url + "/metrics", timeout=5).text


def test_a_cancel_is_told_at_the_next_heartbeat(live_gateway):
    gateway = live_gateway()
    job_id = submit(gateway)
    [job] = lease(gateway).json()["jobs"]
    assert requests.delete(f"{gateway.url}/jobs/{job_id}", timeout=5).status_code == 200
    beat = call(gateway, job_id, "heartbeat", lease_token=job["lease_token"])
    assert beat.status_code == 200
    assert (beat.json()["cancelled"], beat.json()["status"]) == (True, "cancelled")
    assert "stop" in beat.json()["message"]
    late = complete(gateway, job)
    assert (late.status_code, late.json()["cancelled"]) == (200, True)  # the cancel stands
    assert requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5).status_code == 410


@pytest.mark.parametrize("job_id", ["nothex", "0" * 32])
def test_an_unknown_job_is_a_404(live_gateway, job_id):
    gateway = live_gateway()
    answer = call(gateway, job_id, "heartbeat", lease_token="t")
    assert answer.status_code == 404
    assert "no job" in answer.json()["message"]


# -- credentials and bad bodies -----------------------------------------------------------------

CALLS = [
    ("post", "/workers/lease"),
    ("post", "/jobs/" + "a" * 32 + "/heartbeat"),
    ("post", "/jobs/" + "a" * 32 + "/complete"),
    ("post", "/jobs/" + "a" * 32 + "/fail"),
]


@pytest.mark.parametrize(("method", "path"), CALLS)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-credential-123"}, {"X-Webhook-Secret": SECRET}, {"Authorization": SECRET}],
)
def test_the_worker_endpoints_need_the_worker_credential_as_a_bearer_token(live_gateway, method, path, headers):
    gateway = live_gateway()
    answer = requests.request(method, gateway.url + path, json={"worker_id": "W1"}, headers=headers, timeout=5)
    assert answer.status_code == 401
    assert "Authorization: Bearer <WEBHOOK_SECRET>" in answer.json()["message"]


def test_with_worker_token_set_only_it_opens_the_worker_endpoints(live_gateway):
    gateway = live_gateway(worker_token=WORKER_TOKEN)
    refused = lease(gateway, headers=WORKER)  # the webhook secret no longer serves
    assert refused.status_code == 401
    assert "Authorization: Bearer <WORKER_TOKEN>" in refused.json()["message"]
    assert WORKER_TOKEN not in refused.text
    assert lease(gateway, headers={"Authorization": f"Bearer {WORKER_TOKEN}"}).status_code == 204
    # The operator's list takes the admin credential, not the worker's.
    assert requests.get(gateway.url + "/admin/workers", timeout=5).status_code == 401
    worker_only = {"Authorization": f"Bearer {WORKER_TOKEN}"}
    assert requests.get(gateway.url + "/admin/workers", headers=worker_only, timeout=5).status_code == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"routes": ["/api/"]}, "worker_id"),
        ({"worker_id": "W 1", "routes": ["/api/"]}, "worker_id"),
        ({"worker_id": "W1"}, "routes"),
        ({"worker_id": "W1", "routes": []}, "routes"),
        ({"worker_id": "W1", "routes": ["/api/enhance"]}, "routes"),
        ({"worker_id": "W1", "models": ["a b"]}, "models"),
        ({"worker_id": "W1", "routes": ["/api/"], "max_jobs": 0}, "max_jobs"),
        ({"worker_id": "W1", "routes": ["/api/"], "max_jobs": 101}, "max_jobs"),
        ({"worker_id": "W1", "routes": ["/api/"], "max_jobs": True}, "max_jobs"),
        ({"worker_id": "W1", "routes": ["/api/"], "wait_seconds": 31}, "wait_seconds"),
        ({"worker_id": "W1", "routes": ["/api/"], "wait_seconds": -1}, "wait_seconds"),
        ({"worker_id": "W1", "routes": ["/api/"], "wait_seconds": "5"}, "wait_seconds"),
        ({"worker_id": "W1", "routes": ["/api/"], "gpu": "A100"}, "gpu"),
    ],
)
def test_a_bad_lease_body_is_a_400_that_names_the_field(live_gateway, body, field):
    gateway = live_gateway()
    answer = requests.post(gateway.url + "/workers/lease", json=body, headers=WORKER, timeout=5)
    assert answer.status_code == 400
    assert field in answer.json()["message"]
    assert field in answer.json()["errors"]


@pytest.mark.parametrize(
    ("action", "body", "field"),
    [
        ("heartbeat", {}, "lease_token"),
        ("complete", {"status": 200}, "lease_token"),
        ("complete", {"lease_token": "t"}, "status"),
        ("complete", {"lease_token": "t", "status": 700}, "status"),
        ("complete", {"lease_token": "t", "status": 200, "body": "not base64!"}, "body"),
        ("complete", {"lease_token": "t", "status": 200, "body": base64.b64encode(b"x" * 1001).decode()}, "body"),
        ("complete", {"lease_token": "t", "status": 200, "headers": [["X-Split", "a\r\nSet-Cookie: b"]]}, "headers"),
        ("complete", {"lease_token": "t", "status": 200, "headers": [["Bad Name", "x"]]}, "headers"),
        ("complete", {"lease_token": "t", "status": 200, "headers": {"X-A": "1"}}, "headers"),
        ("fail", {"lease_token": "t", "retry": True}, "error"),
        ("fail", {"lease_token": "t", "error": "x"}, "retry"),
        ("fail", {"lease_token": "t", "error": "x", "retry": 1}, "retry"),
        ("fail", {"lease_token": "t", "error": "x", "retry": False, "body": "eA=="}, "status"),
    ],
)
def test_a_bad_job_call_body_is_a_400_that_names_the_field(live_gateway, action, body, field):
    gateway = live_gateway(proxy_max_body_bytes=1000)
    job_id = submit(gateway)
    answer = call(gateway, job_id, action, **body)
    assert answer.status_code == 400, answer.text
    assert field in answer.json()["errors"]
    assert job_state(gateway, job_id)["status"] == "queued"  # nothing changed


def test_a_body_past_the_result_limit_is_a_413(live_gateway):
    gateway = live_gateway(proxy_max_body_bytes=1000)
    job_id = submit(gateway)
    answer = call(gateway, job_id, "complete", lease_token="t", status=200, body="QUFB" * 300_000)
    assert answer.status_code == 413


@pytest.mark.parametrize(
    ("data", "kind", "message"),
    [(b"[1]", "application/json", "a JSON object"), (b"{", "application/json", "must be JSON"), (b"{}", "", "JSON")],
)
def test_a_body_that_is_not_a_json_object_is_a_400(live_gateway, data, kind, message):
    gateway = live_gateway()
    headers = {**WORKER, "Content-Type": kind}
    answer = requests.post(gateway.url + "/workers/lease", data=data, headers=headers, timeout=5)
    assert answer.status_code == 400
    assert message in answer.json()["message"]


# -- the operator's view -----------------------------------------------------------------------


def test_admin_workers_shows_each_worker_active_then_gone(live_gateway):
    gateway = live_gateway(job_lease_seconds=1)
    job_id = submit(gateway)
    assert lease(gateway, "W1", max_jobs=4).status_code == 200
    assert lease(gateway, "M1", routes=None, models=["llama3"]).status_code == 204
    listed = workers(gateway)
    assert set(listed) == {"W1", "M1"}
    w1 = listed["W1"]
    assert (w1["state"], w1["routes"], w1["models"], w1["max_jobs"]) == ("active", ["/api/"], [], 4)
    assert w1["jobs"] == [job_id]
    assert w1["last_lease_at"] is not None and w1["last_heartbeat_at"] is None
    assert listed["M1"]["models"] == ["llama3"]
    # Silent for three lease periods: gone (and W1's job went back to the queue on the way).
    assert wait_until(lambda: {row["state"] for row in workers(gateway).values()} == {"gone"}, timeout=20)
    assert workers(gateway)["W1"]["jobs"] == []
    answer = requests.get(gateway.url + "/admin/workers", headers=ADMIN, timeout=5).json()
    assert answer["data"]["gone_after_seconds"] == 3
    # A worker comes back by itself, with its next call.
    assert lease(gateway, "W1").status_code == 200
    assert workers(gateway)["W1"]["state"] == "active"


def test_a_job_waiting_for_a_worker_says_it_is_queued_not_offline(live_gateway):
    gateway = live_gateway()
    assert lease(gateway, "W1").status_code == 204  # an active worker for /api/
    reply = requests.post(gateway.url + "/api/echo", data=b"x", headers=ASYNC, timeout=5).json()
    assert "no GPU server is online" not in reply["message"]
    assert "queued at position 1" in reply["message"]
