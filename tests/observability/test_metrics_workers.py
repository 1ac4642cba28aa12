"""/metrics under several gunicorn workers (prometheus_client's multiprocess mode), and gateway_redis_up."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest
import requests
from conftest import SECRET, wait_until
from prometheus_client.parser import text_string_to_metric_families

from gateway.cluster.connection import Redis
from gateway.fleet.redis_store import RedisFleetStore

EACH = 20  # requests each worker serves while the other one is stopped


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}; a new connection, so either worker may answer."""
    response = requests.get(url + "/metrics", headers={"Connection": "close"}, timeout=10)
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def total(samples, name: str) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


def answering_worker(samples) -> int:
    """The pid of the worker that answered: its own process metrics carry it."""
    (pid,) = {dict(labels)["pid"] for name, labels in samples if name == "process_resident_memory_bytes"}
    return int(pid)


def workers_of(gateway, count: int) -> list[int]:
    master = psutil.Process(gateway.process.pid)
    assert wait_until(lambda: len(master.children()) == count), gateway.log()
    return sorted(child.pid for child in master.children())


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP one worker (a child of the gunicorn we started), so that the other one accepts everything."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def both_answering(gateway) -> list[int]:
    """The two workers' pids, once each has answered a scrape on its own."""
    workers = workers_of(gateway, 2)
    # Before a test begins: a worker still booting when gunicorn is stopped hangs the stop.
    for pause, answering in (workers, workers[::-1]):
        with stopped(pause):
            assert answering_worker(scrape(gateway.url)) == answering
    return workers


class TwoWorkers:
    """gunicorn with two workers and Redis, each worker loading server B1 from Redis."""

    def __init__(self, gateway, server) -> None:
        self.gateway, self.server, self.url = gateway, server, gateway.url
        self.workers = both_answering(gateway)
        log = gateway.log()
        assert "2 worker(s) share their metrics through " in log
        self.metrics_dir = log.split("2 worker(s) share their metrics through ", 1)[1].split()[0]


@pytest.fixture
def two_workers(gateway_process, redis_server, fake_servers, tmp_path) -> Iterator[TwoWorkers]:
    server = fake_servers("B1")
    # The fleet is in Redis: each worker loads the one server from there as it starts.
    entry = {"server_id": "B1", "ip": "127.0.0.1", "port": server.port}
    shared = Redis(redis_server.url)
    RedisFleetStore(shared).put("B1", entry, 0)
    shared.close()
    gateway = gateway_process(REDIS_URL=redis_server.url, GATEWAY_WORKERS="2", HEALTH_CHECK_INTERVAL="3600")
    started = TwoWorkers(gateway, server)
    yield started
    gateway.kill(signal.SIGTERM)  # a clean stop, so that the master removes its metrics folder
    assert not os.path.exists(started.metrics_dir)


def in_flight(url: str) -> float:
    """Requests open to B1 in every live worker (no series once the only worker that had one is gone)."""
    return scrape(url).get(("gateway_requests_in_flight", (("server", "B1"),)), 0.0)


