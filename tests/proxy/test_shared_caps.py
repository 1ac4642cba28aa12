"""max_concurrent through the proxy with REDIS_URL: two gateways share a server's cap, and every path frees its slot."""

import contextlib
import threading
import time

import pytest
import redis
import requests
from counting_server import counting

from gateway.proxy.exchange import Exchange
from gateway.proxy.upstream import UpstreamResponse
from tests.conftest import wait_until


@pytest.fixture
def counting_server(fake_servers):
    return counting(fake_servers("B1"))


def redis_app(make_app, tmp_path, redis_server, name: str):
    """A gateway on the shared Redis, with its own files (another process on another host)."""
    return make_app(
        redis_url=redis_server.url,
        backend_servers_file=str(tmp_path / f"{name}-servers.json"),
        task_affinity_file=str(tmp_path / f"{name}-affinity.db"),
        job_store_file=str(tmp_path / f"{name}-jobs.db"),
    )


def slot_members(redis_server, server_id: str = "B1") -> int:
    client = redis.Redis.from_url(redis_server.url)
    try:
        return client.zcard(f"gpu-gateway:slots:{server_id}")
    finally:
        client.close()


class CommandCounter:
    """The commands redis-server has run, by name, read over one connection of its own."""

    HANDSHAKE = ("cmdstat_info", "cmdstat_client|setinfo", "cmdstat_hello")  # a new connection's, and ours

    def __init__(self, redis_server) -> None:
        self.client = redis.Redis.from_url(redis_server.url)

    def __call__(self) -> dict[str, int]:
        stats = self.client.info("commandstats")
        return {name: row["calls"] for name, row in stats.items() if name not in self.HANDSHAKE}

    def close(self) -> None:
        self.client.close()


def ran_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: calls - before.get(name, 0) for name, calls in after.items() if calls != before.get(name, 0)}


def test_two_gateways_never_send_a_server_more_than_its_cap(
    make_app, live_gateway, tmp_path, redis_server, counting_server
):
    gateways = []
    for name in ("first", "second"):
        app = redis_app(make_app, tmp_path, redis_server, name)
        # The same server on each (the fleet itself is not shared yet): each would allow it 2 alone.
        app.extensions["backend_manager"].register_server(
            "B1", "127.0.0.1", counting_server.port, options={"max_concurrent": 2}
        )
        gateways.append(live_gateway(app))
    statuses: list[int] = []
    lock = threading.Lock()

    def call(url: str) -> None:
        response = requests.get(url + "/api/slow?delay=0.1", timeout=60)
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=call, args=(gateway.url,)) for gateway in gateways for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert statuses == [200] * 20
    assert counting_server.most_at_once <= 2
    assert slot_members(redis_server) == 0


def test_a_request_to_a_server_without_a_cap_makes_no_redis_call(
    make_app, live_gateway, tmp_path, redis_server, fake_servers
):
    gateway = live_gateway(redis_app(make_app, tmp_path, redis_server, "plain"))
    plain, capped = fake_servers("B1"), fake_servers("B2")
    gateway.manager.register_server("B1", "127.0.0.1", plain.port)
    # What polls Redis on its own (the fleet's follower, the job queue's rounds) is stopped: the
    # count is then the requests' alone.
    gateway.manager.follower.stop()
    gateway.app.extensions["jobs"].stop()
    time.sleep(1.5)  # their loops end within a poll (0.5 s) and a round (1 s)
    commands = CommandCounter(redis_server)
    try:
        before = commands()
        for _ in range(5):
            assert requests.get(gateway.url + "/api/echo", timeout=10).status_code == 200
        assert ran_since(before, commands()) == {}
        before = commands()
        assert requests.get(gateway.url + "/api/status/not-a-task", timeout=10).status_code == 404
        ran = ran_since(before, commands())  # a request that names a task asks, once (the PING checks the connection)
        assert ran.pop("cmdstat_mget") == 1 and set(ran) <= {"cmdstat_ping"}
        gateway.manager.register_server("B2", "127.0.0.1", capped.port, options={"max_concurrent": 5})
        gateway.manager.unregister_server("B1")
        before = commands()
        assert requests.get(gateway.url + "/api/echo", timeout=10).status_code == 200
        assert ran_since(before, commands()) != {}  # a capped server's slot is in Redis, and the count sees it
    finally:
        commands.close()


def fail_sending(self, *args, **kwargs):
    raise RuntimeError("unforeseen, before the request went out")


def fail_responding(self, *args, **kwargs):
    raise RuntimeError("unforeseen, building the answer")


def fail_mid_stream(original):
    reads = [0]

    def read1(self, amount, decode_content=False):
        reads[0] += 1
        if reads[0] > 1:
            raise RuntimeError("unforeseen, in the middle of the stream")
        return original(self, amount, decode_content)

    return read1


@pytest.mark.parametrize("step", ["send", "respond", "stream", "client_left"])
def test_every_path_frees_the_shared_slot(
    step, make_app, live_gateway, tmp_path, redis_server, fake_servers, monkeypatch
):
    app = redis_app(make_app, tmp_path, redis_server, step)
    server = fake_servers("B1")
    manager = app.extensions["backend_manager"]
    manager.register_server("B1", "127.0.0.1", server.port, options={"max_concurrent": 2})
    gateway = live_gateway(app)
    slots, took = manager.shared_slots, []
    take = slots.take
    monkeypatch.setattr(slots, "take", lambda *args: took.append(take(*args)) or took[-1])
    path = "/api/stream?n=5&delay=0.05" if step in ("stream", "client_left") else "/api/echo"
    if step == "send":
        monkeypatch.setattr(Exchange, "_send", fail_sending)
    elif step == "respond":
        monkeypatch.setattr(Exchange, "_respond", fail_responding)
    elif step == "stream":
        monkeypatch.setattr(UpstreamResponse, "read1", fail_mid_stream(UpstreamResponse.read1))
    if step == "client_left":
        with requests.get(gateway.url + path, stream=True, timeout=10) as response:
            next(response.iter_content(16))
            assert wait_until(lambda: slot_members(redis_server) == 1)  # held while it streams
    else:
        with contextlib.suppress(requests.RequestException):  # a broken-off answer: what matters is the slot
            requests.get(gateway.url + path, timeout=10)
    assert wait_until(lambda: slot_members(redis_server) == 0 and manager.admission.in_flight == {})
    assert took == [True]  # the request held a shared slot, and whatever broke, it went
    monkeypatch.undo()
    assert requests.get(gateway.url + "/api/echo", timeout=10).status_code == 200  # nothing was left held
