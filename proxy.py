"""The transparent proxy: pick a server, forward the request, stream the answer back."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import urllib3
from flask import Flask, Response, current_app, request
from urllib3.exceptions import ConnectTimeoutError, HTTPError, ProtocolError, ReadTimeoutError

from affinity import FALLBACK_OWNER, TaskAffinity
from backend_manager import BackendManager
from body_limit import read_body
from config import Config
from errors import error_response

log = logging.getLogger(__name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
JSON_CAPTURE_LIMIT = 1024 * 1024  # a JSON reply up to this size is read whole to find its task_id
STREAM_CHUNK = 64 * 1024


class UpstreamFailed(Exception):
    """Forwarding to one target failed; `sent` says whether the target may have the request."""

    def __init__(self, reason: str, sent: bool, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.sent = sent
        self.timed_out = timed_out


class Proxy:
    """Forwards requests to the fleet with failover, fallback and task affinity."""

    def __init__(self, config: Config, manager: BackendManager, affinity: TaskAffinity) -> None:
        self.config = config
        self.manager = manager
        self.affinity = affinity
        self.timeout = urllib3.Timeout(connect=config.proxy_connect_timeout, read=config.proxy_read_timeout)
        self.pool = urllib3.PoolManager(num_pools=1024, maxsize=config.proxy_pool_maxsize, block=False, retries=False)
        self.retry_after = str(int(config.health_check_interval))

    def handle(self) -> Response:
        """Proxy the current request."""
        body = read_body(self.config.proxy_max_body_bytes)
        headers = upstream_headers()
        owned = self.affinity.first_owned(task_candidates())
        if owned is not None:
            return self.forward_owned(*owned, body, headers)
        tried: list[str] = []
        while len(tried) <= self.config.proxy_max_retries:
            server = self.manager.get_next_server(exclude=set(tried))
            if server is None:
                break
            try:
                upstream = self.send(server.url, body, headers)
            except UpstreamFailed as exc:
                if not exc.timed_out:
                    self.manager.report_failure(server.server_id, server.url, str(exc))
                if exc.sent and (exc.timed_out or request.method not in IDEMPOTENT_METHODS):
                    return upstream_error(server.server_id, exc)
                tried.append(server.server_id)
                log.warning("server %s failed (%s); trying another", server.server_id, exc)
                continue
            return self.respond(upstream, server.server_id)
        return self.forward_fallback(body, headers, tried)

    def forward_owned(self, task_id: str, owner: str, body: bytes, headers: dict[str, str]) -> Response:
        """Send a request that names a task to the server that owns it, and nowhere else."""
        if owner == FALLBACK_OWNER:
            if not self.config.backend_api_base:
                return self.unavailable(f"task {task_id} belongs to the fallback backend, which is not configured")
            return self.forward_to(self.config.backend_api_base, FALLBACK_OWNER, body, headers, remember=False)
        server = self.manager.get_server(owner)
        if server is None or not server.is_healthy:
            state = "is no longer registered" if server is None else "is unhealthy"
            return self.unavailable(f"server {owner}, which owns task {task_id}, {state}")
        try:
            upstream = self.send(server.url, body, headers)
        except UpstreamFailed as exc:
            if exc.timed_out:
                return upstream_error(owner, exc)
            self.manager.report_failure(owner, server.url, str(exc))
            return self.unavailable(f"server {owner}, which owns task {task_id}, is unreachable: {exc}")
        return self.respond(upstream, owner, remember=False)

    def forward_fallback(self, body: bytes, headers: dict[str, str], tried: list[str]) -> Response:
        """No server took the request: use BACKEND_API_BASE, or say why there is none."""
        if self.config.backend_api_base:
            log.warning("no healthy GPU server%s; using the fallback backend", f" left after {tried}" if tried else "")
            return self.forward_to(self.config.backend_api_base, FALLBACK_OWNER, body, headers)
        if tried:
            return error_response(502, f"every server tried failed: {', '.join(tried)}")
        return self.unavailable("no healthy GPU server is available and no fallback backend is configured")

    def forward_to(
        self, base_url: str, label: str, body: bytes, headers: dict[str, str], remember: bool = True
    ) -> Response:
        """Forward once, with no failover."""
        try:
            upstream = self.send(base_url, body, headers)
        except UpstreamFailed as exc:
            return upstream_error(label, exc)
        return self.respond(upstream, label, remember)

    def unavailable(self, message: str) -> Response:
        """503 with Retry-After."""
        return error_response(503, message, headers={"Retry-After": self.retry_after})

    def send(self, base_url: str, body: bytes, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """Send the request upstream; the response body is left unread for streaming."""
        target = base_url + request.full_path if request.query_string else base_url + request.path
        try:
            return self.pool.urlopen(
                request.method,
                target,
                body=body or None,
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
                decode_content=False,
                timeout=self.timeout,
            )
        except ConnectTimeoutError as exc:  # also covers NewConnectionError: nothing was sent
            raise UpstreamFailed(f"cannot connect: {_reason(exc)}", sent=False) from exc
        except ReadTimeoutError as exc:
            raise UpstreamFailed("timed out waiting for the answer", sent=True, timed_out=True) from exc
        except (ProtocolError, HTTPError) as exc:
            raise UpstreamFailed(f"connection broken: {_reason(exc)}", sent=True) from exc

    def respond(self, upstream: urllib3.BaseHTTPResponse, label: str, remember: bool = True) -> Response:
        """Build the client's response: streamed, or read whole when it may name a new task."""
        headers = downstream_headers(upstream)
        headers.append(("X-Backend-Server", "fallback" if label == FALLBACK_OWNER else label))
        first = b""
        if remember and 200 <= upstream.status < 300 and _is_json(upstream.headers.get("Content-Type", "")):
            first = upstream.read(JSON_CAPTURE_LIMIT + 1)
            if len(first) <= JSON_CAPTURE_LIMIT:
                upstream.release_conn()
                self.remember_task(first, label)
                return Response(first, status=upstream.status, headers=headers)
        return Response(stream(upstream, first), status=upstream.status, headers=headers, direct_passthrough=True)

    def remember_task(self, payload: bytes, owner: str) -> None:
        """Record the owner of a task id found in a JSON reply, before the reply is sent."""
        task_id = find_task_id(payload)
        if task_id is not None:
            self.affinity.record(task_id, owner)
            log.info("task %s is owned by %s", task_id, owner)


