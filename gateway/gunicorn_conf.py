"""gunicorn settings for the gateway: `gpu-gateway`, or `gunicorn -c deploy/gunicorn.conf.py app:app`.

One worker process by default, because the JSON store and the health scheduler have one owner;
GATEWAY_WORKERS runs more, which needs REDIS_URL (the state is shared there), and sums their
metrics through files in PROMETHEUS_MULTIPROC_DIR (gateway/observability/multiprocess.py). Each runs
gevent, so one process holds thousands of open connections (long image jobs, LLM streams)
while it waits on GPU servers, instead of one OS thread each: gunicorn's gevent worker, in
gateway/proxy/worker.py, sending each response's head with its first body bytes. gunicorn parses
requests with gunicorn_h1c (requirements-fast.txt) when it is installed.
"""

import importlib.util
import os
import re
import resource
import shutil
import sys
import tempfile


def _connections() -> int:
    raw = os.environ.get("GATEWAY_WORKER_CONNECTIONS", "10000")
    if not raw.isdigit() or int(raw) < 1:
        sys.exit(f"gateway: GATEWAY_WORKER_CONNECTIONS={raw!r} is not valid: expected a positive integer")
    return int(raw)


bind = os.environ.get("GATEWAY_BIND", "127.0.0.1:5000")
# More than one needs REDIS_URL; on_starting refuses a bad or lone value with the reason.
_workers = os.environ.get("GATEWAY_WORKERS", "").strip()
workers = int(_workers) if _workers.isdigit() and int(_workers) > 0 else 1
worker_class = "gateway.proxy.worker.GeventWorker"  # gunicorn's gevent worker; see that module
worker_connections = _connections()
timeout = 60  # the gevent worker's heartbeat, not a request limit: streams may last longer
graceful_timeout = 30
keepalive = 5
# Off by default: the gateway's own request log (gateway.request) already records method, path,
# server, status and time for each proxied request, and a second line per request costs CPU on
# the hot path (measured in docs/benchmarks.md). GATEWAY_ACCESS_LOG=- turns it on, to stdout. It
# records the path without its query string, so `?secret=` never lands there.
accesslog = os.environ.get("GATEWAY_ACCESS_LOG") or None
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms backend=%({x-backend-server}o)s'
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# gunicorn 27's control socket sits at one path per user; two gateways (or a test run beside a
# running one) would fight over it, and we manage the process through systemd and signals.
control_socket_disable = True


def on_starting(server):
    """Refuse to start with a clear message when a setting is missing or bad; raise the fd limit; share metrics."""
    from gateway.config import Config, ConfigError, parse_bind

    try:
        Config.from_env()
        parse_bind(bind)
    except ConfigError as exc:
        sys.exit(f"gateway: {exc}")
    if server.cfg.workers > 1 and not os.environ.get("REDIS_URL"):  # --workers given on the command line
        sys.exit(f"gateway: {server.cfg.workers} workers need REDIS_URL (docs/scale-out.md)")
    if server.cfg.workers > 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        share_metrics(server)
    # Each proxied request holds a client and a backend socket, plus idle pooled ones.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * worker_connections + 256
    if soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        server.log.info("raised the open-file limit from %d to %d", soft, new_soft)
    server.log.info("parsing requests with %s", request_parser(server.cfg.http_parser))


# The folder gunicorn made for the workers' metric files, removed when the master exits.
_metrics_dir: str | None = None
_METRIC_FILE = re.compile(r"(counter|gauge_\w+|histogram|summary)_\d+\.db")


def share_metrics(server):
    """Give the workers a folder for their metric files, so that /metrics sums them all.

    Set here, in the master before any worker forks and imports prometheus_client, which picks
    its file-backed values from PROMETHEUS_MULTIPROC_DIR once, at import.
    """
    global _metrics_dir
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        # The operator's folder: a previous run's files would add its counts to this one's.
        for name in os.listdir(path):
            if _METRIC_FILE.fullmatch(name):
                os.remove(os.path.join(path, name))
    else:
        path = _metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    server.log.info("%d worker(s) share their metrics through %s", server.cfg.workers, path)


def child_exit(server, worker):
    """A worker is gone: its in-flight requests stop counting; its counts stay in the sums."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics folder this master made."""
    if _metrics_dir is not None:
        shutil.rmtree(_metrics_dir, ignore_errors=True)


def request_parser(setting: str) -> str:
    """Which parser gunicorn uses for requests under its http_parser setting (auto, fast or python)."""
    if setting == "python":
        return "gunicorn's Python parser (--http-parser python)"
    if setting == "auto" and importlib.util.find_spec("gunicorn_h1c") is None:
        return "gunicorn's Python parser: gunicorn_h1c is not installed"
    return "gunicorn_h1c, gunicorn's C parser"


def worker_exit(server, worker):
    """Stop the health job before the interpreter tears down its thread pool."""
    gateway = sys.modules.get("gateway.app")
    built = getattr(gateway, "__dict__", {}).get("app")
    if built is not None:
        built.extensions["gateway_shutdown"]()
