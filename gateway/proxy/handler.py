"""The transparent proxy: pick a server, forward the request, stream the answer back."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from flask import Response
from prometheus_client import Gauge

from gateway.allocations.records import AllocationError, key_problem
from gateway.cluster.connection import RedisUnavailable
from gateway.config import Config
from gateway.errors import error_response
from gateway.fleet.health import LOCAL_ERRNOS
from gateway.fleet.resources import GIB
from gateway.jobs import intake
from gateway.jobs.service import JobService
from gateway.manager import BackendManager
from gateway.observability.metrics import GatewayMetrics
from gateway.proxy.body_limit import read_body
from gateway.proxy.current_request import request
from gateway.proxy.forwarding import (
    JSON_CAPTURE_LIMIT,
    BadTarget,
    TaskRoutes,
    decoded,
    downstream_headers,
    find_task_id,
    may_name_task,
    request_target,
    required_gpu_memory,
    upstream_headers,
)
from gateway.proxy.relay import Relay
from gateway.proxy.upstream import (
    ClientLeft,
    ConnectFailed,
    IncompleteBody,
    SendFailed,
    UpstreamPool,
    UpstreamResponse,
)
from gateway.routing.admission import Lease, NoServer, RouteRequest
from gateway.routing.affinity import FALLBACK_OWNER, TaskOwners

if TYPE_CHECKING:
    from gateway.allocations.service import AllocationService

Body = bytes | Callable[[Lease], bytes]  # the request body, or one made for the chosen server
ErrorRenderer = Callable[[NoServer], Response]
Answer = Response | Relay  # a server's answer passed on is a Relay; the gateway's own are Responses

log = logging.getLogger(__name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
STREAM_CHUNK = 64 * 1024
MAX_POOLS = 1024
SESSION_HEADER = "X-Session-Key"  # requests with one key go to one server while it can take them
ALLOCATION_HEADER = "X-Allocation-Key"  # requests with an allocated key go to its server (docs/allocations.md)
UPSTREAM_SECONDS = "gateway.upstream_seconds"  # the environ key: time spent waiting on servers, summed


class UpstreamFailed(Exception):
    """Forwarding to one target failed; `sent` says whether the target may have the request."""

    def __init__(
        self, reason: str, sent: bool, timed_out: bool = False, local: bool = False, stale: bool = False
    ) -> None:
        super().__init__(reason)
        self.sent = sent
        self.timed_out = timed_out
        self.local = local  # the gateway's own fault: not counted against the server
        self.stale = stale  # a kept-alive connection the server had closed while idle: no fault of its own


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
        self.pools: dict[str, UpstreamPool] = {}  # one per base URL, looked up once a request
        self.task_routes = TaskRoutes(config.task_routes)
        self.retry_after = retry_after_seconds(config.health_check_interval)
        self.jobs: JobService | None = None  # set by the jobs API: requests may become jobs
        self.allocations: AllocationService | None = None  # set by the allocations API: X-Allocation-Key
        self.queue_when_offline = config.queue_when_offline

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
            return self.forward_owned(*owned, target, body, headers)
        answer = self.forward_allocated(target, body, headers)  # before the jobs: a pinned key's work runs there
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
                upstream, in_flight = self.send(server.url, server.server_id, target, _payload(body, lease), headers)
            except UpstreamFailed as exc:
                lease.release()
                if exc.local:
                    return self.overloaded(exc)
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
            return self.respond(upstream, in_flight, server.server_id, server.url, release=lease.release)
        return self.forward_fallback(target, body, headers, tried, render)

    def render_no_server(self, exc: NoServer) -> Response:
        """The gateway's JSON error for a request no server could take."""
        retry_after = exc.retry_after or (self.retry_after if exc.status == 503 else None)
        return error_response(exc.status, exc.message, headers={"Retry-After": retry_after} if retry_after else None)

    def forward_owned(self, task_id: str, owner: str, target: str, body: bytes, headers: dict[str, str]) -> Answer:
        """Send a request that names a task to the server that owns it, and nowhere else."""
        if owner == FALLBACK_OWNER:
            if not self.config.backend_api_base:
                return self.unavailable(f"task {task_id} belongs to the fallback backend, which is not configured")
            return self.forward_to(self.config.backend_api_base, FALLBACK_OWNER, target, body, headers, task_id)
        return self.forward_pinned(owner, f"which owns task {task_id}", target, body, headers, task_id)

    def forward_allocated(
        self, target: str, body: Body, headers: dict[str, str], model: str | None = None
    ) -> Answer | None:
        """Send a request with an allocated X-Allocation-Key to the key's server, and nowhere else.

        None when it has no key, or a key with no allocation: it is routed as any request. With
        `model` (an LLM route's), the server must be one routing by model could pick for it, or a 409.
        """
        key = request.headers.get(ALLOCATION_HEADER)
        if not key or self.allocations is None:
            return None
        problem = key_problem(key)
        if problem is not None:
            return error_response(400, f"{ALLOCATION_HEADER}: {problem}")
        try:
            routed = self.allocations.route(key)
        except AllocationError as exc:  # its server is gone and no other could take it, or the move was refused
            return self.unavailable(f"allocation {key}: {exc.message}")
        except (sqlite3.Error, RedisUnavailable) as exc:
            log.error("could not look up allocation %s (%s): routed as any request", key, exc)
            return None
        if routed.refusal is not None:
            return self.unavailable(routed.refusal)
        if routed.server_id is None:
            return None
        server_id, actual_model = routed.server_id, None
        if model is not None:
            actual_model = self.manager.model_name_on(server_id, model)
            if actual_model is None:  # never silently elsewhere: the key's state is on its server
                message = f"allocation {key} is on server {server_id}, which does not serve model {model!r}"
                return error_response(409, message)
        payload = _payload(body, Lease(None, None, actual_model))  # a model_map name renamed for that server
        return self.forward_pinned(server_id, f"which holds allocation {key}", target, payload, headers)

    def forward_pinned(
        self, owner: str, whose: str, target: str, body: bytes, headers: dict[str, str], known_task: str = ""
    ) -> Answer:
        """Send a request to the one server that must take it (`whose` says why), cap or not, and nowhere else."""
        lease = self.manager.hold(owner)  # a drained or capped owner still serves its own tasks
        server = lease.server
        if server is None or not server.is_healthy:
            lease.release()
            state = "is no longer registered" if server is None else "is unhealthy"
            return self.unavailable(f"server {owner}, {whose}, {state}")
        try:
            upstream, in_flight = self.send(server.url, owner, target, body, headers)
        except UpstreamFailed as exc:
            lease.release()
            if exc.local:
                return self.overloaded(exc)
            if exc.sent:
                return upstream_error(owner, exc)
            self.manager.report_failure(owner, server.url, str(exc))
            return self.unavailable(f"server {owner}, {whose}, is unreachable: {exc}")
        except BaseException:
            lease.release()
            raise
        return self.respond(upstream, in_flight, owner, server.url, known_task=known_task, release=lease.release)

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
            return self.forward_to(
                self.config.backend_api_base, FALLBACK_OWNER, target, _payload(body, Lease(None, None, None)), headers
            )
        if tried:
            return error_response(502, f"every server tried failed: {', '.join(tried)}")
        if no_server is not None and no_server.code != "no_server":
            return render(no_server)
        return render(
            NoServer(503, "no_server", "no healthy GPU server is available and no fallback backend is configured")
        )

    def forward_to(
        self, base_url: str, label: str, target: str, body: bytes, headers: dict[str, str], known_task: str = ""
    ) -> Answer:
        """Forward once, with no failover."""
        try:
            upstream, in_flight = self.send(base_url, label, target, body, headers)
        except UpstreamFailed as exc:
            return self.overloaded(exc) if exc.local else upstream_error(label, exc)
        return self.respond(upstream, in_flight, label, base_url, known_task)

    def unavailable(self, message: str) -> Response:
        """503 with Retry-After."""
        return error_response(503, message, headers={"Retry-After": self.retry_after})

    def overloaded(self, exc: UpstreamFailed) -> Response:
        """503 for a request the gateway itself could not make (no sockets left, say)."""
        log.error("gateway could not open a connection: %s", exc)
        return error_response(503, f"the gateway is overloaded: {exc}", headers={"Retry-After": "1"})

    def send(
        self, base_url: str, label: str, target: str, body: bytes, headers: dict[str, str]
    ) -> tuple[UpstreamResponse, Gauge]:
        """Send the request upstream, counted in flight on the gauge returned until `respond`'s reply closes.

        The same gauge goes down: looked up again, it could be a new series for a server that
        left meanwhile, and would stay at -1.
        """
        gauge = self.metrics.in_flight_of(display(label))
        gauge.inc()
        try:
            return self._send(base_url, target, body, headers), gauge
        except ClientLeft:
            gauge.dec()
            log.info("the client left before %s answered: request abandoned", display(label))
            raise
        except BaseException:
            gauge.dec()
            raise

    def _send(self, base_url: str, target: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """Send the request upstream; the response body is left unread for streaming."""
        pool = self.pools.get(base_url) or self._new_pool(base_url)
        environ = request.environ
        client = client_socket(environ)
        started = time.perf_counter()
        try:
            return pool.request(request.method, target, headers, body, client)
        except ConnectFailed as exc:  # nothing was sent
            local = exc.errno in LOCAL_ERRNOS
            raise UpstreamFailed(exc.strerror or "cannot connect", sent=False, local=local) from exc
        except TimeoutError as exc:
            raise UpstreamFailed("timed out waiting for the answer", sent=True, timed_out=True) from exc
        except SendFailed as exc:
            raise UpstreamFailed(exc.strerror or f"connection broken: {exc}", sent=True, stale=exc.stale) from exc
        except OSError as exc:
            raise UpstreamFailed(exc.strerror or f"connection broken: {exc}", sent=True) from exc
        finally:  # every try's wait, a failed one's too: none of it is the gateway's own time
            environ[UPSTREAM_SECONDS] = environ.get(UPSTREAM_SECONDS, 0.0) + time.perf_counter() - started

    def pool(self, base_url: str) -> UpstreamPool:
        """The keep-alive pool for one server (jobs share the proxy's)."""
        return self.pools.get(base_url) or self._new_pool(base_url)

    def _new_pool(self, base_url: str) -> UpstreamPool:
        """A keep-alive pool for one server; the oldest go when servers keep changing address."""
        if len(self.pools) >= MAX_POOLS:
            oldest = next(iter(self.pools))
            self.pools.pop(oldest).close()
        config = self.config
        pool = UpstreamPool(
            base_url,
            config.proxy_pool_maxsize,
            config.proxy_connect_timeout,
            config.proxy_read_timeout,
            config.proxy_head_timeout,
        )
        self.pools[base_url] = pool
        return pool

    def respond(
        self,
        upstream: UpstreamResponse,
        in_flight: Gauge,
        label: str,
        base_url: str,
        known_task: str = "",
        release: Callable[[], None] | None = None,
    ) -> Answer:
        """The client's response; the request stops counting in flight (and frees its slot) when it closes."""
        gauge_down, free_slot = in_flight.dec, release

        def done() -> None:
            gauge_down()
            if free_slot is not None:
                free_slot()

        try:
            response = self._respond(upstream, label, base_url, known_task)
        except BaseException:
            try:
                upstream.close()  # no answer will read the rest, nor give the connection back
            finally:
                done()
            raise
        response.call_on_close(done)
        return response

    def _respond(self, upstream: UpstreamResponse, label: str, base_url: str, known_task: str) -> Answer:
        """Build the client's response: streamed, or read whole when it may name a new task."""
        backend = display(label)
        headers = downstream_headers(upstream)
        headers.append(("X-Backend-Server", backend))
        first = b""
        if may_name_task(upstream):
            started = time.perf_counter()
            try:
                first = upstream.read(JSON_CAPTURE_LIMIT + 1)
                if len(first) <= JSON_CAPTURE_LIMIT and upstream.length_remaining:  # fewer than promised
                    raise IncompleteBody(
                        None, f"IncompleteRead: {len(first)} bytes, {upstream.length_remaining} more expected"
                    )
            except OSError as exc:
                upstream.close()
                timed_out = isinstance(exc, TimeoutError)
                reason = "timed out sending the answer" if timed_out else f"broke off the answer: {_reason(exc)}"
                return upstream_error(label, UpstreamFailed(reason, sent=True, timed_out=timed_out))
            finally:  # the answer read whole before it goes out: the server's time, as its head was
                environ = request.environ
                environ[UPSTREAM_SECONDS] = environ.get(UPSTREAM_SECONDS, 0.0) + time.perf_counter() - started
            if len(first) <= JSON_CAPTURE_LIMIT:
                upstream.release_conn()
                self.remember_task(first, upstream.headers.get("Content-Encoding", ""), label, known_task)
                headers.append(("Content-Length", str(len(first))))  # what is sent, however it came
                return Relay(upstream.status, headers, first, backend)
        has_body = request.method != "HEAD" and upstream.status not in (204, 304)
        if not has_body:  # HEAD and 304 may announce the length a GET would have
            declared = upstream.headers.get("Content-Length")
            if declared.isascii() and declared.isdigit():
                headers.append(("Content-Length", declared))
        body = UpstreamBody(upstream, first, has_body, self, label, base_url)
        if has_body:
            remaining = upstream.length_remaining
            if remaining is not None:  # framed by a valid Content-Length, not chunked
                headers.append(("Content-Length", str(len(first) + remaining)))
            else:
                body.open_ended = True  # chunked or to the close: an LLM's stream, say
        return Relay(upstream.status, headers, body, backend)

    def stream_broke_off(self, label: str, base_url: str, sent: int, exc: OSError) -> None:
        """Count a server's answer that broke off after its head went out as the server's failure."""
        server, reason = display(label), _reason(exc)
        self.metrics.upstream_aborted.labels(server).inc()
        log.warning("server %s broke off its answer after %d bytes to the client: %s", server, sent, reason)
        if label == FALLBACK_OWNER:
            return
        self.manager.report_result(label, False, f"broke off the answer: {reason}")
        if not isinstance(exc, TimeoutError):  # as before the head: a slow server is not a dead one
            self.manager.report_failure(label, base_url, f"broke off the answer: {reason}")

    def remember_task(self, payload: bytes, encoding: str, owner: str, known_task: str) -> None:
        """Record the owner of a task id found in a JSON reply, before the reply is sent."""
        task_id = find_task_id(decoded(payload, encoding))
        if task_id is None or task_id == known_task or task_id in request.path.split("/"):
            return  # nothing new, or an id that would capture the very path that made it
        try:
            recorded = self.affinity.record(task_id, owner)
        except (sqlite3.Error, RedisUnavailable) as exc:  # the reply still goes out; only later routing may suffer
            log.error("could not record the owner of task %s (%s): %s", task_id, owner, exc)
            return
        if recorded:
            log.info("task %s is owned by %s", task_id, owner)
        else:
            log.warning("task %s from %s is already owned by another server; kept the first", task_id, owner)


class UpstreamBody:
    """The streamed body: yields chunks as they arrive and settles the connection on close."""

    aborted = False  # set when the server broke off the body: the request then counts as failed
    open_ended = False  # no Content-Length: a stream, judged slow by its first byte, not its last

    def __init__(
        self, upstream: UpstreamResponse, first: bytes, has_body: bool, proxy: Proxy, label: str, base_url: str
    ) -> None:
        self.upstream = upstream
        self.first = first
        self.complete = not has_body  # HEAD, 204 and 304 have nothing to read
        self.proxy, self.label, self.base_url = proxy, label, base_url
        self.environ = request.environ  # its client socket is looked up only if the body breaks off

    def __iter__(self) -> Iterator[bytes]:
        sent = len(self.first)
        if self.first:
            yield self.first
        try:
            while chunk := self.upstream.read1(STREAM_CHUNK, decode_content=False):
                yield chunk
                sent += len(chunk)
            if self.upstream.length_remaining:
                raise IncompleteBody(None, f"IncompleteRead: {self.upstream.length_remaining} bytes never came")
        except OSError as exc:
            self.aborted = True
            self.proxy.stream_broke_off(self.label, self.base_url, sent, exc)
            if not self.cut_client():
                raise  # no socket to cut: the WSGI server must see the failure, or it ends the body cleanly
            return
        self.complete = True

    def cut_client(self) -> bool:
        """Shut the client's connection so it sees a cut-off body, without an error for the WSGI server to log."""
        client = client_socket(self.environ)
        if client is None:
            return False
        with contextlib.suppress(OSError):  # the client is gone already: cut all the same
            client.shutdown(socket.SHUT_RDWR)
        return True

    def close(self) -> None:
        """Called by the WSGI server whatever happened: reuse the connection only if drained."""
        if self.complete:
            self.upstream.release_conn()
        else:
            self.upstream.close()


def client_socket(environ: dict[str, Any]) -> socket.socket | None:
    """The client's connection, from gunicorn's environ or werkzeug's; None under a test client."""
    return environ.get("gunicorn.socket") or environ.get("werkzeug.socket")


def display(label: str) -> str:
    """The server label users and metrics see: the fallback backend is `fallback`."""
    return "fallback" if label == FALLBACK_OWNER else label


def upstream_error(label: str, exc: UpstreamFailed) -> Response:
    """502 for a refused or broken upstream, 504 for one that timed out, naming the server."""
    response = error_response(504 if exc.timed_out else 502, f"backend {display(label)}: {exc}")
    response.headers["X-Backend-Server"] = display(label)
    return response


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _payload(body: Body, lease: Lease) -> bytes:
    return body(lease) if callable(body) else body
