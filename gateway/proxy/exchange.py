"""One request to one server, and its answer back: the keep-alive pools, sending, the answer streamed or read whole."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable

from flask import Response
from prometheus_client import Gauge

from gateway.cluster.connection import RedisUnavailable
from gateway.config import Config
from gateway.errors import error_response
from gateway.fleet.health import LOCAL_ERRNOS
from gateway.manager import BackendManager
from gateway.observability.metrics import GatewayMetrics
from gateway.proxy.current_request import request
from gateway.proxy.forwarding import JSON_CAPTURE_LIMIT, decoded, downstream_headers, find_task_id, may_name_task
from gateway.proxy.relay import Relay
from gateway.proxy.upstream import (
    ClientLeft,
    ConnectFailed,
    IncompleteBody,
    SendFailed,
    UpstreamPool,
    UpstreamResponse,
)
from gateway.proxy.upstream_body import UpstreamBody, client_socket
from gateway.routing.admission import Lease
from gateway.routing.affinity import FALLBACK_OWNER, TaskOwners

Body = bytes | Callable[[Lease], bytes]  # the request body, or one made for the chosen server
Answer = Response | Relay  # a server's answer passed on is a Relay; the gateway's own are Responses

log = logging.getLogger("gateway.proxy.handler")  # the proxy's lines keep the handler's name

MAX_POOLS = 1024
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


class Exchange:
    """Sends requests to servers over pooled connections and turns their answers into the client's."""

    def __init__(self, config: Config, manager: BackendManager, affinity: TaskOwners, metrics: GatewayMetrics) -> None:
        self.config = config
        self.manager = manager  # told of an answer that broke off
        self.affinity = affinity  # told of the tasks answers name
        self.metrics = metrics
        self.pools: dict[str, UpstreamPool] = {}  # one per base URL, looked up once a request

    def forward_to(
        self, base_url: str, label: str, target: str, body: bytes, headers: dict[str, str], known_task: str = ""
    ) -> Answer:
        """Forward once, with no failover."""
        try:
            upstream, in_flight = self.send(base_url, label, target, body, headers)
        except UpstreamFailed as exc:
            return overloaded(exc) if exc.local else upstream_error(label, exc)
        return self.respond(upstream, in_flight, label, base_url, known_task)

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
        pool = self.pool(base_url)
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


def display(label: str) -> str:
    """The server label users and metrics see: the fallback backend is `fallback`."""
    return "fallback" if label == FALLBACK_OWNER else label


def upstream_error(label: str, exc: UpstreamFailed) -> Response:
    """502 for a refused or broken upstream, 504 for one that timed out, naming the server."""
    response = error_response(504 if exc.timed_out else 502, f"backend {display(label)}: {exc}")
    response.headers["X-Backend-Server"] = display(label)
    return response


def overloaded(exc: UpstreamFailed) -> Response:
    """503 for a request the gateway itself could not make (no sockets left, say)."""
    log.error("gateway could not open a connection: %s", exc)
    return error_response(503, f"the gateway is overloaded: {exc}", headers={"Retry-After": "1"})


def payload(body: Body, lease: Lease) -> bytes:
    """The bytes to send: the body, or the one made for the lease's server."""
    return body(lease) if callable(body) else body


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
