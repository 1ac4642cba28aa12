"""The pull agent: a monitor that leases jobs from a real gateway on 127.0.0.1 and runs them on a fake GPU."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from conftest import SECRET, free_port, wait_until
from test_agent import GatewayOnPort, MonitorProcess

from resource_monitor.__main__ import main
from resource_monitor.pull import PullAgent
from resource_monitor.pull_ws import WebSocketPullAgent

ASYNC = {"Prefer": "respond-async"}


def submit(gateway, path: str = "/api/echo", data: bytes = b"hello", method: str = "POST") -> str:
    answer = requests.request(method, gateway.url + path, data=data, headers=ASYNC, timeout=5)
    assert answer.status_code == 202, answer.text
    return answer.json()["job_id"]


def job_state(gateway, job_id: str) -> dict:
    return requests.get(f"{gateway.url}/jobs/{job_id}", timeout=5).json()


def finished(gateway, job_id: str, timeout: float = 20.0) -> dict:
    done = ("succeeded", "failed", "cancelled", "expired")
    assert wait_until(lambda: job_state(gateway, job_id)["status"] in done, timeout), job_state(gateway, job_id)
    return job_state(gateway, job_id)


@pytest.fixture
def pull_process(tmp_path: Path) -> Iterator[Callable[..., MonitorProcess]]:
    """Start `--pull-from` monitors (worker W1) as subprocesses; any still running is killed at the end."""
    started: list[MonitorProcess] = []

    def start(gateway_url: str, forward_to: str, *extra: str) -> MonitorProcess:
        pulls = ("--pull-from", gateway_url, "--forward-to", forward_to, "--worker-id", "W1")
        # The gateway has no WORKER_TOKEN: its webhook secret serves.
        process = MonitorProcess(tmp_path, *pulls, *extra, env={"WORKER_TOKEN": SECRET})
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def make_puller() -> Iterator[Callable[..., PullAgent]]:
    """Pull agents in this process, worker W1; each is stopped after the test."""
    agents: list[PullAgent] = []

    def build(gateway_url: str, forward_to: str, **overrides: Any) -> PullAgent:
        options: dict[str, Any] = {"worker_id": "W1", "routes": ["/api/"], "wait": 5, "retry_base": 0.05}
        agent = PullAgent(gateway_url, SECRET, forward_to, **{**options, **overrides})
        agents.append(agent)
        agent.start()
        return agent

    yield build
    for agent in agents:
        agent.stop()


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


# -- the command, as a GPU host behind NAT runs it ---------------------------------------------


def test_a_job_with_no_push_server_is_run_by_the_pull_agent(gateway_process, fake_servers, pull_process):
    gateway = gateway_process()
    gpu = fake_servers("local")  # the host's own GPU service: never registered with the gateway
    agent = pull_process(gateway.url, url(gpu))
    job_id = submit(gateway, "/api/echo?n=1", b'{"prompt": "a cat"}')
    state = finished(gateway, job_id)
    assert (state["status"], state["server_id"], state["attempts"]) == ("succeeded", "W1", 1), agent.log()
    result = requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5)
    assert result.status_code == 200
    assert result.headers["X-Job-Id"] == job_id
    assert result.headers["X-Custom"] == "kept"  # the service's own headers, as it sent them
    echo = result.json()
    assert (echo["method"], echo["path"], echo["query"]) == ("POST", "/api/echo", "n=1")
    assert echo["body"] == '{"prompt": "a cat"}'
    assert echo["headers"]["Idempotency-Key"] == job_id
    assert SECRET not in json.dumps(echo["headers"])  # the worker credential stays with the gateway
    assert [r["path"] for r in gpu.requests] == ["/api/echo"]
    assert agent.stop() == 0
    assert SECRET not in agent.log()


def test_sigterm_hands_back_a_running_job_and_exits_0(gateway_process, fake_servers, pull_process):
    gateway = gateway_process()
    gpu = fake_servers("local")
    agent = pull_process(gateway.url, url(gpu))
    job_id = submit(gateway, "/api/slow?delay=30", method="GET")
    assert wait_until(lambda: job_state(gateway, job_id)["status"] == "running", 20), agent.log()
    assert agent.stop() == 0
    state = job_state(gateway, job_id)
    assert (state["status"], state["attempts"]) == ("queued", 1), agent.log()
    assert "the worker stopped" in state["error"]
    assert "handed back" in agent.log()


def test_the_websocket_agent_gets_jobs_pushed_and_a_stop_queues_its_job_again(
    gateway_process, fake_servers, pull_process
):
    gateway = gateway_process()
    gpu = fake_servers("local")
    agent = pull_process(gateway.url, url(gpu), "--transport", "ws", "--max-jobs", "2")
    job_id = submit(gateway, "/api/echo?n=2", b"over the socket")
    state = finished(gateway, job_id)
    assert (state["status"], state["server_id"]) == ("succeeded", "W1"), agent.log()
    echo = requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5).json()
    assert (echo["body"], echo["headers"]["Idempotency-Key"]) == ("over the socket", job_id)
    slow = submit(gateway, "/api/slow?delay=30", method="GET")
    assert wait_until(lambda: job_state(gateway, slow)["status"] == "running", 20), agent.log()
    assert agent.stop() == 0
    assert wait_until(lambda: job_state(gateway, slow)["status"] == "queued", 10), agent.log()
    assert "disconnected" in job_state(gateway, slow)["error"]
    assert SECRET not in agent.log()


def test_a_cancel_pushed_over_the_socket_stops_the_job(gateway_process, fake_servers):
    gateway = gateway_process()
    gpu = fake_servers("local")
    agent = WebSocketPullAgent(gateway.url, SECRET, url(gpu), "W1", routes=["/api/"], retry_base=0.05)
    agent.start()
    try:
        job_id = submit(gateway, "/api/slow?delay=20", method="GET")
        assert wait_until(lambda: job_id in agent.held, 20)
        requests.delete(f"{gateway.url}/jobs/{job_id}", timeout=5)
        assert wait_until(lambda: agent.held.get(job_id) is None or agent.held[job_id].over.is_set(), 10)
        assert job_state(gateway, job_id)["status"] == "cancelled"
    finally:
        agent.stop()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--transport", "ws"], {}, "--pull-from"),
        (["--forward-to", "http://127.0.0.1:8000"], {}, "--pull-from"),
        (["--routes", "/api/"], {}, "--pull-from"),
        (["--pull-from", "http://127.0.0.1:5000"], {}, "WORKER_TOKEN"),
        (["--pull-from", "ftp://gateway"], {"WORKER_TOKEN": SECRET}, "--pull-from"),
        (["--pull-from", "http://g:1", "--forward-to", "127.0.0.1:8000"], {"WORKER_TOKEN": SECRET}, "--forward-to"),
        (["--pull-from", "http://g:1", "--max-jobs", "0"], {"WORKER_TOKEN": SECRET}, "--max-jobs"),
        (["--pull-from", "http://g:1", "--wait", "31"], {"WORKER_TOKEN": SECRET}, "--wait"),
        (["--pull-from", "http://g:1", "--worker-id", "W 1"], {"WORKER_TOKEN": SECRET}, "--worker-id"),
    ],
)
def test_the_command_refuses_incomplete_pull_options(args, env, message):
    result = CliRunner().invoke(
        main, ["--device", "gpu", *args], env={"WEBHOOK_SECRET": None, "WORKER_TOKEN": None, **env}
    )
    assert result.exit_code == 2, result.output
    assert message in result.output


# -- the agent in this process -----------------------------------------------------------------


def test_heartbeats_keep_a_long_job_leased(live_gateway, fake_servers, make_puller):
    gateway = live_gateway(job_lease_seconds=2)
    gpu = fake_servers("local")
    make_puller(gateway.url, url(gpu))
    job_id = submit(gateway, "/api/slow?delay=5", method="GET")
    state = finished(gateway, job_id)
    assert (state["status"], state["attempts"]) == ("succeeded", 1)  # its lease never ran out
    assert [r["path"] for r in gpu.requests] == ["/api/slow"]
    listed = requests.get(gateway.url + "/admin/workers", headers={"Authorization": f"Bearer {SECRET}"}, timeout=5)
    assert listed.json()["data"]["workers"][0]["last_heartbeat_at"] is not None


def test_runs_up_to_max_jobs_at_once(live_gateway, fake_servers, make_puller):
    gateway = live_gateway()
    gpu = fake_servers("local")
    ids = [submit(gateway, f"/api/echo?n={n}") for n in range(5)]
    make_puller(gateway.url, url(gpu), max_jobs=3)
    assert {finished(gateway, job_id)["status"] for job_id in ids} == {"succeeded"}
    assert sorted(r["query"]["n"] for r in gpu.requests) == ["0", "1", "2", "3", "4"]


def test_a_local_service_that_is_down_fails_the_job_for_a_retry(live_gateway, make_puller):
    gateway = live_gateway(job_max_attempts=2)
    agent = make_puller(gateway.url, f"http://127.0.0.1:{free_port()}")
    job_id = submit(gateway, "/api/enhance")  # a POST: nothing was sent, so a retry is safe
    state = finished(gateway, job_id)
    assert (state["status"], state["attempts"]) == ("failed", 2)
    assert "cannot reach the local service" in state["error"]
    assert agent.local_failures >= 2  # it leases less often while the service is down


@pytest.mark.parametrize(("method", "attempts"), [("POST", 1), ("GET", 2)])
def test_a_5xx_is_kept_and_tried_again_only_where_a_repeat_is_safe(
    live_gateway, fake_servers, make_puller, method, attempts
):
    gateway = live_gateway(job_max_attempts=2)
    gpu = fake_servers("local")
    make_puller(gateway.url, url(gpu))
    job_id = submit(gateway, "/api/status-code?code=503", method=method)
    state = finished(gateway, job_id)
    assert (state["status"], state["attempts"]) == ("failed", attempts)
    assert "HTTP 503" in state["error"]
    result = requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5)
    assert (result.status_code, result.json()["code"]) == (503, "503")  # the service's own answer
    assert len(gpu.requests) == attempts


def test_a_cancelled_job_is_dropped_at_its_next_heartbeat(live_gateway, fake_servers, make_puller):
    gateway = live_gateway(job_lease_seconds=1)
    gpu = fake_servers("local")
    agent = make_puller(gateway.url, url(gpu))
    job_id = submit(gateway, "/api/slow?delay=3", method="GET")
    assert wait_until(lambda: job_id in agent.held)
    held = agent.held[job_id]
    assert requests.delete(f"{gateway.url}/jobs/{job_id}", timeout=5).status_code == 200
    assert wait_until(lambda: held.why == "it was cancelled")  # while its request still runs
    assert job_id in agent.held
    assert wait_until(lambda: job_id not in agent.held)
    assert job_state(gateway, job_id)["status"] == "cancelled"
    assert requests.get(f"{gateway.url}/jobs/{job_id}/result", timeout=5).status_code == 410


def test_the_agent_waits_for_a_gateway_that_starts_later(make_app, fake_servers, make_puller):
    port = free_port()
    gpu = fake_servers("local")
    agent = make_puller(f"http://127.0.0.1:{port}", url(gpu), retry_base=0.05, retry_cap=0.2)
    assert wait_until(lambda: agent.attempts >= 3)  # refused connections, retried with the backoff
    gateway = GatewayOnPort(make_app(), port)
    try:
        job_id = submit(gateway)
        assert finished(gateway, job_id)["status"] == "succeeded"
    finally:
        gateway.stop()


def test_a_wrong_token_is_retried_at_the_longest_interval(live_gateway, fake_servers):
    gateway = live_gateway()
    agent = PullAgent(gateway.url, "not-the-token-0000", url(fake_servers("local")), "W1", ["/api/"], retry_cap=0.05)
    agent.start()
    try:
        assert wait_until(lambda: agent.attempts >= 3)
        job_id = submit(gateway)
        assert job_state(gateway, job_id)["status"] == "queued"
    finally:
        agent.stop()
