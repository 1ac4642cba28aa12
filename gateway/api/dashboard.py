"""The operator's live dashboard: /dashboard, behind a login kept in a signed session cookie."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any, ParamSpec
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, abort, current_app, jsonify, redirect, render_template, request, session
from prometheus_client import Counter

from gateway.api import admin
from gateway.api.allocations import service as allocations
from gateway.api.auth import admin_matches
from gateway.api.dashboard_sessions import PREFIX, DashboardSessions, LiveSessions
from gateway.api.jobs import jobs
from gateway.api.workers import worker_list
from gateway.errors import error_response
from gateway.fleet.server import now_iso
from gateway.jobs.interface import JobStore
from gateway.jobs.records import STATUSES
from gateway.observability.history import BUCKET_SECONDS, BUCKETS, FLEET, RequestHistory
from gateway.proxy.forwarding import SESSION_COOKIE  # the proxy drops it from what it forwards

bp = Blueprint("dashboard", __name__, url_prefix=PREFIX, template_folder="templates")
SESSION_ID = "sid"  # the cookie's one key: a login's id in LiveSessions
SESSION_KEY_INFO = b"gpu-gateway dashboard session"
CSRF_HEADER = "X-CSRF-Token"
PAGE_POLICY = (  # the page's own inline script and style, its fetches of /dashboard/..., nothing else
    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
DATA_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
PRIORITIES = range(10)  # X-Job-Priority: 0 runs first, 9 last
Args = ParamSpec("Args")


def logged_in() -> bool:
    return live_sessions().alive(session.get(SESSION_ID))


def live_sessions() -> LiveSessions:
    return current_app.extensions["dashboard_sessions"]


def same_origin() -> bool:
    """False when the browser names an Origin other than this host (a cross-site form post); 400 when unreadable."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # "http://[::1": an unclosed IPv6 host, say
        abort(400, "the Origin header is not a URL")
    # The host only: behind a TLS-terminating proxy the browser says https and we see http.
    return netloc == request.host


def credential() -> str:
    """The one setting whose value opens the dashboard: with ADMIN_TOKEN set, the webhook secret no longer does."""
    return "ADMIN_TOKEN" if current_app.config["GATEWAY"].admin_token else "WEBHOOK_SECRET"


def render_page(status: int = 200, error: str | None = None) -> Response:
    """The page: the login form alone, or the dashboard once logged in."""
    nonce = secrets.token_urlsafe(16)
    html = render_template("dashboard.html", logged_in=logged_in(), error=error, nonce=nonce, credential=credential())
    response = Response(html, status=status, mimetype="text/html")
    response.headers["Content-Security-Policy"] = PAGE_POLICY.format(nonce=nonce)
    return response


@bp.after_request
def no_store(response: Response) -> Response:
    """Server data must not linger in a shared cache or the back button, nor run as a page."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers.setdefault("Content-Security-Policy", DATA_POLICY)  # the page has its own
    return response


@bp.get("")
def page() -> Response:
    """The single page; it fetches /dashboard/data itself."""
    return render_page()


@bp.post("/login")
def login() -> Response:
    """Check the admin credential from the form; on success remember the login in the session cookie."""
    if not same_origin():
        return render_page(403, "login refused: the form came from another site")
    if not admin_matches(request.form.get("secret")):
        if credential() == "ADMIN_TOKEN":
            return render_page(401, "wrong admin token: while ADMIN_TOKEN is set, only it opens the dashboard")
        return render_page(401, "wrong secret: the dashboard opens with WEBHOOK_SECRET")
    live_sessions().end(session.get(SESSION_ID))  # a second login from this browser replaces its first
    session.clear()
    session.permanent = True  # the cookie expires when the login does
    session[SESSION_ID] = live_sessions().start()
    return redirect(PREFIX, code=303)  # type: ignore[return-value]


@bp.post("/logout")
def logout() -> Response:
    """End the login here, so that a copy of its cookie opens nothing either."""
    if not same_origin():
        return render_page(403, "logout refused: the form came from another site")
    live_sessions().end(session.get(SESSION_ID))
    session.clear()
    return redirect(PREFIX, code=303)  # type: ignore[return-value]


def login_required(view: Callable[Args, Any]) -> Callable[Args, Any]:
    """401 unless the request comes with a live login's cookie."""

    @wraps(view)
    def wrapped(*args: Args.args, **kwargs: Args.kwargs) -> Any:
        if not logged_in():
            return error_response(401, "log in at /dashboard first")
        return view(*args, **kwargs)

    return wrapped


def operator_action(view: Callable[Args, Any]) -> Callable[Args, Any]:
    """A change made from the page: a live login, from this site, with the login's X-CSRF-Token, else 401/403."""

    @wraps(view)
    def wrapped(*args: Args.args, **kwargs: Args.kwargs) -> Any:
        if not logged_in():
            return error_response(401, "log in at /dashboard first")
        if not same_origin():
            return error_response(403, "refused: the request came from another site")
        if not live_sessions().csrf_matches(session.get(SESSION_ID), request.headers.get(CSRF_HEADER)):
            return error_response(403, f"missing or wrong {CSRF_HEADER} header: reload the dashboard and try again")
        return view(*args, **kwargs)

    return wrapped


