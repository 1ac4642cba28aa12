"""Task affinity through the proxy with REDIS_URL: a task one gateway saw created is routed to its owner by another."""

import logging

import requests


def redis_app(make_app, tmp_path, redis_server, name: str):
    return make_app(
        redis_url=redis_server.url,
        backend_servers_file=str(tmp_path / f"{name}-servers.json"),
        task_affinity_file=str(tmp_path / f"{name}-affinity.db"),
        job_store_file=str(tmp_path / f"{name}-jobs.db"),
    )


def test_a_task_created_through_one_gateway_is_polled_through_another(
    make_app, live_gateway, tmp_path, redis_server, fake_servers
):
    servers = [fake_servers("B1"), fake_servers("B2")]
    gateways = []
    for name in ("first", "second"):
        gateway = live_gateway(redis_app(make_app, tmp_path, redis_server, name))
        for server in servers:
            gateway.manager.register_server(server.server_id, "127.0.0.1", server.port)
        gateways.append(gateway)
    created = requests.post(gateways[0].url + "/api/enhance", timeout=10)
    task_id, owner = created.json()["task_id"], created.headers["X-Backend-Server"]
    for _ in range(4):  # round robin would send every other one to the server that never heard of it
        polled = requests.get(gateways[1].url + f"/api/status/{task_id}", timeout=10)
        assert (polled.status_code, polled.headers["X-Backend-Server"]) == (200, owner)
    assert not (tmp_path / "second-affinity.db").exists()  # the records are in Redis, not in a file


def test_with_redis_down_a_new_task_is_answered_and_the_lost_record_logged(
    make_app, live_gateway, tmp_path, redis_server, fake_servers, caplog
):
    caplog.set_level(logging.ERROR, "gateway.proxy.handler")
    gateway = live_gateway(redis_app(make_app, tmp_path, redis_server, "down"))
    server = fake_servers("B1")
    gateway.manager.register_server("B1", "127.0.0.1", server.port)
    redis_server.kill()
    created = requests.post(gateway.url + "/api/enhance", timeout=10)
    assert created.status_code == 200 and "task_id" in created.json()  # the server made it: the client must hear
    assert "could not record the owner of task" in caplog.text
    polled = requests.get(gateway.url + f"/api/status/{created.json()['task_id']}", timeout=10)
    assert polled.status_code == 200  # no owner found: routed as a new request, to the one server there is