@pytest.mark.slow
def test_two_workers_answer_a_scrape_with_the_same_sums(two_workers):
    url = two_workers.url
    assert os.path.isdir(two_workers.metrics_dir)
    for pause, serving in (two_workers.workers, reversed(two_workers.workers)):
        with stopped(pause):
            for _ in range(EACH):
                reply = requests.get(url + "/api/echo", headers={"Connection": "close"}, timeout=10)
                assert reply.status_code == 200
            # A request is counted when its response closes, just after the client has the last byte.
            assert wait_until(lambda: total(scrape(url), "gateway_request_duration_seconds_count") >= EACH)
            assert answering_worker(scrape(url)) == serving

    for pause, answering in (two_workers.workers, reversed(two_workers.workers)):
        with stopped(pause):
            assert wait_until(lambda: total(scrape(url), "gateway_requests_total") == 2 * EACH)
            for _ in range(3):
                samples = scrape(url)
                assert answering_worker(samples) == answering
                ok = ("gateway_requests_total", (("method", "GET"), ("server", "B1"), ("status_class", "2xx")))
                assert samples[ok] == 2 * EACH
                assert samples[("gateway_request_duration_seconds_count", (("server", "B1"),))] == 2 * EACH
                assert samples[("gateway_requests_in_flight", (("server", "B1"),))] == 0
                assert samples[("gateway_servers_registered", ())] == 1  # the worker's own fleet, not a sum
                assert samples[("gateway_server_up", (("server", "B1"),))] == 1
                assert samples[("gateway_redis_up", ())] == 1
                assert "python_info" in {name for name, _ in samples}
                assert ("gateway_jobs_queued", ()) in samples  # the job store's collector, once
            headers = {"X-Webhook-Secret": SECRET, "Connection": "close"}
            status = requests.get(url + "/status", headers=headers, timeout=10).json()["data"]
            assert status["requests"]["total"] == 2 * EACH


@pytest.mark.slow
def test_each_family_is_served_once(two_workers):
    assert requests.get(two_workers.url + "/api/echo", headers={"Connection": "close"}, timeout=10).status_code == 200
    assert wait_until(lambda: total(scrape(two_workers.url), "gateway_requests_total") == 1)
    text = requests.get(two_workers.url + "/metrics", timeout=10).text
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    assert {
        "gateway_requests_total",
        "gateway_servers_registered",
        "gateway_jobs_queued",
        "gateway_allocations",
    } <= set(types)


@pytest.mark.slow
def test_allocations_are_read_from_redis_by_the_answering_worker_and_moves_summed(two_workers):
    headers = {"X-Webhook-Secret": SECRET, "Connection": "close"}  # the admin credential while ADMIN_TOKEN is unset
    with stopped(two_workers.workers[1]):
        reply = requests.post(two_workers.url + "/allocations", json={"key": "k1"}, headers=headers, timeout=10)
        assert reply.status_code == 201
    for pause, answering in (two_workers.workers, reversed(two_workers.workers)):
        with stopped(pause):
            samples = scrape(two_workers.url)
            assert answering_worker(samples) == answering
            assert samples[("gateway_allocations", (("server", "B1"),))] == 1  # the store's count, not a sum
            assert samples[("gateway_allocation_moves_total", (("type", "initial"),))] == 1  # one worker's, summed


@pytest.mark.slow
def test_a_server_that_leaves_takes_its_summed_series_with_it(two_workers):
    url = two_workers.url
    with stopped(two_workers.workers[1]):
        assert requests.get(url + "/api/echo", headers={"Connection": "close"}, timeout=10).status_code == 200
        assert wait_until(lambda: total(scrape(url), "gateway_requests_total") == 1)
        body = {"server_id": "B1", "secret": SECRET}
        requests.post(url + "/webhook/unregister", json=body, headers={"Connection": "close"}, timeout=10)
        samples = scrape(url)
    # The workers' files keep the series; the worker whose fleet lost B1 leaves them out.
    assert not any(dict(labels).get("server") == "B1" for _, labels in samples)
    assert samples[("gateway_servers_registered", ())] == 0
    assert samples[("gateway_unregistrations_total", (("result", "ok"),))] == 1


@pytest.mark.slow
def test_a_stream_in_flight_counts_once_across_workers(two_workers):
    first, second = two_workers.workers
    with stopped(second):
        stream = requests.get(two_workers.url + "/api/stream?n=200&delay=0.01&gated=1", stream=True, timeout=10)
        next(stream.iter_content(chunk_size=None))
    with stopped(first):  # the other worker answers, and sees the first one's open request
        assert in_flight(two_workers.url) == 1
    stream.close()
    two_workers.server.stream_gate.set()
    assert wait_until(lambda: in_flight(two_workers.url) == 0)


