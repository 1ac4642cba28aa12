"""`make demo` and `make run` as a newcomer runs them, and the demo's fake servers."""

import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SECRET, free_port

from demo.fake_gpu_server import FakeGPUServer, Handler

FAKES = ["demo/fake_gpu_server.py", "demo/fake_llm_server.py"]


def test_demo_shows_the_rotation_and_cleans_up(tmp_path):
    venv = Path(sys.executable).parent.parent
    env = {
        **os.environ,
        "VENV": str(venv),
        "DEMO_ONESHOT": "1",
        "DEMO_DIR": str(tmp_path),
        "GATEWAY_BIND": f"127.0.0.1:{free_port()}",
        "WEBHOOK_SECRET": SECRET,
    }
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    served = [line.rsplit(" ", 1)[-1] for line in result.stdout.splitlines() if "X-Backend-Server:" in line]
    assert served == ["B1", "B2", "B3", "B1", "B2", "B3"]
    ports = [int(env["GATEWAY_BIND"].rsplit(":", 1)[1])]
    for name in ("B1", "B2", "B3"):
        ports.append(int(re.search(r"127\.0\.0\.1:(\d+)", (tmp_path / f"{name}.log").read_text()).group(1)))
    for port in ports:  # everything the demo started has stopped
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


STARTS = [("scripts/run-gateway.sh", "make run"), ("scripts/demo.sh", "make demo")]


@pytest.mark.parametrize(("script", "again"), STARTS)
def test_a_busy_port_stops_the_start_with_a_hint(tmp_path, script, again):
    venv = Path(sys.executable).parent.parent
    env = {**os.environ, "VENV": str(venv), "WEBHOOK_SECRET": SECRET, "DEMO_DIR": str(tmp_path)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env["GATEWAY_BIND"] = f"127.0.0.1:{port}"
        result = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"port {port} is in use" in result.stderr
    assert f"GATEWAY_BIND=127.0.0.1:{port + 1} {again}" in result.stderr
    assert "gunicorn" not in result.stdout + result.stderr  # it never started


@pytest.mark.parametrize("script", FAKES)
def test_a_fakes_help_keeps_its_lines(script):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert any(line.startswith("--register-to http://127.0.0.1:5000") for line in lines), result.stdout


@pytest.mark.parametrize("script", FAKES)
def test_a_fake_told_to_register_without_the_secret_says_so(script):
    env = {key: value for key, value in os.environ.items() if key != "WEBHOOK_SECRET"}
    command = [sys.executable, script, "--server-id", "B1", "--register-to", f"http://127.0.0.1:{free_port()}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--register-to needs the gateway's webhook secret in WEBHOOK_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


class RecordingConnection:
    """A client's socket as the handler sees it: requests to read, and a record of each send."""

    def __init__(self, requests: bytes) -> None:
        self.requests = io.BytesIO(requests)
        self.sends: list[bytes] = []
        self.options: dict[tuple[int, int], object] = {}

    def makefile(self, mode: str, buffering: int = -1) -> io.BytesIO:
        assert mode == "rb"
        return self.requests

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))

    def setsockopt(self, level: int, option: int, value: object) -> None:
        self.options[(level, option)] = value

    def settimeout(self, timeout: float | None) -> None:
        pass


@pytest.mark.parametrize("path", ["/api/echo", "/health", "/api/status/none"])
def test_the_fake_gpu_server_answers_each_request_in_one_send_without_nagle(path):
    """Two writes per answer on a kept-alive connection would wait on the client's delayed ACK."""
    server = FakeGPUServer("B1")
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        connection = RecordingConnection(request * 2)  # two requests on one kept-alive connection
        Handler(connection, ("127.0.0.1", 50000), server)
    finally:
        server.server_close()
    assert connection.options[(socket.IPPROTO_TCP, socket.TCP_NODELAY)]
    assert len(connection.sends) == 2
    for sent in connection.sends:
        head, _, body = sent.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        assert head.startswith(b"HTTP/1.1 ") and len(body) == length > 0
