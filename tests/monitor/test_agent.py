"""The host agent: a monitor that registers its host with a real gateway on 127.0.0.1 and keeps it registered."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from click.testing import CliRunner
from conftest import SECRET, LiveGateway, free_port
from werkzeug.serving import make_server

from resource_monitor import agent as agent_module
from resource_monitor.__main__ import main
from resource_monitor.agent import Refused, RegistrationAgent, detect_advertise_ip, retry_delay

ROOT = Path(__file__).resolve().parents[2]
FAKES = ROOT / "tests" / "fakes"
TGKILL = {"x86_64": 234, "aarch64": 131}  # the tgkill system call's number, by machine


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


# -- the backoff schedule and the address ----------------------------------------------------


def test_retry_delays_double_from_one_second_up_to_thirty():
    assert [retry_delay(n, rng=lambda: 0.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_retry_delays_are_jittered_down_by_at_most_half():
    assert [retry_delay(n, rng=lambda: 1.0) for n in range(1, 7)] == [0.5, 1, 2, 4, 8, 15]
    for failures in (1, 3, 6, 10_000):
        ceiling = min(30, 2 ** (failures - 1))
        assert all(ceiling / 2 <= retry_delay(failures) <= ceiling for _ in range(50))


def test_retry_delay_takes_its_base_and_cap():
    assert [retry_delay(n, base=0.1, cap=0.5, rng=lambda: 0.0) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]


@pytest.mark.parametrize("url", ["http://127.0.0.1:5000", "http://127.0.0.1", "https://127.0.0.1/base/"])
def test_the_advertised_address_is_the_one_that_routes_to_the_gateway(url):
    assert detect_advertise_ip(url) == "127.0.0.1"


def test_the_advertised_address_over_ipv6():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.connect(("::1", 5000))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert detect_advertise_ip("http://[::1]:5000") == "::1"


# -- the agent in this process ---------------------------------------------------------------


@pytest.fixture
def make_agent() -> Iterator[Callable[..., RegistrationAgent]]:
    """Build agents for server B1; any still running is stopped (without unregistering) after the test."""
    agents: list[RegistrationAgent] = []

    def build(gateway_url: str, **overrides: Any) -> RegistrationAgent:
        options: dict[str, Any] = {
            "secret": SECRET,
            "server_id": "B1",
            "service_port": 8000,
            "monitor_port": 8006,
            "advertise_ip": "127.0.0.1",
        }
        options.update(overrides)
        agent = RegistrationAgent(gateway_url, **options)
        agents.append(agent)
        return agent

    yield build
    for agent in agents:
        agent.stop(unregister=False)


def test_the_agent_registers_the_service_and_monitor_ports(live_gateway, make_agent):
    gateway = live_gateway()
    agent = make_agent(gateway.url, service_port=8123, monitor_port=9006)
    agent.start()
    assert agent.registered.wait(10)
    server = gateway.manager.get_server("B1")
    assert (server.ip, server.port, server.monitor_url) == ("127.0.0.1", 8123, "http://127.0.0.1:9006")

    agent.stop()
    assert gateway.manager.get_server("B1") is None


def test_every_registration_sends_the_current_address(live_gateway, make_agent, monkeypatch):
    addresses = iter(["127.0.0.1", "127.0.0.2"])
    monkeypatch.setattr(agent_module, "detect_advertise_ip", lambda url: next(addresses))
    gateway = live_gateway()
    agent = make_agent(gateway.url, advertise_ip=None)
    agent.register()
    assert gateway.manager.get_server("B1").ip == "127.0.0.1"
    agent.register()  # the host's address changed meanwhile: the next heartbeat moves it
    assert gateway.manager.get_server("B1").ip == "127.0.0.2"


def test_a_refusal_is_logged_and_retried_at_the_longest_interval(live_gateway, make_agent, caplog):
    gateway = live_gateway()
    agent = make_agent(gateway.url, secret="not-the-secret", retry_base=10, retry_cap=0.05)
    with caplog.at_level(logging.ERROR, logger="resource_monitor.agent"):
        agent.start()
        wait_for(lambda: agent.attempts >= 3, what="three attempts")  # 10 s apart were it the usual backoff
    agent.stop(unregister=False)
    assert not agent.registered.is_set()
    assert gateway.manager.get_server("B1") is None
    refusals = [record for record in caplog.records if "refused" in record.getMessage()]
    assert len(refusals) >= 2
    assert all(record.levelno == logging.ERROR and "error 401" in record.getMessage() for record in refusals)
    assert all("not-the-secret" not in record.getMessage() for record in caplog.records)


def test_a_gateway_that_comes_back_is_registered_with_again(make_app, make_agent):
    port = free_port()
    agent = make_agent(f"http://127.0.0.1:{port}", retry_base=0.05, retry_cap=0.2)
    agent.start()
    wait_for(lambda: agent.attempts >= 2, what="failed attempts")
    assert not agent.registered.is_set()
    gateway = GatewayOnPort(make_app(), port)
    try:
        assert agent.registered.wait(10)
        assert gateway.manager.get_server("B1") is not None
    finally:
        gateway.stop()


GATEWAY = "http://gateway.test"


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, {"success": True, "message": "server B1 registered"}, None),
        (401, {"success": False, "message": "invalid secret", "errors": None}, Refused),
        (400, {"success": False, "message": "invalid fields: ip", "errors": {"ip": ["bad"]}}, Refused),
        (404, "<html>not here</html>", Refused),
        (200, "<html>some other site</html>", Refused),  # not the gateway: check --register-to
        (302, "", Refused),  # never follow: the secret would go along
        (408, "", requests.HTTPError),
        (429, {"success": False, "message": "slow down", "errors": None}, requests.HTTPError),
        (502, "", requests.HTTPError),
        (503, {"success": False, "message": "saving failed", "errors": None}, requests.HTTPError),
    ],
)
@responses.activate
def test_what_counts_as_accepted_refused_or_worth_a_quick_retry(make_agent, status, body, outcome):
    headers = {"Location": "https://elsewhere.test/webhook/register"} if status == 302 else None
    kind = "json" if isinstance(body, dict) else "body"
    responses.post(GATEWAY + "/webhook/register", status=status, headers=headers, **{kind: body})
    agent = make_agent(GATEWAY)
    if outcome is None:
        assert agent.register()["success"] is True
    else:
        with pytest.raises(outcome, match=f"error {status}"):
            agent.register()
    sent = responses.calls[0].request
    assert sent.headers["X-Webhook-Secret"] == SECRET
    assert json.loads(sent.body) == {"server_id": "B1", "ip": "127.0.0.1", "port": 8000, "monitor_port": 8006}


# -- the server token (REGISTRATION_BINDING=token) ----------------------------------------------


def test_the_agent_keeps_its_token_and_sends_it_on_every_call(live_gateway, make_agent, tmp_path, caplog):
    gateway = live_gateway(registration_binding="token")
    token_file = tmp_path / "tokens" / "B1.token"
    agent = make_agent(gateway.url, token_file=token_file)

    with caplog.at_level(logging.DEBUG):
        first = agent.register()
        agent.register()  # a heartbeat: the gateway refuses it (403) without the token
        moved = make_agent(gateway.url, token_file=token_file, service_port=8001)  # a restart, on a new port
        moved.register()
        assert moved.unregister()

    token = first["server_token"]
    assert token_file.read_text() == token + "\n"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.parent.stat().st_mode & 0o777 == 0o700
    assert gateway.manager.get_server("B1") is None
    assert token not in caplog.text


def test_an_agent_whose_token_was_reset_keeps_the_new_one(live_gateway, make_agent, tmp_path):
    gateway = live_gateway(registration_binding="token")
    token_file = tmp_path / "B1.token"
    agent = make_agent(gateway.url, token_file=token_file)
    old = agent.register()["server_token"]

    gateway.manager.reset_server_token("B1")
    agent.register()  # sends the old token; the gateway binds a new one

    new = token_file.read_text().strip()
    assert new != old
    assert make_agent(gateway.url, token_file=token_file).register()["success"] is True


def test_a_token_that_cannot_be_saved_is_kept_in_memory(live_gateway, make_agent, tmp_path, caplog):
    gateway = live_gateway(registration_binding="token")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    agent = make_agent(gateway.url, token_file=blocker / "B1.token")  # its folder is a file

    with caplog.at_level(logging.ERROR, logger="resource_monitor.agent"):
        token = agent.register()["server_token"]
        agent.register()

    assert "kept in memory only" in caplog.text
    assert token not in caplog.text
    assert agent.unregister()


@responses.activate
def test_the_token_travels_in_a_header(make_agent, tmp_path):
    (tmp_path / "B1.token").write_text("tok-" + "x" * 40 + "\n")
    responses.post(GATEWAY + "/webhook/register", json={"success": True})
    responses.post(GATEWAY + "/webhook/unregister", json={"success": True})
    agent = make_agent(GATEWAY, token_file=tmp_path / "B1.token")

    agent.register()
    agent.unregister()

    for call in responses.calls:
        assert call.request.headers["X-Server-Token"] == "tok-" + "x" * 40
        assert "tok-" not in call.request.body.decode()


# -- the command, as a GPU host runs it ------------------------------------------------------


class GatewayOnPort(LiveGateway):
    """A live gateway on a port chosen beforehand, for an agent that started first."""

    def __init__(self, app, port: int) -> None:
        self.app = app
        self.server = make_server("127.0.0.1", port, app, threaded=True)
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()


class MonitorProcess:
    """`python -m resource_monitor --device gpu ...` over the fake pynvml, in its own session."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.monitor_port = free_port()
        self.monitor_url = f"http://127.0.0.1:{self.monitor_port}"
        self.log_path = workdir / f"agent-{self.monitor_port}.log"
        full_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(FAKES), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "WEBHOOK_SECRET": SECRET,
            "XDG_STATE_HOME": str(workdir / "state"),  # the default token file's folder, never the real one
            **(env or {}),
        }
        command = [
            *(sys.executable, "-m", "resource_monitor", "--device", "gpu"),
            *("--host", "127.0.0.1", "--port", str(self.monitor_port)),
            *args,
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal it (by the PID we started) and return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            pytest.fail(f"the agent did not exit within {timeout} s after signal {sig}:\n{self.log()}")

    def signal_a_thread(self, sig: int) -> None:
        """Send `sig` to one of its threads other than the main one (tgkill), as the kernel may choose to."""
        pid = self.process.pid
        others = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
        assert others, "the monitor has no thread besides its main one"
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(TGKILL[platform.machine()], pid, others[0], sig) != 0:
            raise OSError(ctypes.get_errno(), "tgkill failed")

    def exit_status(self, timeout: float = 20) -> int:
        """Wait for it to exit by itself, signalled already; fail (and kill it) past the deadline."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the agent did not exit within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL it (by the PID we started) if it still runs, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class AgentProcess(MonitorProcess):
    """The monitor with `--register-to URL`: it joins the fleet as B1, its service on port 8000."""

    def __init__(self, workdir: Path, gateway_url: str, *extra: str, env: dict[str, str] | None = None) -> None:
        joins = ("--register-to", gateway_url, "--server-id", "B1", "--service-port", "8000")
        super().__init__(workdir, *joins, *extra, env=env)


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start agents as subprocesses; any still running is killed at the end of the test."""
    started: list[AgentProcess] = []

    def start(gateway_url: str, *extra: str, **env: str) -> AgentProcess:
        process = AgentProcess(tmp_path, gateway_url, *extra, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def registered(gateway: LiveGateway, agent: AgentProcess, timeout: float = 15.0):
    """The gateway's record of B1 once the agent has registered it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server = gateway.manager.get_server("B1")
        if server is not None:
            return server
        if agent.process.poll() is not None:
            pytest.fail(f"the agent exited with {agent.process.returncode}:\n{agent.log()}")
        time.sleep(0.05)
    pytest.fail(f"B1 was not registered within {timeout} s:\n{agent.log()}")


def test_a_gpu_host_joins_with_one_command(live_gateway, agent_process):
    gateway = live_gateway()
    agent = agent_process(gateway.url)
    server = registered(gateway, agent)
    assert (server.ip, server.port) == ("127.0.0.1", 8000)
    assert server.monitor_url == agent.monitor_url

    reading = requests.get(agent.monitor_url + "/resources", timeout=5).json()
    assert [gpu["name"] for gpu in reading["gpus"]] == ["NVIDIA Fake A100", "NVIDIA Fake T4"]
    assert requests.get(agent.monitor_url + "/health", timeout=5).status_code == 200
    assert agent.stop() == 0


def test_the_agent_waits_for_a_gateway_that_starts_later(make_app, agent_process):
    port = free_port()
    agent = agent_process(f"http://127.0.0.1:{port}")
    wait_for(lambda: "cannot register B1" in agent.log(), what="a failed attempt")
    gateway = GatewayOnPort(make_app(), port)
    try:
        server = registered(gateway, agent, timeout=20)
        assert server.monitor_url == agent.monitor_url
        assert agent.process.poll() is None
    finally:
        gateway.stop()


def test_heartbeats_register_the_host_again(live_gateway, agent_process):
    gateway = live_gateway()
    agent = agent_process(gateway.url, "--heartbeat", "1")
    registered(gateway, agent)
    assert gateway.manager.unregister_server("B1")
    registered(gateway, agent, timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_unregisters_and_exits_0(live_gateway, agent_process, sig):
    gateway = live_gateway()
    agent = agent_process(gateway.url)
    registered(gateway, agent)
    assert agent.stop(sig) == 0
    assert gateway.manager.get_server("B1") is None
    assert "unregistered B1" in agent.log()
    with pytest.raises(requests.ConnectionError):
        requests.get(agent.monitor_url + "/health", timeout=2)


@pytest.mark.skipif(platform.machine() not in TGKILL, reason="tgkill's number is known for x86_64 and aarch64")
def test_a_sigterm_the_kernel_hands_to_another_thread_still_stops_it(live_gateway, agent_process):
    """A process-wide signal may land on any thread; the main one must still see it and stop."""
    gateway = live_gateway()
    agent = agent_process(gateway.url)
    registered(gateway, agent)
    agent.signal_a_thread(signal.SIGTERM)
    assert agent.exit_status() == 0
    assert gateway.manager.get_server("B1") is None
    assert "unregistered B1" in agent.log()


def test_a_bound_host_keeps_its_token_in_the_state_folder_and_leaves_with_it(live_gateway, agent_process, tmp_path):
    gateway = live_gateway(registration_binding="token")
    agent = agent_process(gateway.url, "--heartbeat", "1")
    registered(gateway, agent)
    token_file = tmp_path / "state" / "gpu-monitor" / "B1.token"
    wait_for(token_file.exists, what="the token file")
    metrics = gateway.app.extensions["metrics"].registry

    def registrations(result: str) -> float:
        return metrics.get_sample_value("gateway_registrations_total", {"result": result}) or 0

    wait_for(lambda: registrations("ok") >= 3, what="two heartbeats after the first registration")
    assert registrations("bad_token") == 0
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert agent.stop() == 0
    assert gateway.manager.get_server("B1") is None  # the unregistration carried the token
    assert "refused" not in agent.log()
    assert token_file.read_text().strip() not in agent.log()


def test_sigterm_exits_0_while_the_gateway_is_down(agent_process):
    agent = agent_process(f"http://127.0.0.1:{free_port()}")
    wait_for(lambda: "cannot register B1" in agent.log(), what="a failed attempt")
    assert agent.stop() == 0
    assert "cannot unregister B1" in agent.log()


def test_nvml_failing_does_not_stop_the_host_joining(live_gateway, agent_process):
    gateway = live_gateway()
    agent = agent_process(gateway.url, FAKE_NVML_FAIL_INIT="1")
    registered(gateway, agent)
    response = requests.get(agent.monitor_url + "/health", timeout=5)
    assert (response.status_code, response.json()["error"]) == (503, "NVML Shared Library Not Found")
    assert agent.stop() == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--register-to", "http://127.0.0.1:5000", "--server-id", "B1", "--service-port", "8000"],
            {},
            "WEBHOOK_SECRET",
        ),
        (
            ["--register-to", "http://127.0.0.1:5000", "--service-port", "8000"],
            {"WEBHOOK_SECRET": SECRET},
            "--server-id",
        ),
        (["--register-to", "http://127.0.0.1:5000", "--server-id", "B1"], {"WEBHOOK_SECRET": SECRET}, "--service-port"),
        (["--register-to", "ftp://gateway", "--server-id", "B1", "--service-port", "1"], {}, "--register-to"),
        (["--register-to", "http://g:1", "--server-id", "B 1", "--service-port", "1"], {}, "--server-id"),
        (["--server-id", "B1"], {}, "--register-to"),
        (
            ["--register-to", "http://g:1", "--server-id", "B1", "--service-port", "1", "--token-file", "/"],
            {"WEBHOOK_SECRET": SECRET},
            "--token-file",
        ),
        (
            ["--register-to", "http://g:1", "--server-id", "B1", "--service-port", "1", "--heartbeat", "0"],
            {},
            "--heartbeat",
        ),
    ],
)
def test_the_command_refuses_incomplete_registration_options(args, env, message):
    result = CliRunner().invoke(main, ["--device", "gpu", *args], env={"WEBHOOK_SECRET": None, **env})
    assert result.exit_code == 2, result.output
    assert message in result.output
