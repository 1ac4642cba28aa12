"""python -m resource_monitor: serve this host's readings; keep it registered with a gateway, or pull its jobs."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
from werkzeug.serving import make_server

from resource_monitor.agent import RegistrationAgent
from resource_monitor.app import close_app, create_app
from resource_monitor.pull import PullAgent
from resource_monitor.pull_ws import WebSocketPullAgent
from resource_monitor.settings import DEFAULT_PORTS, DEVICE_TYPES, Settings, SettingsError

log = logging.getLogger("resource_monitor")

SERVER_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")  # as the gateway accepts it
SIGNAL_CHECK_SECONDS = 0.5  # how long a SIGTERM may wait for the main thread to notice it

EPILOG = """\b
Settings from the environment (the seed's config.yaml keys):
  MONITOR_MEMORY_THRESHOLD      percent of RAM a request may fill up to (90)
  MONITOR_GPU_MEMORY_THRESHOLD  percent of a GPU's memory a request may fill up to (90)
  MONITOR_CACHE_EXPIRE_TIME     seconds a reading is reused; 0 reads every time (2)
  MONITOR_DISK_PATH             the disk /resources reports ("/")
  WEBHOOK_SECRET                the gateway's secret; required with --register-to
  MONITOR_TOKEN_FILE            where the server token is kept (--token-file)
  WORKER_TOKEN                  the gateway's worker token, for --pull-from (--worker-token);
                                unset, WEBHOOK_SECRET serves, as it does on the gateway

\b
A GPU host joins the fleet with one command, e.g.:
  WEBHOOK_SECRET=... python -m resource_monitor --device gpu \\
      --register-to https://gateway.example.com --server-id B1 --service-port 8000

\b
A GPU host behind NAT pulls its jobs instead, e.g.:
  WORKER_TOKEN=... python -m resource_monitor --device gpu \\
      --pull-from https://gateway.example.com --forward-to http://127.0.0.1:8000
"""


def check_gateway_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Accept only http:// and https:// URLs with a host."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter("must be a URL such as https://gateway.example.com or http://127.0.0.1:5000")
    return value


def check_server_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not SERVER_ID_PATTERN.match(value):
        raise click.BadParameter("must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def split_names(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    """A comma-separated list, blanks and repeats dropped."""
    return tuple(dict.fromkeys(name.strip() for name in (value or "").split(",") if name.strip()))


def default_worker_id() -> str:
    """This host's name, in the characters a worker id may hold."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64]
    return name or "worker"


@click.command(epilog=EPILOG)
@click.option(
    "--device",
    type=click.Choice(DEVICE_TYPES),
    envvar="MONITOR_DEVICE_TYPE",
    show_envvar=True,
    required=True,
    help="What this host serves with: gpu reads NVML, cpu reads RAM only.",
)
@click.option("--host", default="0.0.0.0", envvar="MONITOR_HOST", show_envvar=True, show_default=True)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    envvar="MONITOR_PORT",
    show_envvar=True,
    help="Port to listen on [default: 8005 for cpu, 8006 for gpu; 0 picks a free one].",
)
@click.option(
    "--register-to",
    metavar="GATEWAY_URL",
    callback=check_gateway_url,
    help="Register this host's service with the gateway at this URL, and keep it registered.",
)
@click.option("--server-id", metavar="ID", callback=check_server_id, help="The id to register, e.g. B1.")
@click.option(
    "--service-port",
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="The port of the GPU service the gateway sends requests to (not the monitor's).",
)
@click.option(
    "--advertise-ip",
    metavar="ADDRESS",
    help="The address the gateway should reach this host at [default: the local address routing to the gateway].",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Register again this often, so a changed address reaches the gateway.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    envvar="MONITOR_TOKEN_FILE",
    show_envvar=True,
    help="Where to keep the server token a gateway with REGISTRATION_BINDING=token gives this id (mode 0600) "
    "[default: $XDG_STATE_HOME/gpu-monitor/<server-id>.token, or ~/.local/state/...].",
)
@click.option(
    "--pull-from",
    metavar="GATEWAY_URL",
    callback=check_gateway_url,
    help="Lease jobs from the gateway at this URL and run them on --forward-to (for a host behind NAT).",
)
@click.option(
    "--forward-to",
    metavar="URL",
    callback=check_gateway_url,
    help="The local GPU service that runs pulled jobs [default: http://127.0.0.1:8000].",
)
@click.option(
    "--worker-token",
    envvar="WORKER_TOKEN",
    show_envvar=True,
    metavar="TOKEN",
    help="The gateway's WORKER_TOKEN (better in the environment than on the command line) [default: $WEBHOOK_SECRET].",
)
@click.option("--worker-id", metavar="ID", callback=check_server_id, help="This worker's id [default: the host name].")
@click.option(
    "--routes",
    metavar="PREFIXES",
    callback=split_names,
    help="Comma-separated gateway prefixes whose jobs to run [default: /api/, unless --models is given].",
)
@click.option("--models", metavar="NAMES", callback=split_names, help="Comma-separated models whose jobs to run.")
@click.option(
    "--max-jobs", type=click.IntRange(1, 100), metavar="N", help="Jobs to run at once [default: 1].", default=None
)
@click.option(
    "--wait",
    type=click.FloatRange(1, 30),
    metavar="SECONDS",
    help="How long each lease call waits for a job [default: 30].",
    default=None,
)
@click.option(
    "--transport",
    type=click.Choice(["http", "ws"]),
    default=None,
    help="How pulled jobs come: HTTP long polls, or pushed over the gateway's WebSocket [default: http].",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    envvar="MONITOR_LOG_LEVEL",
    show_envvar=True,
    show_default=True,
)
def main(
    device: str,
    host: str,
    port: int | None,
    register_to: str | None,
    server_id: str | None,
    service_port: int | None,
    advertise_ip: str | None,
    heartbeat: float,
    token_file: Path | None,
    pull_from: str | None,
    forward_to: str | None,
    worker_token: str | None,
    worker_id: str | None,
    routes: tuple[str, ...],
    models: tuple[str, ...],
    max_jobs: int | None,
    wait: float | None,
    transport: str | None,
    log_level: str,
) -> None:
    """Serve this host's CPU, memory, disk and GPU readings: /health, /resources and /check."""
    try:
        settings = Settings.from_env(device_type=device)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    agent_options = agent_settings(register_to, server_id, service_port, token_file)
    pull_options = pull_settings(pull_from, forward_to, worker_token, worker_id, routes, models, max_jobs, wait)
    if transport is not None and pull_options is None:
        raise click.UsageError("--transport is for pulling jobs: give --pull-from too")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_level.upper() != "DEBUG":
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per poll

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    port = DEFAULT_PORTS[device] if port is None else port
    app = create_app(settings)
    try:
        server = make_server(host, port, app, threaded=True)
    except OSError as exc:
        close_app(app)
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("%s monitor listening on http://%s:%d", device, host, server.server_port)

    agent = None
    if agent_options is not None:
        agent = RegistrationAgent(
            **agent_options, monitor_port=server.server_port, advertise_ip=advertise_ip, heartbeat=heartbeat
        )
        agent.start()
    puller: PullAgent | None = None
    if pull_options is not None:
        if transport == "ws":
            del pull_options["wait"]  # jobs are pushed: there is no poll to wait in
            puller = WebSocketPullAgent(**pull_options)
        else:
            puller = PullAgent(**pull_options)
        puller.start()
        log.info("pulling jobs from %s for %s", puller.gateway_url, puller.forward_to)
    # A timed wait: a signal the kernel hands to another thread only sets a flag, which the main
    # thread reads when it next runs; blocked for good in an untimed wait, it would never stop.
    while not stop.wait(SIGNAL_CHECK_SECONDS):
        pass
    log.info("stopping")
    if puller is not None:
        puller.stop()  # its jobs go back to the queue at once, for another worker
    if agent is not None:
        agent.stop()  # leave the fleet while the monitor still answers
    server.shutdown()
    server.server_close()
    close_app(app)


