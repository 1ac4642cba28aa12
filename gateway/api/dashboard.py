"""The operator's live dashboard: /dashboard, behind a login kept in a signed session cookie."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Request,
    Response,
    abort,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    session,
)
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from prometheus_client import Counter, Gauge

from gateway.api.auth import admin_matches
from gateway.errors import error_response
from gateway.fleet.server import now_iso
from gateway.proxy.forwarding import SESSION_COOKIE  # the proxy drops it from what it forwards

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard", template_folder="templates")
SESSION_ID = "sid"  # the cookie's one key: a login's id in LiveSessions
SESSION_KEY_INFO = b"gpu-gateway dashboard session"
PAGE_POLICY = (  # the page's own inline script and style, its fetches of /dashboard/data, nothing else
    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
DATA_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


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


def render_page(status: int = 200, error: str | None = None) -> Response:
    """The page: the login form alone, or the dashboard once logged in."""
    nonce = secrets.token_urlsafe(16)
    html = render_template("dashboard.html", logged_in=logged_in(), error=error, nonce=nonce)
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
        return render_page(401, "wrong secret")
    live_sessions().end(session.get(SESSION_ID))  # a second login from this browser replaces its first
    session.clear()
    session.permanent = True  # the cookie expires when the login does
    session[SESSION_ID] = live_sessions().start()
    return redirect("/dashboard", code=303)  # type: ignore[return-value]


@bp.post("/logout")
def logout() -> Response:
    """End the login here, so that a copy of its cookie opens nothing either."""
    if not same_origin():
        return render_page(403, "logout refused: the form came from another site")
    live_sessions().end(session.get(SESSION_ID))
    session.clear()
    return redirect("/dashboard", code=303)  # type: ignore[return-value]


def login_required(view: Callable[[], Response]) -> Callable[[], Response]:
    @wraps(view)
    def wrapped() -> Response:
        if not logged_in():
            return error_response(401, "log in at /dashboard first")
        return view()

    return wrapped


@bp.get("/data")
@login_required
def data() -> Response:
    """Summary counters and one row per server, as the page's table shows them."""
    manager = current_app.extensions["backend_manager"]
    metrics = current_app.extensions["metrics"]
    fleet = manager.get_status()
    in_flight = samples_by_server(metrics.in_flight)
    served = samples_by_server(metrics.requests, suffix="_total")
    summary = {key: fleet[key] for key in ("total_servers", "healthy_servers", "unhealthy_servers")}
    summary["health_check_running"] = fleet["health_check_running"]
    proxied, not_proxied = metrics.total_requests()
    summary["requests_total"] = sum(proxied.values())
    summary["requests_not_proxied"] = sum(not_proxied.values())  # no server had them: 503s, 404s
    rows = [server_row(server, in_flight, served) for server in fleet["servers"]]
    return jsonify(success=True, data={"now": now_iso(), "summary": summary, "servers": rows})


def samples_by_server(metric: Counter | Gauge, suffix: str = "") -> dict[str, float]:
    """Sum a metric's samples by server label, without creating a series for any server."""
    totals: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                server = sample.labels["server"]
                totals[server] = totals.get(server, 0.0) + sample.value
    return totals


def server_row(server: dict[str, Any], in_flight: dict[str, float], served: dict[str, float]) -> dict[str, Any]:
    """One table row of a server from get_status()."""
    server_id = server["server_id"]
    resources = server.get("resources") or {}
    fresh = not resources.get("stale", True) and resources.get("gpu_memory_total", 0) > 0
    host = f"[{server['ip']}]" if ":" in server["ip"] else server["ip"]
    return {
        "server_id": server_id,
        "address": f"{host}:{server['port']}",
        "is_healthy": server["is_healthy"],
        "health_changed_time": server["health_changed_time"],
        "fail_count": server["fail_count"],
        "in_flight": int(in_flight.get(server_id, 0)),
        "served": int(served.get(server_id, 0)),
        "gpu_memory_free": resources["gpu_memory_free"] if fresh else None,
        "gpu_memory_total": resources["gpu_memory_total"] if fresh else None,
        "weight": server["weight"],
        "priority": server["priority"],
        "draining": server["draining"],
    }


class LiveSessions:
    """The logins not yet ended, each with the time it expires; a cookie only names one of them."""

    def __init__(self, lifetime: timedelta, clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime = lifetime.total_seconds()
        self.clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}

    def start(self) -> str:
        """Begin a login and return its id, forgetting those that have expired."""
        session_id, now = secrets.token_urlsafe(32), self.clock()
        with self._lock:
            self._expiry = {key: expiry for key, expiry in self._expiry.items() if expiry > now}
            self._expiry[session_id] = now + self.lifetime
        return session_id

    def alive(self, session_id: object) -> bool:
        """Whether `session_id` names a login that was neither ended nor has expired."""
        if not isinstance(session_id, str):
            return False
        with self._lock:
            expiry = self._expiry.get(session_id)
        return expiry is not None and self.clock() < expiry

    def end(self, session_id: object) -> None:
        """End a login (logout); an unknown or missing id is no error."""
        if isinstance(session_id, str):
            with self._lock:
                self._expiry.pop(session_id, None)


class DashboardSessions(SecureCookieSessionInterface):
    """The signed-cookie session, opened only under /dashboard: no other route reads it, and
    opening it (cookie parsing, a signer) cost about 5% of a proxied request's CPU."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not request.path.startswith(bp.url_prefix or "/dashboard"):
            return None  # Flask then uses a null session, which is never saved
        return super().open_session(app, request)


def init_app(app: Flask) -> None:
    """Add /dashboard; its session key derives from the login credential, so a new one logs everyone out."""
    config = app.config["GATEWAY"]
    if not app.secret_key:
        secret = config.admin_token or config.webhook_secret
        app.secret_key = hmac.new(secret.encode(), SESSION_KEY_INFO, "sha256").hexdigest()
    app.config["SESSION_COOKIE_NAME"] = SESSION_COOKIE
    app.config["SESSION_COOKIE_PATH"] = bp.url_prefix  # so a browser never sends it along to /api/
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Strict"
    app.config["SESSION_COOKIE_SECURE"] = config.dashboard_secure_cookie
    lifetime = timedelta(hours=config.dashboard_session_hours)
    app.config["PERMANENT_SESSION_LIFETIME"] = lifetime  # also the signature's age limit
    app.config["SESSION_REFRESH_EACH_REQUEST"] = False  # the lifetime runs from the login, not the last poll
    app.extensions["dashboard_sessions"] = LiveSessions(lifetime)
    app.session_interface = DashboardSessions()
    app.register_blueprint(bp)
