"""The transparent proxy: pick a server, forward the request, stream the answer back.

Proxy decides where a request goes: a task's owner or an allocated key's server (pinned.py), a
job (jobs/intake.py), or the server routing picks, with failover and the fallback backend (here).
The Exchange (exchange.py) sends it to that server and passes the answer on.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

from flask import Response

from gateway.config import Config
from gateway.errors import error_response
from gateway.fleet.resources import GIB
from gateway.jobs import intake
from gateway.jobs.service import JobService
from gateway.manager import BackendManager
from gateway.observability.metrics import GatewayMetrics
from gateway.proxy.body_limit import read_body
from gateway.proxy.current_request import request
from gateway.proxy.exchange import Answer, Body, Exchange, UpstreamFailed, overloaded, payload, upstream_error
from gateway.proxy.forwarding import BadTarget, TaskRoutes, request_target, required_gpu_memory, upstream_headers
from gateway.proxy.pinned import PinnedForwarding
from gateway.proxy.upstream import UpstreamPool
from gateway.routing.admission import Lease, NoServer, RouteRequest
from gateway.routing.affinity import FALLBACK_OWNER, TaskOwners

__all__ = ["METHODS", "SESSION_HEADER", "Answer", "Body", "Proxy", "retry_after_seconds"]

ErrorRenderer = Callable[[NoServer], Response]

log = logging.getLogger(__name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
SESSION_HEADER = "X-Session-Key"  # requests with one key go to one server while it can take them
MAX_RETRY_AFTER = 5  # seconds: an SDK that honours it (OpenAI's retries twice) fails within ~10 s, not 2 sweeps


def retry_after_seconds(health_check_interval: float) -> str:
    """Retry-After for a 503 no server could take: the next sweep's time, from 1 s to MAX_RETRY_AFTER."""
    # A server also comes back between sweeps (it registers, or is enabled), so a client need not wait a
    # whole interval; with a short interval there is no sense in asking sooner than the next sweep.
    return str(min(MAX_RETRY_AFTER, max(1, math.ceil(health_check_interval))))


