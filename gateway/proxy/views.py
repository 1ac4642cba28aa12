"""How requests reach the proxy: its routes, the WSGI fast path, and one count and log line each."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, current_app
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from gateway.config import Config
from gateway.errors import error_response, handle_http_exception
from gateway.observability.metrics import NO_SERVER
from gateway.proxy.body_limit import BODY_SECONDS
from gateway.proxy.current_request import request, serving
from gateway.proxy.exchange import UPSTREAM_SECONDS
from gateway.proxy.handler import METHODS, Answer, Proxy
from gateway.proxy.relay import Body, Relay
from gateway.proxy.upstream import ClientLeft
from gateway.routing.affinity import TaskAffinity, TaskOwners
from gateway.routing.affinity_redis import RedisTaskAffinity

log = logging.getLogger(__name__)
request_log = logging.getLogger("gateway.request")
performance_log = logging.getLogger("gateway.performance")
CLIENT_CLOSED = 499  # nginx's status for a request whose client hung up before the answer
BROKEN_OFF = 502  # a body the server broke off counts as its failure, whatever status the client had
SLOW_REQUEST_SECONDS = 1.0  # requests at least this long are also logged as performance events


def proxy_view(path: str = "") -> Response:
    """The view behind every proxied prefix (when the fast path does not serve them)."""
    return as_response(observe(current_app.extensions["proxy"].handle))


def as_response(answer: Answer) -> Response:
    """A werkzeug Response for Flask, whichever kind of answer the proxy made."""
    return answer.to_response() if isinstance(answer, Relay) else answer


def observe(handler: Callable[[], Answer]) -> Answer:
    """Run one proxied request's handler; count it and log it once, when its response ends."""
    proxy: Proxy = current_app.extensions["proxy"]
    started, method = time.perf_counter(), request.method
    try:
        response = handler()
    except HTTPException as exc:  # 413 from the body limit, say: still one request to count and log
        response = handle_http_exception(exc)
    except ClientLeft as exc:  # 499, as nginx logs it: nobody reads this answer
        response = error_response(CLIENT_CLOSED, str(exc))
    environ = request.environ
    timing(response, time.perf_counter() - started, environ.get(UPSTREAM_SECONDS), environ.get(BODY_SECONDS))
    stream: Body | None = None
    first_byte: float | None = None  # for a stream, the time its answer began: that, not its end, is slow
    # A server's answer names its server; one of the gateway's own (an error) names the server
    # that failed, if one did: the header is only ever set by this proxy.
    if isinstance(response, Relay):
        server = response.backend
        if not isinstance(response.body, bytes):
            stream = response.body
            if stream.open_ended:
                first_byte = time.perf_counter() - started
    else:
        server = response.headers.get("X-Backend-Server", NO_SERVER)
    # Not the response itself in done(): that cycle would be left for the cycle collector.
    status, path = response.status_code, request.path  # the path only: a query may carry a secret

    def done() -> None:
        seconds = time.perf_counter() - started
        status_now = BROKEN_OFF if stream is not None and stream.aborted else status
        proxy.metrics.request_done(server, method, status_now, seconds)
        fields = {
            "method": method,
            "path": path,
            "server": server,
            "status": status_now,
            "ms": round(seconds * 1000, 1),
        }
        request_log.info("request", extra={"fields": fields})
        if first_byte is None:
            if seconds >= SLOW_REQUEST_SECONDS:
                performance_log.info("slow request", extra={"fields": fields})
        elif first_byte >= SLOW_REQUEST_SECONDS:
            fields["first_byte_ms"] = round(first_byte * 1000, 1)
            performance_log.info("slow request", extra={"fields": fields})

    response.call_on_close(done)
    return response


def timing(response: Answer, seconds: float, upstream: float | None, body: float | None) -> None:
    """Add a W3C Server-Timing header: the gateway's own time to the answer's head, and the others'.

    `upstream` sums every try's wait on a server (a failed connect's too) and `body` is the
    client sending its body, so `gateway` is what the gateway itself added. A server's own
    Server-Timing header is kept; ours is one more.
    """
    own = seconds - (upstream or 0.0) - (body or 0.0)
    value = f"gateway;dur={max(own, 0.0) * 1000:.2f}"
    if upstream is not None:
        value += f", upstream;dur={upstream * 1000:.2f}"
    if body is not None:
        value += f", client;dur={body * 1000:.2f}"
    if isinstance(response, Relay):
        response.headers.append(("Server-Timing", value))
    else:
        response.headers.add("Server-Timing", value)


def init_app(app: Flask) -> None:
    """Create the app's Proxy and route each configured prefix to it."""
    config: Config = app.config["GATEWAY"]
    shared = app.extensions.get("redis")  # REDIS_URL: every process reads and records the same owners
    affinity: TaskOwners = (
        RedisTaskAffinity(shared, ttl=config.task_affinity_ttl)
        if shared is not None
        else TaskAffinity(config.task_affinity_file, ttl=config.task_affinity_ttl)
    )
    app.extensions["task_affinity"] = affinity
    app.extensions["proxy"] = Proxy(config, app.extensions["backend_manager"], affinity, app.extensions["metrics"])
    # The raw target is checked and forwarded as sent, so Flask must not redirect or merge slashes.
    app.url_map.converters["anypath"] = AnyPathConverter
    options: dict[str, Any] = {"methods": METHODS, "strict_slashes": False, "merge_slashes": False}
    for index, prefix in enumerate(config.proxy_prefixes):
        endpoint = f"proxy_{index}"
        app.add_url_rule(prefix.rstrip("/"), endpoint, proxy_view, **options)
        app.add_url_rule(prefix + "<anypath:path>", endpoint, proxy_view, **options)


class FastPath:
    """Serves the proxied prefixes without Flask's request dispatch; everything else goes to Flask.

    Flask's request context (URL adapter, matching, session, signals, teardown) cost about
    40-70 us of a proxied request's 600 (docs/benchmarks.md). Static routes under a proxied prefix
    (the LLM routes, with their methods) stay Flask's; so does everything when another
    converter route shares a prefix, since only Flask's matching could tell them apart.
    """

    def __init__(self, app: Flask, wsgi_app: Any) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self.proxy: Proxy = app.extensions["proxy"]
        self.prefixes: tuple[str, ...] = app.config["GATEWAY"].proxy_prefixes
        under = [rule for rule in app.url_map.iter_rules() if rule.rule.startswith(self.prefixes)]
        self.enabled = all(not rule.arguments or rule.endpoint.startswith("proxy_") for rule in under)
        self.reserved = {(rule.rule, method) for rule in under if not rule.arguments for method in rule.methods or ()}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if (
            not self.enabled
            or not path.startswith(self.prefixes)
            or method not in METHODS
            or (path, method) in self.reserved
        ):
            return self.wsgi_app(environ, start_response)
        # Not in environ["werkzeug.request"]: that cycle (request <-> environ, and everything the
        # environ holds) would be left for the cycle collector, which then stopped the worker for
        # 60-120 ms at a time under load.
        req = self.app.request_class(environ, populate_request=False)
        with self.app.app_context(), serving(req):
            try:
                response = observe(self.proxy.handle)
            except Exception:  # as Flask would: a 500 in our shape, logged with its traceback
                log.exception("proxying %s %s failed", method, path)
                response = error_response(500, "internal error in the gateway")
        return response(environ, start_response)


class AnyPathConverter(PathConverter):
    """Like `path`, but may also start with a slash (`/api//x`): the backend decides what it means."""

    regex = ".*"
    part_isolating = False  # werkzeug would infer True from a regex without a slash