def stream(upstream: urllib3.BaseHTTPResponse, first: bytes) -> Iterator[bytes]:
    """Yield the body as it arrives; a client that leaves closes the upstream connection."""
    complete = False
    try:
        if first:
            yield first
        while chunk := upstream.read1(STREAM_CHUNK, decode_content=False):
            yield chunk
        complete = True
    except (HTTPError, OSError) as exc:
        log.warning("upstream broke off mid-response: %s", _reason(exc))
        raise  # the client must see a cut-off body, not a clean end
    finally:
        if complete:
            upstream.release_conn()
        else:
            upstream.close()


def find_task_id(payload: bytes) -> str | None:
    """The `task_id` at the top level of a JSON object, or under its `data`."""
    try:
        document = json.loads(payload)
    except ValueError:
        return None
    for holder in (document, document.get("data") if isinstance(document, dict) else None):
        if isinstance(holder, dict):
            value = holder.get("task_id")
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
                return str(value)
    return None


def task_candidates() -> list[str]:
    """Strings in the request that may name a task: `?task_id=`, then each path segment."""
    candidates = [request.args.get("task_id", "")]
    candidates.extend(request.path.split("/"))
    return [c for c in candidates if c]


def upstream_headers() -> dict[str, str]:
    """End-to-end request headers, plus X-Forwarded-For/-Proto/-Host."""
    dropped = NOT_FORWARDED | _connection_tokens(request.headers.get("Connection", ""))
    headers = {name: value for name, value in request.headers.items() if name.lower() not in dropped}
    peer = request.environ.get("werkzeug.proxy_fix.orig", {}).get("REMOTE_ADDR", request.remote_addr) or ""
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    return headers


def downstream_headers(upstream: urllib3.BaseHTTPResponse) -> list[tuple[str, str]]:
    """End-to-end response headers, each repeated header kept apart (Set-Cookie)."""
    dropped = HOP_BY_HOP | _connection_tokens(upstream.headers.get("Connection", ""))
    return [(name, value) for name, value in upstream.headers.iteritems() if name.lower() not in dropped]


def upstream_error(label: str, exc: UpstreamFailed) -> Response:
    """502 for a refused or broken upstream, 504 for one that timed out."""
    return error_response(504 if exc.timed_out else 502, f"backend {label}: {exc}")


def _connection_tokens(value: str) -> frozenset[str]:
    return frozenset(token.strip().lower() for token in value.split(",") if token.strip())


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _reason(exc: BaseException) -> str:
    reason: Any = getattr(exc, "reason", None) or exc
    return str(reason).split(": ", 1)[-1] if ": " in str(reason) else type(reason).__name__


def proxy_view(path: str = "") -> Response:
    """The view behind every proxied prefix."""
    proxy: Proxy = current_app.extensions["proxy"]
    return proxy.handle()


def init_app(app: Flask) -> None:
    """Create the app's Proxy and route each configured prefix to it."""
    config: Config = app.config["GATEWAY"]
    affinity = TaskAffinity(config.task_affinity_file, ttl=config.task_affinity_ttl)
    app.extensions["task_affinity"] = affinity
    app.extensions["proxy"] = Proxy(config, app.extensions["backend_manager"], affinity)
    for index, prefix in enumerate(config.proxy_prefixes):
        endpoint = f"proxy_{index}"
        app.add_url_rule(prefix, endpoint, proxy_view, methods=METHODS)
        app.add_url_rule(prefix + "<path:path>", endpoint, proxy_view, methods=METHODS)