class Proxy:
    """Forwards requests to the fleet with failover, fallback and task affinity."""

    def __init__(self, config: Config, manager: BackendManager, affinity: TaskOwners, metrics: GatewayMetrics) -> None:
        self.config = config
        self.manager = manager
        self.affinity = affinity
        self.metrics = metrics
        self.exchange = Exchange(config, manager, affinity, metrics)
        self.task_routes = TaskRoutes(config.task_routes)
        self.retry_after = retry_after_seconds(config.health_check_interval)
        self.pinned = PinnedForwarding(config, manager, self.exchange, self.retry_after)
        self.jobs: JobService | None = None  # set by the jobs API: requests may become jobs
        self.queue_when_offline = config.queue_when_offline

    @property
    def pools(self) -> dict[str, UpstreamPool]:
        """The keep-alive pools, one per base URL."""
        return self.exchange.pools

    def pool(self, base_url: str) -> UpstreamPool:
        """The keep-alive pool for one server (jobs share the proxy's)."""
        return self.exchange.pool(base_url)

    def handle(self) -> Answer:
        """Proxy the current request."""
        try:
            target = request_target(self.config.proxy_prefixes)
        except BadTarget as exc:
            return error_response(400, str(exc))
        try:
            required = required_gpu_memory()
        except ValueError as exc:
            return error_response(400, str(exc))
        headers = upstream_headers()
        body = read_body(self.config.proxy_max_body_bytes, self.config.client_body_timeout)
        owned = self.affinity.first_owned(self.task_routes.candidates())
        if owned is not None:  # a task's own request goes to its owner, now: no other server could answer it
            return self.pinned.forward_owned(*owned, target, body, headers)
        answer = self.pinned.forward_allocated(target, body, headers)  # before the jobs: a pinned key's work runs there
        if answer is not None:
            return answer
        if self.jobs is not None and intake.wanted(request.environ):
            answer = self.as_job(target, headers, body)
            if answer is not None:
                return answer
        route = RouteRequest(
            session_key=request.headers.get(SESSION_HEADER) or None,
            required_bytes=None if required is None else int(required * GIB),
        )
        return self.forward_routed(route, target, body, headers, offline=self.offline(target, headers, body))

    def as_job(self, target: str, headers: dict[str, str], body: bytes, model: str | None = None) -> Answer | None:
        """The request as a job, when it asks to be one (`Prefer: respond-async`, an Idempotency-Key).

        None when it does not (another preference, `return=minimal` say): it is proxied as ever.
        """
        assert self.jobs is not None
        ask = intake.parse_ask(self.config.proxy_read_timeout)
        if isinstance(ask, Response):
            return ask
        if not ask.respond_async and ask.idempotency_key is None:
            return None
        return intake.submit(self.jobs, ask, model or self.task_type(), model, target, headers, body)

    def offline(
        self, target: str, headers: dict[str, str], body: bytes, model: str | None = None
    ) -> Callable[[NoServer], Answer] | None:
        """Under QUEUE_WHEN_OFFLINE: what to answer, instead of a 503, when no server can take the request."""
        if self.jobs is None or not self.queue_when_offline or not request.path.startswith(self.queue_when_offline):
            return None
        return functools.partial(self.queue_offline, target, headers, body, model)

    def queue_offline(
        self, target: str, headers: dict[str, str], body: bytes, model: str | None, exc: NoServer
    ) -> Answer:
        """A request no server can take now waits as a job, answered 202."""
        assert self.jobs is not None
        log.info("no server can take %s now (%s): queued as a job", request.path, exc.message)
        ask = intake.Ask(respond_async=True, wait=0.0, idempotency_key=None)
        return intake.submit(self.jobs, ask, model or self.task_type(), model, target, headers, body)

    def task_type(self) -> str:
        """What a pull worker asks for: the proxied prefix the request came under."""
        path = request.path
        return next((prefix for prefix in self.config.proxy_prefixes if path.startswith(prefix)), path)

    def forward_routed(
        self,
        route: RouteRequest,
        target: str,
        body: Body,
        headers: dict[str, str],
        render_error: ErrorRenderer | None = None,
        offline: Callable[[NoServer], Answer] | None = None,
    ) -> Answer:
        """Send to the server chosen for `route`; on a connect failure try another, then the fallback.

        Nothing is retried once the server may have the request (a timeout, or a non-idempotent
        request that was sent), and never once a byte has gone to the client.
        """
        render = render_error or self.render_no_server
        tried: list[str] = []
        while len(tried) <= self.config.proxy_max_retries:
            try:
                lease = self.manager.acquire(route, tried)
            except NoServer as exc:
                if offline is not None and not tried:  # QUEUE_WHEN_OFFLINE: a job, not the fallback or a 503
                    return offline(exc)
                if tried and not exc.fallback_ok:
                    if route.model is not None:  # for an LLM client: its model's servers are down, come back later
                        message = f"every server with model {route.model!r} failed to connect: {', '.join(tried)}"
                        return render(NoServer(503, "model_unavailable", message, retry_after=self.retry_after))
                    return error_response(502, f"every server tried failed: {', '.join(tried)}")
                if exc.fallback_ok or tried:
                    return self.forward_fallback(target, body, headers, tried, render, exc)
                return render(exc)
            assert lease.server is not None  # the manager's leases always name a server
            server = lease.server
            try:
                upstream, in_flight = self.exchange.send(
                    server.url, server.server_id, target, payload(body, lease), headers
                )
            except UpstreamFailed as exc:
                lease.release()
                if exc.local:
                    return overloaded(exc)
                if not exc.stale:
                    self.manager.report_result(server.server_id, False, str(exc))
                if not (exc.timed_out or exc.stale):
                    self.manager.report_failure(server.server_id, server.url, str(exc))
                if exc.sent and (exc.timed_out or request.method not in IDEMPOTENT_METHODS):
                    return upstream_error(server.server_id, exc)
                tried.append(server.server_id)
                self.metrics.retries.labels(server.server_id).inc()
                log.warning("server %s failed (%s); trying another", server.server_id, exc)
                continue
            except BaseException:  # the client left, or something unforeseen: the slot is freed all the same
                lease.release()
                raise
            self.manager.report_result(server.server_id, upstream.status < 500, f"HTTP {upstream.status}")
            if tried:
                self.metrics.failovers.inc()
            return self.exchange.respond(upstream, in_flight, server.server_id, server.url, release=lease.release)
        return self.forward_fallback(target, body, headers, tried, render)

    def render_no_server(self, exc: NoServer) -> Response:
        """The gateway's JSON error for a request no server could take."""
        retry_after = exc.retry_after or (self.retry_after if exc.status == 503 else None)
        return error_response(exc.status, exc.message, headers={"Retry-After": retry_after} if retry_after else None)

    def forward_fallback(
        self,
        target: str,
        body: Body,
        headers: dict[str, str],
        tried: list[str],
        render: ErrorRenderer,
        no_server: NoServer | None = None,
    ) -> Answer:
        """No server took the request: use BACKEND_API_BASE, or say why there is none."""
        if self.config.backend_api_base:
            log.warning("no GPU server could take it%s; using the fallback backend", f" after {tried}" if tried else "")
            return self.exchange.forward_to(
                self.config.backend_api_base, FALLBACK_OWNER, target, payload(body, Lease(None, None, None)), headers
            )
        if tried:
            return error_response(502, f"every server tried failed: {', '.join(tried)}")
        if no_server is not None and no_server.code != "no_server":
            return render(no_server)
        return render(
            NoServer(503, "no_server", "no healthy GPU server is available and no fallback backend is configured")
        )
