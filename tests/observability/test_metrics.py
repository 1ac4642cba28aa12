"""/metrics and /status as Prometheus and an operator see them, after real traffic."""

from __future__ import annotations

import threading

import requests
from conftest import SECRET, wait_until
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, **headers: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    response = requests.get(url + "/metrics", headers=headers, timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_health_and_registrations_are_counted(live_gateway, fake_servers):
    gateway = live_gateway()
    servers = [fake_servers(f"B{i}") for i in (1, 2)]
    for server in servers:
        gateway.register(server)
    requests.post(gateway.url + "/webhook/register", json={"server_id": "x", "secret": "wrong"}, timeout=5)
    requests.post(gateway.url + "/webhook/register", json={"server_id": "bad id", "secret": SECRET}, timeout=5)
    for _ in range(4):
        requests.get(gateway.url + "/api/echo", timeout=5)
    requests.post(gateway.url + "/api/status-code?code=500", timeout=5)
    servers[1].healthy = False
    gateway.manager.run_health_sweep()

    # A request is counted when its response closes, just after the client has the last byte.
    assert wait_until(lambda: value(scrape(gateway.url), "gateway_request_duration_seconds_count", server="B1") == 3)
    samples = scrape(gateway.url)
    assert value(samples, "gateway_requests_total", server="B1", method="GET", status_class="2xx") == 2
    assert value(samples, "gateway_requests_total", server="B1", method="POST", status_class="5xx") == 1
    assert value(samples, "gateway_request_duration_seconds_count", server="B2") == 2
    assert value(samples, "gateway_requests_in_flight", server="B1") == 0
    assert value(samples, "gateway_server_up", server="B1") == 1
    assert value(samples, "gateway_health_checks_total", server="B2", result="fail") == 1
    assert value(samples, "gateway_health_checks_total", server="B1", result="ok") == 1
    assert value(samples, "gateway_health_sweep_duration_seconds_count") == 1
    assert value(samples, "gateway_registrations_total", result="ok") == 2
    assert value(samples, "gateway_registrations_total", result="bad_secret") == 1
    assert value(samples, "gateway_registrations_total", result="invalid") == 1
    assert value(samples, "gateway_servers_registered") == 2


def test_a_server_that_leaves_takes_its_series_with_it(live_gateway, fake_servers):
    gateway = live_gateway()
    server = fake_servers("B1")
    gateway.register(server)
    requests.get(gateway.url + "/api/echo", timeout=5)
    gateway.manager.run_health_sweep()
    assert any(dict(labels).get("server") == "B1" for _, labels in scrape(gateway.url))
    requests.post(gateway.url + "/webhook/unregister", json={"server_id": "B1", "secret": SECRET}, timeout=5)
    samples = scrape(gateway.url)
    assert not any(dict(labels).get("server") == "B1" for _, labels in samples)
    assert value(samples, "gateway_unregistrations_total", result="ok") == 1
    assert value(samples, "gateway_servers_registered") == 0


def test_a_server_that_comes_back_is_counted_afresh(live_gateway, fake_servers):
    gateway = live_gateway()
    server = fake_servers("B1")
    gateway.register(server)
    for _ in range(2):
        assert requests.get(gateway.url + "/api/echo", timeout=5).status_code == 200
    requests.post(gateway.url + "/webhook/unregister", json={"server_id": "B1", "secret": SECRET}, timeout=5)
    gateway.register(server)
    assert requests.get(gateway.url + "/api/echo", timeout=5).status_code == 200
    samples = scrape(gateway.url)
    assert value(samples, "gateway_requests_total", server="B1", method="GET", status_class="2xx") == 1
    assert value(samples, "gateway_request_duration_seconds_count", server="B1") == 1
    assert ("gateway_requests_in_flight", (("server", "B1"),)) in samples
    assert value(samples, "gateway_requests_in_flight", server="B1") == 0


def test_failover_fallback_and_no_server_are_counted(live_gateway, fake_servers):
    gateway = live_gateway()
    dead, alive = fake_servers("DEAD"), fake_servers("ALIVE")
    gateway.register(dead)
    gateway.register(alive)
    dead.stop()
    requests.get(gateway.url + "/api/echo", timeout=5)  # DEAD first, then ALIVE
    assert wait_until(lambda: value(scrape(gateway.url), "gateway_proxy_failovers_total") == 1)
    samples = scrape(gateway.url)
    assert value(samples, "gateway_proxy_retries_total", server="DEAD") == 1
    assert value(samples, "gateway_proxy_failovers_total") == 1


def test_no_server_and_fallback_are_counted(live_gateway, fake_servers, tmp_path):
    empty = live_gateway()
    assert requests.get(empty.url + "/api/echo", timeout=5).status_code == 503
    assert wait_until(lambda: value(scrape(empty.url), "gateway_no_server_responses_total") == 1)

    fallback = fake_servers("FALLBACK")
    with_fallback = live_gateway(
        backend_api_base=f"http://127.0.0.1:{fallback.port}",
        backend_servers_file=str(tmp_path / "other.json"),
        task_affinity_file=str(tmp_path / "other.db"),
        job_store_file=str(tmp_path / "other-jobs.db"),
    )
    requests.get(with_fallback.url + "/api/echo", timeout=5)
    assert wait_until(lambda: value(scrape(with_fallback.url), "gateway_fallback_requests_total") == 1)


def test_a_stream_is_in_flight_until_it_ends_or_the_client_leaves(live_gateway, fake_servers):
    gateway = live_gateway()
    server = fake_servers("B1")
    gateway.register(server)
    response = requests.get(gateway.url + "/api/stream?n=200&delay=0.01&gated=1", stream=True, timeout=10)
    next(response.iter_content(chunk_size=None))
    assert value(scrape(gateway.url), "gateway_requests_in_flight", server="B1") == 1
    response.close()
    server.stream_gate.set()
    assert wait_until(lambda: value(scrape(gateway.url), "gateway_requests_in_flight", server="B1") == 0)


def test_metrics_token_when_configured(live_gateway):
    gateway = live_gateway(metrics_token="scrape-token-1c7e5a90")
    assert requests.get(gateway.url + "/metrics", timeout=5).status_code == 401
    assert (
        requests.get(gateway.url + "/metrics", headers={"Authorization": "Bearer nope"}, timeout=5).status_code == 401
    )
    assert scrape(gateway.url, Authorization="Bearer scrape-token-1c7e5a90")


def test_status_needs_the_secret_and_sums_it_up(live_gateway, fake_servers):
    gateway = live_gateway()
    gateway.register(fake_servers("B1"))
    requests.get(gateway.url + "/api/echo", timeout=5)
    gateway.manager.run_health_sweep()
    assert wait_until(lambda: value(scrape(gateway.url), "gateway_request_duration_seconds_count", server="B1") == 1)
    assert requests.get(gateway.url + "/status", timeout=5).status_code == 401
    assert requests.get(gateway.url + "/status?secret=" + SECRET, timeout=5).status_code == 401
    reply = requests.get(gateway.url + "/status", headers={"X-Webhook-Secret": SECRET}, timeout=5).json()["data"]
    assert reply["version"]
    assert reply["uptime_s"] >= 0
    assert reply["routing_policy"] == "round_robin"
    assert reply["health_check"]["running"] is True
    assert reply["health_check"]["last_sweep"]["duration_s"] >= 0
    assert reply["servers"] == {"total_servers": 1, "healthy_servers": 1, "unhealthy_servers": 0}
    assert reply["requests"] == {
        "total": 1,
        "by_status_class": {"2xx": 1},
        "not_proxied": {"total": 0, "by_status_class": {}},
    }
    assert SECRET not in requests.get(gateway.url + "/health", timeout=5).text


def test_a_reply_too_deep_to_parse_still_ends_its_request(live_gateway, fake_servers):
    gateway = live_gateway()
    gateway.register(fake_servers("B1"))
    response = requests.get(gateway.url + "/api/deep-json", timeout=10)
    assert response.status_code == 200
    assert len(response.content) == 200_000
    assert wait_until(
        lambda: value(scrape(gateway.url), "gateway_requests_total", server="B1", method="GET", status_class="2xx") == 1
    )
    assert value(scrape(gateway.url), "gateway_requests_in_flight", server="B1") == 0


def test_a_backend_cannot_name_itself_in_our_header(live_gateway, fake_servers):
    gateway = live_gateway()
    gateway.register(fake_servers("B1"))
    response = requests.get(gateway.url + "/api/spoof", timeout=5)
    assert response.raw.headers.getlist("X-Backend-Server") == ["B1"]
    assert wait_until(
        lambda: value(scrape(gateway.url), "gateway_requests_total", server="B1", method="GET", status_class="2xx") == 1
    )
    assert not any(dict(labels).get("server", "").startswith("evil") for _, labels in scrape(gateway.url))


def test_a_server_that_leaves_mid_request_does_not_come_back_in_the_metrics(live_gateway, fake_servers):
    gateway = live_gateway()
    server = fake_servers("B1")
    gateway.register(server)
    response = requests.get(gateway.url + "/api/stream?n=3&delay=0&gated=1", stream=True, timeout=10)
    next(response.iter_content(chunk_size=None))
    requests.post(gateway.url + "/webhook/unregister", json={"server_id": "B1", "secret": SECRET}, timeout=5)
    server.stream_gate.set()
    b"".join(response.iter_content(chunk_size=None))
    response.close()
    assert wait_until(
        lambda: (
            value(scrape(gateway.url), "gateway_requests_total", server="none", method="GET", status_class="2xx") == 1
        )
    )
    assert not any(dict(labels).get("server") == "B1" for _, labels in scrape(gateway.url))


def test_a_server_that_leaves_before_it_answers_leaves_no_series_behind(live_gateway, fake_servers):
    gateway = live_gateway()
    server = fake_servers("B1")
    gateway.register(server)
    answered: list[int] = []
    waiting = threading.Thread(
        target=lambda: answered.append(requests.get(gateway.url + "/api/slow?delay=1", timeout=10).status_code)
    )
    waiting.start()
    assert wait_until(lambda: any(r["path"] == "/api/slow" for r in server.requests))
    requests.post(gateway.url + "/webhook/unregister", json={"server_id": "B1", "secret": SECRET}, timeout=5)
    waiting.join(timeout=10)
    assert answered == [200]
    assert not any(dict(labels).get("server") == "B1" for _, labels in scrape(gateway.url))


def test_errors_and_refusals_are_counted_with_their_server(live_gateway, fake_servers):
    gateway = live_gateway(proxy_read_timeout=0.3, proxy_max_body_bytes=100)
    gateway.register(fake_servers("B1"))
    assert requests.get(gateway.url + "/api/slow?delay=2", timeout=10).status_code == 504
    assert requests.post(gateway.url + "/api/echo", data=b"x" * 101, timeout=5).status_code == 413
    assert wait_until(
        lambda: value(scrape(gateway.url), "gateway_requests_total", server="B1", method="GET", status_class="5xx") == 1
    )
    assert wait_until(
        lambda: (
            value(scrape(gateway.url), "gateway_requests_total", server="none", method="POST", status_class="4xx") == 1
        )
    )


def test_draining_ejection_and_the_queue_are_visible(live_gateway, fake_servers):
    gateway = live_gateway(outlier_consecutive_failures=2)
    for name in ("B1", "B2"):
        gateway.register(fake_servers(name))
    gateway.manager.set_draining("B1", True)
    for _ in range(2):
        gateway.manager.report_result("B2", False, "HTTP 500")
    samples = scrape(gateway.url)
    assert value(samples, "gateway_server_draining", server="B1") == 1
    assert value(samples, "gateway_server_draining", server="B2") == 0
    assert value(samples, "gateway_server_ejected", server="B2") == 1
    assert value(samples, "gateway_server_ejected", server="B1") == 0
    assert ("gateway_queue_waiting", ()) in samples


def test_process_platform_and_gc_metrics_are_on_our_registry(live_gateway):
    samples = scrape(live_gateway().url)
    names = {name for name, _ in samples}
    assert {"process_resident_memory_bytes", "process_open_fds", "python_info", "python_gc_collections_total"} <= names


def test_the_content_type_names_its_charset_once(live_gateway):
    response = requests.get(live_gateway().url + "/metrics", timeout=5)
    assert response.headers["Content-Type"].count("charset") == 1


def test_status_counts_requests_no_server_had_apart(live_gateway, fake_servers):
    gateway = live_gateway()
    assert requests.get(gateway.url + "/api/echo", timeout=5).status_code == 503  # server="none"
    gateway.register(fake_servers("B1"))
    assert requests.get(gateway.url + "/api/echo", timeout=5).status_code == 200

    def totals() -> dict:
        return requests.get(gateway.url + "/status", headers={"X-Webhook-Secret": SECRET}, timeout=5).json()["data"]

    assert wait_until(lambda: totals()["requests"]["total"] == 1)
    assert totals()["requests"] == {
        "total": 1,
        "by_status_class": {"2xx": 1},
        "not_proxied": {"total": 1, "by_status_class": {"5xx": 1}},
    }
