"""Seed 004's channel: a real WebSocket worker against the gateway as deployed (gunicorn + gevent)."""

from __future__ import annotations

import base64
import json

import pytest
import requests
from conftest import SECRET, wait_until
from simple_websocket import Client, ConnectionClosed

AUTH = {"Authorization": f"Bearer {SECRET}"}  # the webhook secret serves while WORKER_TOKEN is unset
ASYNC = {"Prefer": "respond-async"}


def connect(gateway, **hello) -> Client:
    ws = Client.connect(gateway.url.replace("http://", "ws://") + "/workers/ws", headers=AUTH)
    ws.send(json.dumps({"type": "hello", "worker_id": "W1", "routes": ["/api/"], **hello}))
    return ws


def next_message(ws: Client, timeout: float = 10.0) -> dict:
    message = ws.receive(timeout=timeout)
    assert message is not None, "no message in time"
    return json.loads(message)


def answer(ws: Client, job_id: str, body: bytes, status: int = 200) -> None:
    result = {"status": status, "headers": [["Content-Type", "text/plain"]], "body": base64.b64encode(body).decode()}
    ws.send(json.dumps({"type": "result", "request_id": job_id, "error": None, "result": result}))


def state(gateway, job_id: str) -> dict:
    return requests.get(f"{gateway.url}/jobs/{job_id}", timeout=5).json()


@pytest.fixture
def gateway(gateway_process):
    return gateway_process(JOB_LEASE_SECONDS="3")


def test_a_connected_worker_gets_the_backlog_and_then_new_jobs(gateway):
    first = requests.post(gateway.url + "/api/enhance", data=b"one", headers=ASYNC, timeout=5).json()["job_id"]
    ws = connect(gateway)
    try:
        task = next_message(ws)
        assert (task["type"], task["version"], task["request_id"], task["task_type"]) == ("task", 1, first, "/api/")
        assert task["payload"]["method"] == "POST" and task["payload"]["target"] == "/api/enhance"
        assert base64.b64decode(task["payload"]["body"]) == b"one"
        answer(ws, first, b"done one")
        assert wait_until(lambda: state(gateway, first)["status"] == "succeeded", 10)
        result = requests.get(f"{gateway.url}/jobs/{first}/result", timeout=5)
        assert (result.status_code, result.content) == (200, b"done one")
        later = requests.get(gateway.url + "/api/x", headers=ASYNC, timeout=5).json()["job_id"]
        assert next_message(ws)["request_id"] == later  # pushed as it came, on the open socket
    finally:
        ws.close()


def test_a_worker_that_disconnects_mid_job_has_it_queued_again(gateway):
    job_id = requests.get(gateway.url + "/api/x", headers=ASYNC, timeout=5).json()["job_id"]
    ws = connect(gateway)
    assert next_message(ws)["request_id"] == job_id
    ws.close()  # gone with the job unanswered
    assert wait_until(lambda: state(gateway, job_id)["status"] == "queued", 10)
    assert state(gateway, job_id)["attempts"] == 1
    again = connect(gateway, worker_id="W2")
    try:
        assert next_message(again)["request_id"] == job_id
        answer(again, job_id, b"ok")
        assert wait_until(lambda: state(gateway, job_id)["status"] == "succeeded", 10)
        assert state(gateway, job_id)["server_id"] == "W2"
    finally:
        again.close()


def test_a_held_job_outlives_its_lease_while_the_socket_is_open_and_a_cancel_is_told(gateway):
    job_id = requests.get(gateway.url + "/api/x", headers=ASYNC, timeout=5).json()["job_id"]
    ws = connect(gateway)
    try:
        assert next_message(ws)["request_id"] == job_id
        with pytest.raises(AssertionError):
            next_message(ws, timeout=4)  # longer than the 3 s lease: renewed, so never handed out again
        assert state(gateway, job_id)["status"] == "running"
        requests.delete(f"{gateway.url}/jobs/{job_id}", timeout=5)
        assert next_message(ws) == {"type": "cancel", "request_id": job_id}
    finally:
        ws.close()


def test_max_jobs_bounds_what_a_worker_holds(gateway):
    ids = [requests.get(f"{gateway.url}/api/x?n={n}", headers=ASYNC, timeout=5).json()["job_id"] for n in range(3)]
    ws = connect(gateway, max_jobs=2)
    try:
        got = [next_message(ws)["request_id"], next_message(ws)["request_id"]]
        assert got == ids[:2]
        with pytest.raises(AssertionError):
            next_message(ws, timeout=1.5)
        answer(ws, got[0], b"a")
        assert next_message(ws)["request_id"] == ids[2]
    finally:
        ws.close()


def test_bad_messages_are_told_and_change_nothing(gateway):
    job_id = requests.get(gateway.url + "/api/x", headers=ASYNC, timeout=5).json()["job_id"]
    ws = connect(gateway)
    try:
        assert next_message(ws)["request_id"] == job_id
        ws.send("not json")
        assert next_message(ws)["error"] == "a message must be JSON"
        ws.send(json.dumps({"type": "status"}))
        assert "expected" in next_message(ws)["error"]
        ws.send(json.dumps({"type": "result", "request_id": "f" * 32, "error": None, "result": {}}))
        assert "not one this worker holds" in next_message(ws)["error"]
        ws.send(json.dumps({"type": "result", "request_id": job_id, "error": None, "result": {"status": 99}}))
        assert "HTTP status" in next_message(ws)["error"]
        assert state(gateway, job_id)["status"] == "running"
    finally:
        ws.close()


def test_a_hello_that_is_not_one_closes_the_socket_saying_why(gateway):
    ws = Client.connect(gateway.url.replace("http://", "ws://") + "/workers/ws", headers=AUTH)
    ws.send(json.dumps({"type": "hello", "routes": ["/api/"]}))  # no worker_id
    assert "worker_id" in next_message(ws)["error"]
    with pytest.raises(ConnectionClosed):
        ws.receive(timeout=5)


def test_the_socket_needs_the_worker_credential_and_an_upgrade(gateway):
    assert requests.get(gateway.url + "/workers/ws", timeout=5).status_code == 401
    plain = requests.get(gateway.url + "/workers/ws", headers=AUTH, timeout=5)
    assert plain.status_code == 400 and "Upgrade: websocket" in plain.json()["message"]