def agent_settings(
    register_to: str | None, server_id: str | None, service_port: int | None, token_file: Path | None = None
) -> dict[str, Any] | None:
    """The agent's arguments when --register-to is given; a usage error when something it needs is missing."""
    if register_to is None:
        if server_id is not None or service_port is not None:
            raise click.UsageError("--server-id and --service-port are for registering: give --register-to too")
        return None
    missing = [flag for flag, value in (("--server-id", server_id), ("--service-port", service_port)) if value is None]
    if missing:
        raise click.UsageError(f"--register-to needs {' and '.join(missing)}")
    secret = os.environ.get("WEBHOOK_SECRET", "")
    if not secret:
        raise click.UsageError("WEBHOOK_SECRET must be set to the gateway's secret when --register-to is given")
    assert server_id is not None  # checked above
    return {
        "gateway_url": register_to,
        "secret": secret,
        "server_id": server_id,
        "service_port": service_port,
        "token_file": token_file or default_token_file(server_id),
    }


def pull_settings(
    pull_from: str | None,
    forward_to: str | None,
    worker_token: str | None,
    worker_id: str | None,
    routes: tuple[str, ...],
    models: tuple[str, ...],
    max_jobs: int | None,
    wait: float | None,
) -> dict[str, Any] | None:
    """The pull agent's arguments when --pull-from is given; a usage error when something it needs is missing."""
    if pull_from is None:
        flags: dict[str, object] = {"--forward-to": forward_to, "--worker-id": worker_id, "--routes": routes}
        flags |= {"--models": models, "--max-jobs": max_jobs, "--wait": wait}
        given = [flag for flag, value in flags.items() if value]
        if given:
            raise click.UsageError(f"{' and '.join(given)} are for pulling jobs: give --pull-from too")
        return None
    token = worker_token or os.environ.get("WEBHOOK_SECRET", "")
    if not token:
        raise click.UsageError("--pull-from needs the gateway's worker token: set WORKER_TOKEN (or WEBHOOK_SECRET)")
    return {
        "gateway_url": pull_from,
        "token": token,
        "forward_to": forward_to or "http://127.0.0.1:8000",
        "worker_id": worker_id or default_worker_id(),
        "routes": routes or (() if models else ("/api/",)),
        "models": models,
        "max_jobs": max_jobs or 1,
        "wait": 30.0 if wait is None else wait,
    }


def default_token_file(server_id: str) -> Path:
    """Where the server token is kept unless --token-file says: the user's state folder (XDG)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state, "gpu-monitor", f"{server_id}.token")


if __name__ == "__main__":
    main()
