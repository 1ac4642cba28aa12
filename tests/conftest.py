"""Fixtures: a fresh gateway per test on tmp_path, real fake GPU servers, real gateway processes.

No test reaches past this machine's loopback: the network guard (tests/offline/network_guard.py)
refuses every connection elsewhere, in this process and in the Python processes the tests start,
and the test that made one fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from redis_process import RedisProcess
from werkzeug.serving import make_server

from demo.fake_gpu_server import FakeGPUServer
from gateway.app import create_app
from gateway.config import Config

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-5f2b9c0e7d41a8"
OFFLINE = ROOT / "tests" / "offline"

if str(OFFLINE) not in sys.path:  # conftest may be imported twice, as `conftest` and `tests.conftest`
    sys.path.insert(0, str(OFFLINE))
import network_guard  # noqa: E402  (it lives in tests/offline, which the line above makes importable)

network_guard.install(to_file=False)
# Every Python process a test starts with this environment loads tests/offline/sitecustomize.py,
# which installs the guard there too and writes what it refused to this file.
GUARD_LOG = network_guard.guard_children(str(OFFLINE))
os.environ["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"  # pip run by a test must not ask the index about itself


class NetworkGuard:
    """What the guard refused during one test; `take()` hands them over, for the tests of the guard itself."""

    def __init__(self) -> None:
        self._seen = len(network_guard.violations)
        self._log_offset = Path(GUARD_LOG).stat().st_size

    def take(self) -> list[str]:
        """The connections refused since the test began (here and in the processes it started), then forget them."""
        refused = network_guard.violations[self._seen :]
        with open(GUARD_LOG, encoding="utf-8") as log:
            log.seek(self._log_offset)
            started = [line.rstrip("\n") for line in log.read().splitlines()]
        self._seen = len(network_guard.violations)
        self._log_offset = Path(GUARD_LOG).stat().st_size
        return refused + started


@pytest.fixture(autouse=True)
def network_guard_check() -> Iterator[NetworkGuard]:
    """Fail the test when it (or a thread or process it started) tried to connect beyond the loopback.

    Autouse, so it is set up first and torn down last: checks still running in the background when
    the test's gateways shut down are counted too.
    """
    guard = NetworkGuard()
    yield guard
    refused = guard.take()
    if refused:
        pytest.fail(
            "connections beyond the loopback were refused (tests must never leave this machine):\n  "
            + "\n  ".join(refused),
            pytrace=False,
        )


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a Config on tmp_path; keyword arguments override fields."""

    def build(**overrides: object) -> Config:
        values: dict[str, object] = {
            "backend_servers_file": str(tmp_path / "backend_servers.json"),
            "task_affinity_file": str(tmp_path / "task_affinity.db"),
            "job_store_file": str(tmp_path / "jobs.db"),
            "allocation_store_file": str(tmp_path / "allocations.db"),
            "health_check_interval": 3600.0,  # tests that want the job lower it
            "health_check_timeout": 1.0,
            "proxy_connect_timeout": 2.0,
            "proxy_read_timeout": 10.0,
        }
        values.update(overrides)
        return Config.from_env({"WEBHOOK_SECRET": SECRET}, **values)

    return build


@pytest.fixture
def make_app(make_config: Callable[..., Config]) -> Iterator[Callable[..., object]]:
    """Build gateways, each shut down at the end of the test; `check_on_register=True` checks servers as they join."""
    apps = []

    def build(config: Config | None = None, check_on_register: bool = False, **overrides: object):
        app = create_app(config or make_config(**overrides))
        app.config["TESTING"] = True
        # Tests register addresses nothing listens on, and most do not look at health: as the
        # sweep waits an hour, no check goes out when a server registers unless a test asks for it.
        app.extensions["backend_manager"].check_on_register = check_on_register
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["gateway_shutdown"]()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def manager(app):
    return app.extensions["backend_manager"]


