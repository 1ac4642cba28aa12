"""Starting the two Python gateways under gunicorn: ours as deployed, and the naive floor."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from processes import HOST, Service, ServiceFailed

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
VENV_BIN = Path(sys.executable).parent
GUNICORN = str(VENV_BIN / "gunicorn")
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


class Gateway:
    """Our gateway under `gunicorn -c deploy/gunicorn.conf.py app:app`, on a folder of its own."""

    def __init__(self, service: Service, port: int, secret: str, folder: Path) -> None:
        self.service = service
        self.port = port
        self.secret = secret
        self.folder = folder

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://{HOST}:{self.port}"

    def register(self, server_id: str, port: int, ip: str = HOST, **options: Any) -> dict[str, Any]:
        """Register a server through `POST /webhook/register` (with routing `options`); raise unless it answers 200."""
        body = {"server_id": server_id, "ip": ip, "port": port, "secret": self.secret, **options}
        return self._webhook("register", body)

    def unregister(self, server_id: str) -> dict[str, Any]:
        """Remove a server through `POST /webhook/unregister`; raise unless it answers 200."""
        return self._webhook("unregister", {"server_id": server_id, "secret": self.secret})

    def _webhook(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        status, reply = post_json(HOST, self.port, f"/webhook/{action}", body)
        if status != 200:
            raise ServiceFailed(f"{action} {body['server_id']} got HTTP {status}: {reply}")
        return dict(reply)

    def register_stand_ins(self, ports: Sequence[int]) -> None:
        """Register S1, S2, ... at the stand-ins' ports."""
        for number, port in enumerate(ports, start=1):
            self.register(f"S{number}", port)

    def stop(self) -> None:
        """Stop gunicorn by its PID (SIGTERM, then SIGKILL for what is left)."""
        self.service.stop(timeout_s=15)


def gateway_env(folder: Path, port: int, secret: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of our gateway: the shipped defaults, its files in `folder`, and `extra`."""
    env = {key: os.environ[key] for key in BASE_ENV if key in os.environ}  # no stray gateway settings
    env.update(
        WEBHOOK_SECRET=secret,
        BACKEND_SERVERS_FILE=str(folder / "backend_servers.json"),
        TASK_AFFINITY_FILE=str(folder / "task_affinity.db"),
        JOB_STORE_FILE=str(folder / "jobs.db"),
        ALLOCATION_STORE_FILE=str(folder / "allocations.db"),
        GATEWAY_BIND=f"{HOST}:{port}",
        LOG_LEVEL="INFO",
    )
    env.update(extra or {})
    return env


def start_gateway(folder: Path, port: int, extra_env: Mapping[str, str] | None = None, name: str = "ours") -> Gateway:
    """Start our gateway exactly as deploy/ ships it; wait until `/health` answers."""
    folder.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(24)
    argv = [GUNICORN, "-c", "deploy/gunicorn.conf.py", "app:app"]
    service = Service(name, argv, folder / "gateway.log", cwd=REPO, env=gateway_env(folder, port, secret, extra_env))
    try:
        wait_for_health(service, port)
    except BaseException:
        service.stop()
        raise
    return Gateway(service, port, secret, folder)


def start_naive_gateway(folder: Path, port: int, backend_urls: Sequence[str], workers: int = 2) -> Service:
    """Start bench/naive_gateway.py with gunicorn's gevent worker."""
    env = dict(os.environ, NAIVE_BACKENDS=",".join(backend_urls))
    argv = [GUNICORN, "-k", "gevent", "-w", str(workers), "-b", f"{HOST}:{port}", "--chdir", str(BENCH)]
    argv += ["--worker-connections", "2000", "--log-level", "warning", "naive_gateway:app"]
    service = Service("naive", argv, folder / "naive.log", cwd=BENCH, env=env)
    try:
        service.wait_for_port(port)
    except BaseException:
        service.stop()
        raise
    return service


def wait_for_health(service: Service, port: int, timeout_s: float = 60.0) -> None:
    """Poll `GET /health` until it answers 200; raise if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        service.check_running()
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.1)
    raise ServiceFailed(f"{service.name} did not answer /health within {timeout_s:g}s:\n{service.log_tail()}")


def post_json(
    host: str,
    port: int,
    path: str,
    body: dict[str, Any],
    timeout_s: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """POST a JSON body (with any extra `headers`) on a new connection; return the status and the decoded reply."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")
