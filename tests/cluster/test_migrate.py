"""`gpu-gateway migrate --to-redis`: a one-process gateway's state, copied into a real Redis."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, SECRET


def migrate(tmp_path, redis_server, *args):
    env = {
        **os.environ,
        "WEBHOOK_SECRET": SECRET,
        "REDIS_URL": redis_server.url,
        "BACKEND_SERVERS_FILE": str(tmp_path / "backend_servers.json"),
        "TASK_AFFINITY_FILE": str(tmp_path / "task_affinity.db"),
        "JOB_STORE_FILE": str(tmp_path / "jobs.db"),
        "ALLOCATION_STORE_FILE": str(tmp_path / "allocations.db"),
    }
    command = [sys.executable, "-c", "from gateway.serve import main; main()", "migrate", "--to-redis", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_the_servers_move_to_redis_with_their_state_and_twice_copies_nothing_twice(make_app, redis_server, tmp_path):
    embedded = make_app()
    manager = embedded.extensions["backend_manager"]
    manager.register_server("B1", "127.0.0.1", 8001, options={"weight": 3})
    manager.register_server("B2", "127.0.0.1", 8002)
    manager.set_draining("B2", True)
    embedded.extensions["gateway_shutdown"]()

    dry = migrate(tmp_path, redis_server, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would copy 2" in dry.stdout
    assert make_app(redis_url=redis_server.url).extensions["backend_manager"].list_servers() == []

    first = migrate(tmp_path, redis_server)
    assert first.returncode == 0, first.stderr
    assert "servers: copied 2" in first.stdout
    shared = make_app(redis_url=redis_server.url).extensions["backend_manager"]
    servers = {server.server_id: server for server in shared.list_servers()}
    assert list(servers) == ["B1", "B2"]
    assert (servers["B1"].weight, servers["B2"].draining) == (3, True)

    again = migrate(tmp_path, redis_server)
    assert "servers: copied 0" in again.stdout
    assert "B1 is in Redis already" in again.stdout


def test_task_owners_and_unfinished_jobs_move_with_their_keys(make_app, redis_server, tmp_path):
    embedded = make_app()
    embedded.extensions["task_affinity"].record("task-1", "B1")
    client = embedded.test_client()
    queued = client.post(
        "/api/enhance", data=b"cat", headers={"Prefer": "respond-async", "Idempotency-Key": "k-1"}
    ).get_json()["job_id"]  # no server is up: it waits in the queue
    other = client.post("/api/enhance", data=b"dog", headers={"Prefer": "respond-async"}).get_json()["job_id"]
    embedded.extensions["gateway_shutdown"]()

    result = migrate(tmp_path, redis_server)
    assert result.returncode == 0, result.stderr
    assert "task owners: copied 1" in result.stdout and "jobs: copied 2" in result.stdout

    shared = make_app(redis_url=redis_server.url)
    assert shared.extensions["task_affinity"].owner("task-1") == "B1"
    store = shared.extensions["jobs"].store
    assert {store.get(queued).status, store.get(other).status} == {"queued"}
    assert store.get(queued).request.body == b"cat"
    again = shared.test_client().post(
        "/api/enhance", data=b"cat", headers={"Prefer": "respond-async", "Idempotency-Key": "k-1"}
    )
    assert again.get_json()["job_id"] == queued  # the key came along: a client's retry finds its job

    twice = migrate(tmp_path, redis_server)
    assert "jobs: copied 0" in twice.stdout and "task owners: copied 0" in twice.stdout


def test_allocations_move_with_their_history_and_twice_copies_nothing_twice(make_app, redis_server, tmp_path):
    admin = {"X-Webhook-Secret": SECRET}
    embedded = make_app()
    embedded.extensions["backend_manager"].register_server("B1", "127.0.0.1", 8001, options={"max_allocations": 5})
    embedded.extensions["backend_manager"].register_server("B2", "127.0.0.1", 8002)
    client = embedded.test_client()
    client.post("/allocations", json={"key": "conv-1", "strategy": "isolation", "group": "g"}, headers=admin)
    client.post("/allocations", json={"key": "conv-2", "strategy": "isolation", "group": "g"}, headers=admin)
    client.post("/allocations/conv-1/move", json={"server_id": "B2"}, headers=admin)
    embedded.extensions["gateway_shutdown"]()

    assert "allocations: would copy 2" in migrate(tmp_path, redis_server, "--dry-run").stdout
    result = migrate(tmp_path, redis_server)
    assert result.returncode == 0, result.stderr
    assert "allocations: copied 2" in result.stdout

    shared_app = make_app(redis_url=redis_server.url)
    shared = shared_app.test_client()
    assert shared.get("/allocations/conv-1", headers=admin).get_json()["data"]["server_id"] == "B2"
    moves = shared.get("/allocations/history?key=conv-1", headers=admin).get_json()["data"]["history"]
    assert [(m["type"], m["server_id"]) for m in moves] == [("initial", "B1"), ("manual", "B2")]
    listed = shared.get("/allocations", headers=admin).get_json()["data"]
    assert listed["counts"] == {"B2": 2}  # conv-2 went to B2 (isolation), and conv-1 was moved beside it
    assert shared_app.extensions["allocations"].store.group_counts("g") == {"B2": 2}  # what isolation reads

    again = migrate(tmp_path, redis_server)
    assert "allocations: copied 0" in again.stdout and "conv-1 is in Redis already" in again.stdout


def test_it_needs_redis_url(tmp_path):
    env = {**os.environ, "WEBHOOK_SECRET": SECRET}
    env.pop("REDIS_URL", None)
    command = [sys.executable, "-c", "from gateway.serve import main; main()", "migrate", "--to-redis"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "REDIS_URL" in result.stderr