@pytest.mark.slow
def test_a_dead_workers_open_requests_stop_counting(two_workers):
    first, second = two_workers.workers
    with stopped(second):
        stream = requests.get(two_workers.url + "/api/stream?n=200&delay=0.01&gated=1", stream=True, timeout=10)
        next(stream.iter_content(chunk_size=None))
    assert in_flight(two_workers.url) == 1
    os.kill(first, signal.SIGKILL)  # a worker of the gunicorn we started; its master starts another
    try:
        assert wait_until(lambda: in_flight(two_workers.url) == 0)
    finally:
        stream.close()
        two_workers.server.stream_gate.set()
    assert wait_until(lambda: first not in workers_of(two_workers.gateway, 2))
    (replacement,) = set(workers_of(two_workers.gateway, 2)) - {second}
    with stopped(second):  # the new worker is up (a stop while it boots would hang), and sees the same
        samples = scrape(two_workers.url)
        assert answering_worker(samples) == replacement
        assert samples.get(("gateway_requests_in_flight", (("server", "B1"),)), 0.0) == 0


@pytest.mark.slow
def test_two_workers_without_redis_refuse_to_start(gateway_process):
    with pytest.raises(RuntimeError, match="GATEWAY_WORKERS=2 needs REDIS_URL"):
        gateway_process(GATEWAY_WORKERS="2")


@pytest.mark.slow
def test_workers_on_the_command_line_need_redis_too(gateway_process):
    with pytest.raises(RuntimeError, match="2 workers need REDIS_URL"):
        gateway_process(GUNICORN_CMD_ARGS="--workers 2")


@pytest.mark.slow
def test_the_operators_metrics_folder_is_emptied_of_old_counts_and_kept(gateway_process, redis_server, tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_99999.db").write_bytes(b"a previous run's counts")
    (folder / "README").write_text("not ours")
    gateway = gateway_process(REDIS_URL=redis_server.url, GATEWAY_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(folder))
    assert f"2 worker(s) share their metrics through {folder}" in gateway.log()
    assert not (folder / "counter_99999.db").exists()
    for pid in both_answering(gateway):
        assert any(folder.glob(f"*_{pid}.db"))
    gateway.kill(signal.SIGTERM)
    assert (folder / "README").read_text() == "not ours"


@pytest.mark.slow
def test_one_worker_with_the_operators_folder_empties_it_too(gateway_process, tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "histogram_99999.db").write_bytes(b"a previous run's counts")
    gateway = gateway_process(PROMETHEUS_MULTIPROC_DIR=str(folder))
    assert not (folder / "histogram_99999.db").exists()
    assert answering_worker(scrape(gateway.url)) == workers_of(gateway, 1)[0]


@pytest.mark.slow
def test_one_worker_counts_alone(gateway_process):
    samples = scrape(gateway_process().url)
    assert "process_resident_memory_bytes" in {name for name, _ in samples}
    assert not any("pid" in dict(labels) for _, labels in samples)  # no multiprocess mode
    assert not any(name == "gateway_redis_up" for name, _ in samples)


def test_redis_up_follows_the_last_call(make_app, redis_server):
    app = make_app(redis_url=redis_server.url)
    shared = app.extensions["redis"]
    client = app.test_client()

    def redis_up() -> float | None:
        families = text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
        values = [s.value for family in families for s in family.samples if s.name == "gateway_redis_up"]
        return values[0] if values else None

    assert shared.ping()
    assert redis_up() == 1
    redis_server.kill()
    # The fleet's follower holds a subscription open, so the gauge falls as soon as Redis goes.
    assert wait_until(lambda: redis_up() == 0, timeout=5)
    assert not shared.ping()
    redis_server.start()
    assert wait_until(lambda: redis_up() == 1, timeout=10)  # the follower reconnects by itself


def test_embedded_mode_has_no_redis_up(client):
    assert "gateway_redis_up" not in client.get("/metrics").get_data(as_text=True)