class LiveGateway:
    """A gateway served over real HTTP by werkzeug's threaded server, in this process."""

    def __init__(self, app) -> None:
        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def manager(self):
        return self.app.extensions["backend_manager"]

    def register(self, server: FakeGPUServer, server_id: str | None = None) -> requests.Response:
        body = {"server_id": server_id or server.server_id, "ip": "127.0.0.1", "port": server.port, "secret": SECRET}
        response = requests.post(self.url + "/webhook/register", json=body, timeout=5)
        response.raise_for_status()
        # The gateway checks a new server in the background once it has answered: wait for that
        # check, so that the test goes on from a settled fleet.
        assert wait_until(lambda: not self.manager.health_job.checking_soon), "the registration's check never ended"
        return response

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def live_gateway(make_app) -> Iterator[Callable[..., LiveGateway]]:
    """Serve gateways over HTTP on 127.0.0.1; stopped at the end of the test."""
    gateways: list[LiveGateway] = []

    def start(app=None, **overrides: object) -> LiveGateway:
        gateway = LiveGateway(app or make_app(**overrides))
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        gateway.stop()


@pytest.fixture
def fake_servers() -> Iterator[Callable[..., FakeGPUServer]]:
    """Start fake GPU servers on 127.0.0.1; all are stopped at the end of the test."""
    servers: list[FakeGPUServer] = []

    def start(server_id: str, port: int = 0, keep_keys: bool = False) -> FakeGPUServer:
        server = FakeGPUServer(server_id, "127.0.0.1", port, keep_keys=keep_keys).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.socket.fileno() != -1:
            server.stop()


class RawServer:
    """A TCP server on 127.0.0.1 that hands each connection to `handle`, in a thread of its own."""

    def __init__(self, handle: Callable[[socket.socket], object]) -> None:
        self.handle = handle
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.run, args=(conn,), daemon=True).start()

    def run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            self.handle(conn)

    def close(self) -> None:
        self.sock.close()


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds or `timeout` passes (a bound, never an assertion of speed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    """gunicorn running the gateway as deploy/gunicorn.conf.py ships it, in its own session."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"gateway-{self.port}.log"
        full_env = {**os.environ, **env, "GATEWAY_BIND": f"127.0.0.1:{self.port}", "WEBHOOK_SECRET": SECRET}
        full_env.setdefault("BACKEND_SERVERS_FILE", str(workdir / "backend_servers.json"))
        full_env.setdefault("TASK_AFFINITY_FILE", str(workdir / "task_affinity.db"))
        full_env.setdefault("JOB_STORE_FILE", str(workdir / "jobs.db"))
        full_env.setdefault("ALLOCATION_STORE_FILE", str(workdir / "allocations.db"))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py"), "app:app"],
                cwd=ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # gunicorn listens before its workers boot
                time.sleep(0.1)
        raise RuntimeError(f"gateway did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (master and worker), by the PID we started."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gunicorn gateways; every one is killed at the end of the test."""
    started: list[GatewayProcess] = []

    def start(**env: str) -> GatewayProcess:
        process = GatewayProcess(tmp_path, env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def fake_llm_servers() -> Iterator[Callable[..., object]]:
    """Start fake Ollama/OpenAI servers (demo/fake_llm_server.py) on 127.0.0.1; all stop at the end of the test."""
    from demo.fake_llm_server import FakeLLMServer  # here, so this fixture is all that was added

    servers: list[FakeLLMServer] = []

    def start(server_id: str, **options: object) -> FakeLLMServer:
        server = FakeLLMServer(server_id, **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.socket.fileno() != -1:
            server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A real redis-server on a free port with its data in tmp_path; stopped by PID at the end."""
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def fake_monitors() -> Iterator[Callable[..., object]]:
    """Start resource monitor stand-ins (tests/fake_monitor.py) serving a given /resources; stopped at the end."""
    from fake_monitor import FakeMonitor  # here, so this fixture is all that was added

    monitors: list[FakeMonitor] = []

    def start(document: dict) -> FakeMonitor:
        monitors.append(FakeMonitor(document))
        return monitors[-1]

    yield start
    for monitor in monitors:
        monitor.stop()
