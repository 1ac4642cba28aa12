"""nginx in two roles: the fast stand-in GPU servers, and the round-robin proxy that sets the ceiling."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from processes import HOST, Service, free_port

STAND_INS = 3  # stand-in GPU servers, one nginx port each
GET_PATH, POST_PATH = "/api/echo", "/api/post"  # what wrk asks for; the stand-ins answer any path
REPLY = '{"ok":true}'
POSTED_REPLY = '{"ok":true,"posted":true}'
HEALTH_REPLY = '{"status":"ok"}'


def nginx_binary() -> str:
    """The nginx to run: on PATH, or Debian's /usr/sbin/nginx (not on a non-root PATH)."""
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_version() -> str:
    """`nginx -v`'s answer, e.g. nginx/1.22.1."""
    done = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def _common(folder: Path, name: str) -> str:
    """The top of a config: one worker, no daemon, every path inside `folder`."""
    temp = folder / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {temp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
daemon off;
pid {folder / name}.pid;
error_log {folder / name}-error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{temp_paths}
"""


def stand_ins_config(folder: Path, ports: Sequence[int]) -> str:
    """One nginx, one server block per stand-in port: fixed JSON for GET and POST, and /health."""
    servers = []
    for number, port in enumerate(ports, start=1):
        servers.append(
            f"""    server {{
        listen {HOST}:{port} backlog=4096;
        default_type application/json;
        client_max_body_size 1m;
        add_header X-Served-By S{number};
        location = /health {{ return 200 '{HEALTH_REPLY}'; }}
        location /api/post {{ return 200 '{POSTED_REPLY}'; }}
        location / {{ return 200 '{REPLY}'; }}
    }}
"""
        )
    return _common(folder, "stand-ins") + "".join(servers) + "}\n"


def proxy_config(folder: Path, port: int, upstream_ports: Sequence[int]) -> str:
    """A round-robin proxy over the stand-ins with pooled keep-alive connections to them."""
    upstreams = "\n".join(f"        server {HOST}:{p};" for p in upstream_ports)
    return (
        _common(folder, "proxy")
        + f"""    upstream stand_ins {{
{upstreams}
        keepalive 256;
    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        client_max_body_size 1m;
        location / {{
            proxy_pass http://stand_ins;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )


def start_stand_ins(folder: Path, stack: contextlib.ExitStack) -> tuple[Service, list[int]]:
    """The STAND_INS stand-in GPU servers on free ports, stopped when `stack` closes."""
    ports = [free_port() for _ in range(STAND_INS)]
    service = start_nginx("stand-ins", stand_ins_config(folder, ports), folder, ports)
    stack.callback(service.stop)
    return service, ports


def start_nginx(name: str, config: str, folder: Path, ports: Sequence[int]) -> Service:
    """Write `config`, check it, start nginx in the foreground and wait for its ports."""
    config_path = folder / f"{name}.conf"
    config_path.write_text(config)
    argv = [nginx_binary(), "-p", str(folder), "-e", str(folder / f"{name}-error.log"), "-c", str(config_path)]
    check = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejected {config_path}: {check.stderr.strip()}")
    service = Service(name, argv, folder / f"{name}.log")
    try:
        for port in ports:
            service.wait_for_port(port)
    except BaseException:
        service.stop()
        raise
    return service
