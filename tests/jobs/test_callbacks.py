"""Callbacks: a finished job POSTed, signed as Standard Webhooks sign, to a real receiver on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading

import pytest
import requests
from conftest import SECRET, wait_until

KEY = bytes(range(32))
CALLBACK_SECRET = "whsec_" + base64.b64encode(KEY).decode()


class Receiver:
    """An HTTP server that keeps every POST it gets, and answers 500 to the first `failures` of them."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = 500 if len(receiver.received) <= receiver.failures else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/jobs"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    started: list[Receiver] = []

    def start(failures: int = 0) -> Receiver:
        started.append(Receiver(failures))
        return started[-1]

    yield start
    for one in started:
        one.close()


def verify(headers: dict[str, str], body: bytes) -> bool:
    """The receiver's side of Standard Webhooks: recompute the signature from the raw body."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(f"v1,{expected}", part) for part in headers["webhook-signature"].split())


def register(gateway, server) -> None:
    body = {"server_id": server.server_id, "ip": "127.0.0.1", "port": server.port, "secret": SECRET}
    requests.post(gateway.url + "/webhook/register", json=body, timeout=5).raise_for_status()


def test_a_finished_job_is_posted_signed_to_its_callback(live_gateway, fake_servers, receiver):
    hooks = receiver()
    gateway = live_gateway(job_callback_secret=CALLBACK_SECRET)
    headers = {"Prefer": "respond-async", "X-Callback-URL": hooks.url, "X-Job-Priority": "3"}
    job_id = requests.post(gateway.url + "/api/echo", data=b"hi", headers=headers, timeout=5).json()["job_id"]
    server = fake_servers("B1")
    register(gateway, server)
    assert wait_until(lambda: hooks.received, 15)
    sent, body = hooks.received[0]
    assert verify(sent, body)
    assert sent["webhook-id"] == job_id
    event = json.loads(body)
    assert event["type"] == "job.succeeded"
    assert (event["data"]["job_id"], event["data"]["status"], event["data"]["result_status"]) == (
        job_id,
        "succeeded",
        200,
    )
    assert event["data"]["result_url"] == f"/jobs/{job_id}/result"
    # The gateway's own headers stayed with the gateway: the server saw none of them.
    echo = requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5).json()
    seen = {name.lower() for name in echo["headers"]}
    assert not seen & {"prefer", "x-callback-url", "x-job-priority"}
    assert "idempotency-key" in seen


def test_a_failed_delivery_is_tried_again_with_the_same_id(live_gateway, receiver):
    hooks = receiver(failures=2)
    gateway = live_gateway(job_callback_secret=CALLBACK_SECRET, job_callback_backoff=0.1)
    headers = {"Prefer": "respond-async", "X-Callback-URL": hooks.url}
    job_id = requests.get(gateway.url + "/api/echo", headers=headers, timeout=5).json()["job_id"]
    requests.delete(f"{gateway.url}/jobs/{job_id}", timeout=5)  # a cancel is an end too
    assert wait_until(lambda: len(hooks.received) == 3, 15)
    assert {sent["webhook-id"] for sent, _ in hooks.received} == {job_id}
    assert all(verify(sent, body) for sent, body in hooks.received)
    assert json.loads(hooks.received[-1][1])["type"] == "job.cancelled"


def test_a_callback_that_keeps_failing_is_given_up(live_gateway, receiver):
    hooks = receiver(failures=100)
    gateway = live_gateway(job_callback_secret=CALLBACK_SECRET, job_callback_backoff=0.1, job_callback_attempts=2)
    headers = {"Prefer": "respond-async", "X-Callback-URL": hooks.url}
    job_id = requests.get(gateway.url + "/api/echo", headers=headers, timeout=5).json()["job_id"]
    requests.delete(f"{gateway.url}/jobs/{job_id}", timeout=5)
    assert wait_until(lambda: len(hooks.received) == 2, 15)
    store = gateway.app.extensions["jobs"].store
    assert wait_until(lambda: store.get(job_id).callback_state == "failed", 5)


def test_a_callback_needs_the_signing_secret(live_gateway, receiver):
    gateway = live_gateway()
    headers = {"Prefer": "respond-async", "X-Callback-URL": receiver().url}
    answer = requests.get(gateway.url + "/api/echo", headers=headers, timeout=5)
    assert answer.status_code == 400
    assert "JOB_CALLBACK_SECRET" in answer.json()["message"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://127.0.0.1/x", "http:// or https://"),
        ("http:///nohost", "http:// or https://"),
        ("http://user:pw@127.0.0.1/x", "credentials"),
        ("http://169.254.169.254/latest/meta-data/", "may not be called"),
        ("http://127.0.0.1:99999/x", "may not be called"),
        ("http://127.0.0.1/" + "x" * 2100, "over 2048"),
    ],
)
def test_a_callback_url_that_may_not_be_called_is_a_400(live_gateway, url, reason):
    gateway = live_gateway(job_callback_secret=CALLBACK_SECRET)
    answer = requests.get(
        gateway.url + "/api/echo", headers={"Prefer": "respond-async", "X-Callback-URL": url}, timeout=5
    )
    assert answer.status_code == 400
    assert reason in answer.json()["message"]