@bp.get("/data")
@login_required
def data() -> Response:
    """Summary counters, the last sweep, the charts, one row per server, the job queue and the pull workers."""
    manager = current_app.extensions["backend_manager"]
    metrics = current_app.extensions["metrics"]
    fleet = manager.get_status()
    served = served_by_server(metrics.requests)
    keys = allocations().store.counts()  # as gateway_allocations reads them: in Redis mode, the cluster's
    summary = {key: fleet[key] for key in ("total_servers", "healthy_servers", "unhealthy_servers")}
    summary["health_check_running"] = fleet["health_check_running"]
    proxied, not_proxied = metrics.total_requests()
    summary["requests_total"] = int(sum(proxied.values()))
    summary["requests_not_proxied"] = int(sum(not_proxied.values()))  # no server had them: 503s, 404s
    history: RequestHistory = metrics.history
    reply = {
        "now": now_iso(),
        "csrf_token": live_sessions().csrf_token(session[SESSION_ID]),
        "summary": summary,
        "last_sweep": manager.last_sweep or None,
        "charts": {"bucket_seconds": BUCKET_SECONDS, "buckets": BUCKETS, "fleet": history.charts(FLEET)},
        "servers": [server_row(server, served, keys, history) for server in fleet["servers"]],
        "jobs": queue_summary(jobs().store),
        "workers": worker_list(),
    }
    return jsonify(success=True, data=reply)


@bp.post("/servers/<server_id>/drain")
@operator_action
def drain_server(server_id: str) -> Response | tuple[Response, int]:
    """Drain a server from the page, as POST /admin/servers/{server_id}/drain does."""
    return admin.change_draining(server_id, True)


@bp.post("/servers/<server_id>/enable")
@operator_action
def enable_server(server_id: str) -> Response | tuple[Response, int]:
    """Let a drained server take new work again, as POST /admin/servers/{server_id}/enable does."""
    return admin.change_draining(server_id, False)


@bp.delete("/servers/<server_id>")
@operator_action
def unregister_server(server_id: str) -> Response:
    """Unregister a server from the page, as DELETE /admin/servers/{server_id} does."""
    return admin.delete_server(server_id)


def served_by_server(requests: Counter) -> dict[str, float]:
    """Requests so far by server label, summed over methods and status classes, without creating a series."""
    totals: dict[str, float] = {}
    for family in requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                server = sample.labels["server"]
                totals[server] = totals.get(server, 0.0) + sample.value
    return totals


def server_row(
    server: dict[str, Any], served: dict[str, float], keys: dict[str, int], history: RequestHistory
) -> dict[str, Any]:
    """One table row of a server from get_status(), with its charts."""
    server_id = server["server_id"]
    resources = server.get("resources") or {}
    fresh = not resources.get("stale", True) and resources.get("gpu_memory_total", 0) > 0
    host = f"[{server['ip']}]" if ":" in server["ip"] else server["ip"]
    return {
        "server_id": server_id,
        "address": f"{host}:{server['port']}",
        "is_healthy": server["is_healthy"],
        "health_changed_time": server["health_changed_time"],
        "last_check_time": server["last_check_time"],
        "last_error": server["last_error"],
        "fail_count": server["fail_count"],
        "in_flight": server["in_flight"],  # the slots max_concurrent caps, streams included
        "max_concurrent": server["max_concurrent"],
        "served": int(served.get(server_id, 0)),
        "allocations": keys.get(server_id, 0),  # the allocation keys pinned to it (docs/allocations.md)
        "max_allocations": server["max_allocations"],
        "gpu_memory_free": resources["gpu_memory_free"] if fresh else None,
        "gpu_memory_total": resources["gpu_memory_total"] if fresh else None,
        "weight": server["weight"],
        "priority": server["priority"],
        "draining": server["draining"],
        "ejected": server["ejected"],
        "ejection_seconds_left": server["ejection_seconds_left"],
        "models": server["served_models"],
        "loaded_models": [model["name"] for model in server["loaded_models"]],
        "charts": history.charts(server_id),
    }


def queue_summary(store: JobStore) -> dict[str, Any]:
    """The jobs per status, the queued ones per priority (0 to 9), and how long the oldest has waited."""
    counts = store.counts()
    summary: dict[str, Any] = {status: counts.by_status[status] for status in STATUSES}
    summary["queued_by_priority"] = [counts.queued_by_priority.get(priority, 0) for priority in PRIORITIES]
    oldest = counts.oldest_queued_at
    # The store's clock stamped the job; max() keeps a wall clock stepped back from showing a negative wait.
    summary["oldest_wait_s"] = None if oldest is None else max(0.0, store.clock() - oldest)
    return summary


def init_app(app: Flask) -> None:
    """Add /dashboard; its session key derives from the login credential, so a new one logs everyone out."""
    config = app.config["GATEWAY"]
    if not app.secret_key:
        secret = config.admin_token or config.webhook_secret
        app.secret_key = hmac.new(secret.encode(), SESSION_KEY_INFO, "sha256").hexdigest()
    app.config["SESSION_COOKIE_NAME"] = SESSION_COOKIE
    app.config["SESSION_COOKIE_PATH"] = PREFIX  # so a browser never sends it along to /api/
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Strict"
    app.config["SESSION_COOKIE_SECURE"] = config.dashboard_secure_cookie
    lifetime = timedelta(hours=config.dashboard_session_hours)
    app.config["PERMANENT_SESSION_LIFETIME"] = lifetime  # also the signature's age limit
    app.config["SESSION_REFRESH_EACH_REQUEST"] = False  # the lifetime runs from the login, not the last poll
    app.extensions["dashboard_sessions"] = LiveSessions(lifetime)
    app.session_interface = DashboardSessions()
    app.register_blueprint(bp)
