"""ALLOCATION_MIGRATE_URL: each move announced, signed, to a real receiver on 127.0.0.1 before it takes effect."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time

import pytest
from allocating import ADMIN, add_servers, allocate, history, server_of
from conftest import wait_until

KEY = bytes(range(32, 64))
SIGNING_SECRET = "whsec_" + base64.b64encode(KEY).decode()


class Receiver:
    """The application's end: keeps each announcement with where the key was then, and answers `status`."""

    def __init__(self, place_of, status: int = 204, delay: float = 0.0) -> None:
        self.status, self.delay = status, delay
        self.received: list[tuple[dict[str, str], bytes, str | None]] = []
        self.released = threading.Event()  # a delayed answer ends at once when the test is over
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = json.loads(body)["data"]["key"]
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body, place_of(key)))
                receiver.released.wait(receiver.delay)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/allocations"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def verify(headers: dict[str, str], body: bytes) -> bool:
    """What a receiver checks (Standard Webhooks): the signature of id.timestamp.body, and a fresh timestamp."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
    return fresh and any(hmac.compare_digest(expected, part) for part in headers["webhook-signature"].split())


@pytest.fixture
def gateway(make_app):
    """A gateway with B1 and B2, announcing moves to a receiver that answers as the test says."""
    made = []

    def build(status: int = 204, delay: float = 0.0, **overrides):
        box: dict[str, object] = {}
        receiver = Receiver(lambda key: box["app"].extensions["allocations"].store.get(key).server_id, status, delay)
        made.append(receiver)
        app = make_app(allocation_migrate_url=receiver.url, job_callback_secret=SIGNING_SECRET, **overrides)
        box["app"] = app
        manager = app.extensions["backend_manager"]
        add_servers(manager, B1={}, B2={})
        client = app.test_client()
        manager.set_draining("B2", True)
        allocate(client, "k1", strategy="affinity", group="g")
        allocate(client, "k2")
        manager.set_draining("B2", False)
        return app, client, receiver

    yield build
    for receiver in made:
        receiver.close()


def test_a_move_is_announced_signed_before_it_takes_effect(gateway):
    _app, client, receiver = gateway()
    moved = client.post("/allocations/k1/move", json={"server_id": "B2"}, headers=ADMIN)
    assert moved.status_code == 200
    assert len(receiver.received) == 1
    headers, body, place_then = receiver.received[0]
    assert verify(headers, body)
    assert not verify({**headers, "webhook-id": "another"}, body)
    assert place_then == "B1"  # announced while the key was still where it was
    event = json.loads(body)
    assert event["type"] == "allocation.move"
    data = event["data"]
    assert (data["key"], data["move_type"], data["from_server_id"], data["to_server_id"]) == (
        "k1",
        "manual",
        "B1",
        "B2",
    )
    assert (data["from_url"], data["to_url"]) == ("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    assert (data["strategy"], data["group"], data["move_id"]) == ("affinity", "g", headers["webhook-id"])
    assert server_of(client, "k1") == "B2"
    assert history(client, "k1")[-1]["move_id"] == headers["webhook-id"]


@pytest.mark.parametrize(("status", "delay", "says"), [(409, 0.0, "HTTP 409"), (204, 3.0, "no answer (ReadTimeout)")])
def test_a_refused_or_unanswered_move_leaves_the_key_and_is_recorded(gateway, status, delay, says):
    _app, client, receiver = gateway(status=status, delay=delay, allocation_migrate_timeout=0.5)
    refused = client.post("/allocations/k1/move", json={"server_id": "B2"}, headers=ADMIN)
    assert refused.status_code == 502
    assert says in refused.get_json()["message"]
    assert server_of(client, "k1") == "B1"
    entry = history(client, "k1")[-1]
    assert (entry["type"], entry["outcome"], entry["server_id"]) == ("manual", "refused", "B2")
    assert says in entry["reason"]
    assert entry["move_id"] == receiver.received[0][0]["webhook-id"]


def test_each_rebalance_move_is_announced_and_a_refusal_is_listed(gateway):
    _app, client, receiver = gateway(status=500)
    data = client.post("/allocations/rebalance", json={"threshold": 10}, headers=ADMIN).get_json()["data"]
    assert [move["outcome"] for move in data["moves"]] == ["refused", "refused"]  # each key tried once
    assert data["moved"] == 0 and data["refused"] == 2
    assert {json.loads(body)["data"]["move_type"] for _, body, _ in receiver.received} == {"rebalance"}
    assert (server_of(client, "k1"), server_of(client, "k2")) == ("B1", "B1")
    receiver.status = 200
    again = client.post("/allocations/rebalance", json={"threshold": 10}, headers=ADMIN).get_json()["data"]
    assert again["moved"] == 1  # one of the two: then they are even
    assert all(verify(headers, body) for headers, body, _ in receiver.received)


def test_a_failover_is_announced_too(gateway):
    app, client, receiver = gateway()
    app.extensions["backend_manager"].unregister_server("B1")
    assert wait_until(lambda: not app.extensions["allocation_failover"].busy and server_of(client, "k2") == "B2")
    types = sorted(json.loads(body)["data"]["move_type"] for _, body, _ in receiver.received)
    assert types == ["failover", "failover"]
    assert [entry["type"] for entry in history(client, "k1")] == ["initial", "failover"]


def test_without_the_url_nothing_is_announced(make_app):
    app = make_app(job_callback_secret=SIGNING_SECRET)
    assert app.extensions["allocations"].announcer is None
