"""The dashboard: its login and data with Flask's test client, then live in a real headless chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
import requests
from conftest import ROOT, SECRET

from gateway.api.dashboard import SESSION_COOKIE
from gateway.api.server_replies import ServerReplySchema
from gateway.api.status_replies import DashboardReplySchema
from gateway.fleet.resources import parse_reading

ARTIFACTS = ROOT / "tests" / "artifacts"
MONITOR_URL = "http://127.0.0.1:9/resources"  # never fetched: the tests hand readings in directly
GIB = 2**30


def reading(total_gib: int, used_gib: int):
    """A gpu monitor's reading, as if just received."""
    gpu = {"index": 0, "memory_total": total_gib * GIB, "memory_used": used_gib * GIB,
           "memory_free": (total_gib - used_gib) * GIB}  # fmt: skip
    document = {"device_type": "gpu", "cpu": {"percent": 10}, "disk": {"percent": 20},
                "memory": {"total": 64 * GIB, "available": 32 * GIB, "percent": 50}, "gpus": [gpu]}  # fmt: skip
    return parse_reading(document, time.monotonic())


def page_text(response) -> str:
    """The page without its random CSP nonce, which could spell anything, a server id included."""
    nonce = response.headers["Content-Security-Policy"].split("'nonce-")[1].split("'")[0]
    return response.get_data(as_text=True).replace(nonce, "")


def log_in(client, secret: str = SECRET, **headers: str):
    return client.post("/dashboard/login", data={"secret": secret}, headers=headers)


# -- login and data, with the test client --------------------------------------------------


def test_without_a_login_only_the_form_is_shown(client, manager):
    manager.register_server("B1", "127.0.0.1", 9001)
    page = client.get("/dashboard")
    assert page.status_code == 200
    html = page_text(page)
    assert 'name="secret"' in html and 'type="password"' in html
    assert "B1" not in html and 'id="servers"' not in html
    assert "no-store" in page.headers["Cache-Control"]
    assert "script-src 'nonce-" in page.headers["Content-Security-Policy"]
    assert "http" not in html.split("<body>")[1].replace('action="/dashboard/login"', "")  # nothing external


def policy(response) -> dict[str, str]:
    """The Content-Security-Policy header as {directive: sources}."""
    directives = (part.strip().partition(" ") for part in response.headers["Content-Security-Policy"].split(";"))
    return {name: sources for name, _, sources in directives}


def test_the_page_allows_only_its_own_script_style_and_fetches(client):
    page = client.get("/dashboard")
    nonce = policy(page)["script-src"].removeprefix("'nonce-").removesuffix("'")
    assert f'<style nonce="{nonce}">' in page.get_data(as_text=True)
    assert policy(page) == {
        "default-src": "'none'",
        "script-src": f"'nonce-{nonce}'",
        "style-src": f"'nonce-{nonce}'",
        "connect-src": "'self'",
        "img-src": "'self' data:",
        "form-action": "'self'",
        "frame-ancestors": "'none'",
        "base-uri": "'none'",
    }
    assert client.get("/dashboard").headers["Content-Security-Policy"] != page.headers["Content-Security-Policy"]


def test_every_dashboard_response_has_a_policy(client):
    replies = [client.get("/dashboard/data"), log_in(client), client.get("/dashboard/data")]
    replies += [client.post("/dashboard/logout"), log_in(client, "wrong")]
    assert [reply.status_code for reply in replies] == [401, 303, 200, 303, 401]
    for reply in replies:
        assert policy(reply)["default-src"] == "'none'"
        assert policy(reply)["frame-ancestors"] == "'none'"


def test_data_needs_a_login(client, manager):
    manager.register_server("B1", "127.0.0.1", 9001)
    response = client.get("/dashboard/data")
    assert response.status_code == 401
    assert response.get_json() == {"success": False, "message": "log in at /dashboard first", "errors": None}


@pytest.mark.parametrize("secret", ["wrong", "", SECRET + "x", SECRET[:-1]])
def test_a_wrong_secret_is_refused_without_a_cookie(client, secret):
    response = log_in(client, secret)
    assert response.status_code == 401
    assert "Set-Cookie" not in response.headers
    assert "wrong secret: the dashboard opens with WEBHOOK_SECRET" in response.get_data(as_text=True)
    assert client.get("/dashboard/data").status_code == 401


def test_the_right_secret_logs_in_with_a_strict_http_only_cookie(client, manager):
    manager.register_server("B1", "127.0.0.1", 9001)
    manager.register_server("B2", "127.0.0.1", 9002, monitor_url=MONITOR_URL)
    manager.apply_readings([("B2", MONITOR_URL, reading(80, 20))])
    response = log_in(client)
    assert response.status_code == 303
    assert response.headers["Location"] == "/dashboard"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert SECRET not in cookie

    data = client.get("/dashboard/data").get_json()["data"]
    assert data["summary"] == {"total_servers": 2, "healthy_servers": 2, "unhealthy_servers": 0,
                               "health_check_running": True, "requests_total": 0,
                               "requests_not_proxied": 0}  # fmt: skip
    rows = {row["server_id"]: row for row in data["servers"]}
    assert rows["B1"]["address"] == "127.0.0.1:9001"
    assert rows["B1"]["is_healthy"] is True and rows["B1"]["fail_count"] == 0
    assert rows["B1"]["health_changed_time"].startswith("20")
    assert (rows["B1"]["in_flight"], rows["B1"]["served"]) == (0, 0)
    assert rows["B1"]["gpu_memory_total"] is None
    assert (rows["B2"]["gpu_memory_free"], rows["B2"]["gpu_memory_total"]) == (60 * GIB, 80 * GIB)
    assert (rows["B1"]["weight"], rows["B1"]["priority"], rows["B1"]["draining"]) == (1, 1, False)
    assert 'id="servers"' in client.get("/dashboard").get_data(as_text=True)


def test_data_shows_each_servers_own_weight_priority_and_draining(client, manager):
    manager.register_server("B1", "127.0.0.1", 9001)
    manager.register_server("B2", "127.0.0.1", 9002, options={"weight": 70, "priority": 2})
    manager.set_draining("B2", True)
    log_in(client)
    rows = {row["server_id"]: row for row in client.get("/dashboard/data").get_json()["data"]["servers"]}
    assert (rows["B1"]["weight"], rows["B1"]["priority"], rows["B1"]["draining"]) == (1, 1, False)
    assert (rows["B2"]["weight"], rows["B2"]["priority"], rows["B2"]["draining"]) == (70, 2, True)


def test_data_counts_served_requests_without_making_series(app, client, manager):
    manager.register_server("B1", "127.0.0.1", 9001)
    manager.register_server("B2", "127.0.0.1", 9002)
    metrics = app.extensions["metrics"]
    metrics.request_done("B1", "GET", 200, 0.01)
    metrics.request_done("B1", "POST", 500, 0.01)
    lease = manager.hold("B1")  # a request open to B1: the slot max_concurrent counts
    log_in(client)
    rows = {row["server_id"]: row for row in client.get("/dashboard/data").get_json()["data"]["servers"]}
    lease.release()
    assert (rows["B1"]["served"], rows["B1"]["in_flight"]) == (2, 1)
    metrics.request_done("none", "GET", 503, 0.01)  # no server had it: not a proxied request
    metrics.request_done("none", "GET", 404, 0.01)
    summary = client.get("/dashboard/data").get_json()["data"]["summary"]
    assert (summary["requests_total"], summary["requests_not_proxied"]) == (2, 2)
    assert (rows["B2"]["served"], rows["B2"]["in_flight"]) == (0, 0)
    for metric in (metrics.requests, metrics.in_flight):
        assert all(sample.labels["server"] != "B2" for family in metric.collect() for sample in family.samples)


def test_the_cookie_is_named_for_the_gateway_and_scoped_to_the_dashboard(client):
    cookie = log_in(client).headers["Set-Cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "; Path=/dashboard" in cookie
    assert client.get_cookie(SESSION_COOKIE, path="/dashboard") is not None


def test_a_logged_in_client_sends_no_cookie_to_the_gpu_servers(live_gateway, fake_servers):
    gateway = live_gateway()
    gateway.register(fake_servers("B1"))
    with requests.Session() as browser:  # a cookie jar that keeps Path as a browser does
        assert browser.post(gateway.url + "/dashboard/login", data={"secret": SECRET}, timeout=5).ok
        assert browser.get(gateway.url + "/dashboard/data", timeout=5).status_code == 200
        echoed = browser.get(gateway.url + "/api/echo", timeout=5).json()["headers"]
    assert "cookie" not in {name.lower() for name in echoed}


@pytest.mark.parametrize("secure", [False, True])
def test_the_cookie_is_secure_when_configured(make_app, secure):
    cookie = log_in(make_app(dashboard_secure_cookie=secure).test_client()).headers["Set-Cookie"]
    assert ("; Secure" in cookie) is secure


def test_logout_ends_the_session(client, manager):
    manager.register_server("B1", "127.0.0.1", 9001)
    log_in(client)
    assert client.get("/dashboard/data").status_code == 200
    response = client.post("/dashboard/logout")
    assert response.status_code == 303
    assert client.get("/dashboard/data").status_code == 401
    assert "B1" not in page_text(client.get("/dashboard"))


def session_cookie(response) -> str:
    """The session cookie's value, as the Set-Cookie header gave it to the browser."""
    name, _, rest = response.headers["Set-Cookie"].partition("=")
    assert name == SESSION_COOKIE
    return rest.split(";")[0]


def replay(app, value: str):
    """/dashboard/data from another client that sends only the given cookie, byte for byte."""
    return app.test_client(use_cookies=False).get("/dashboard/data", headers={"Cookie": f"{SESSION_COOKIE}={value}"})


def test_a_cookie_replayed_after_logout_is_refused(app, client):
    stolen = session_cookie(log_in(client))
    assert replay(app, stolen).status_code == 200
    client.post("/dashboard/logout")
    refused = replay(app, stolen)
    assert refused.status_code == 401
    assert refused.get_json()["message"] == "log in at /dashboard first"


def test_logging_in_again_ends_the_browsers_first_session(app, client):
    first = session_cookie(log_in(client))
    second = session_cookie(log_in(client))
    assert (replay(app, first).status_code, replay(app, second).status_code) == (401, 200)


def test_a_logout_ends_only_its_own_session(app, client):
    other = app.test_client()
    log_in(client), log_in(other)
    client.post("/dashboard/logout")
    assert (client.get("/dashboard/data").status_code, other.get("/dashboard/data").status_code) == (401, 200)


def test_a_session_lasts_the_configured_hours(make_app):
    app = make_app(dashboard_session_hours=2.0)
    client = app.test_client()
    sessions = app.extensions["dashboard_sessions"]
    started = time.monotonic()
    sessions.clock = lambda: started
    response = log_in(client)
    expires = parsedate_to_datetime(response.headers["Set-Cookie"].split("Expires=")[1].split(";")[0])
    assert abs(expires - (datetime.now(UTC) + timedelta(hours=2))) < timedelta(minutes=1)
    sessions.clock = lambda: started + 2 * 3600 - 1
    reply = client.get("/dashboard/data")
    assert reply.status_code == 200
    assert "Set-Cookie" not in reply.headers  # not renewed by the page's polling: the 2 hours run from the login
    sessions.clock = lambda: started + 2 * 3600
    assert client.get("/dashboard/data").status_code == 401


def test_a_login_from_another_origin_is_refused(client):
    response = log_in(client, Origin="http://evil.example")
    assert response.status_code == 403
    assert "Set-Cookie" not in response.headers
    assert client.get("/dashboard/data").status_code == 401
    assert log_in(client, Origin="http://localhost").status_code == 303


@pytest.mark.parametrize("origin", ["http://[::1", "http://[abc]", "http://a]b"])
@pytest.mark.parametrize("path", ["/dashboard/login", "/dashboard/logout"])
def test_an_unparseable_origin_is_a_bad_request(client, origin, path):
    response = client.post(path, data={"secret": SECRET}, headers={"Origin": origin})
    assert response.status_code == 400
    assert response.get_json() == {"success": False, "message": "the Origin header is not a URL", "errors": None}
    assert "Set-Cookie" not in response.headers
    assert client.get("/dashboard/data").status_code == 401


def test_the_secret_never_appears_in_a_response(client, manager):
    manager.register_server("B1", "127.0.0.1", 9001)
    bodies = [log_in(client, "wrong"), log_in(client, Origin="http://evil.example"), log_in(client)]
    bodies += [client.get("/dashboard"), client.get("/dashboard/data"), client.post("/dashboard/logout")]
    for response in bodies:
        assert SECRET not in response.get_data(as_text=True)
        assert SECRET not in str(response.headers)


def test_a_new_secret_ends_old_sessions(make_app, make_config):
    first = make_app().test_client()
    log_in(first)
    cookie = first.get_cookie(SESSION_COOKIE, path="/dashboard")
    assert cookie is not None
    other = make_app(make_config(webhook_secret="another-secret-0123456789")).test_client()
    other.set_cookie(SESSION_COOKIE, cookie.value)
    assert other.get("/dashboard/data").status_code == 401


ADMIN = "admin-token-4be07d2a9c1f58"


def test_with_an_admin_token_only_it_logs_in(make_app):
    client = make_app(admin_token=ADMIN).test_client()
    refused = log_in(client, SECRET)  # every GPU server holds the webhook secret
    assert refused.status_code == 401
    assert "Set-Cookie" not in refused.headers
    assert client.get("/dashboard/data").status_code == 401
    accepted = log_in(client, ADMIN)
    assert accepted.status_code == 303
    assert ADMIN not in accepted.headers["Set-Cookie"]
    assert client.get("/dashboard/data").status_code == 200


@pytest.mark.parametrize(
    ("admin_token", "label", "refusal"),
    [
        (None, "Webhook secret (WEBHOOK_SECRET)", "wrong secret: the dashboard opens with WEBHOOK_SECRET"),
        (
            ADMIN,
            "Admin token (ADMIN_TOKEN)",
            "wrong admin token: while ADMIN_TOKEN is set, only it opens the dashboard",
        ),
    ],
)
def test_the_login_names_the_one_credential_it_accepts(make_app, admin_token, label, refusal):
    client = make_app(admin_token=admin_token).test_client()
    form = page_text(client.get("/dashboard"))
    assert f'<label for="secret">{label}</label>' in form
    other = "WEBHOOK_SECRET" if admin_token else "ADMIN_TOKEN"
    assert other in form  # the hint says how the other one stands
    refused = log_in(client, SECRET if admin_token else "wrong")  # the webhook secret, once ADMIN_TOKEN is set
    assert refused.status_code == 401
    assert refusal in page_text(refused) and f'<label for="secret">{label}</label>' in page_text(refused)
    if admin_token:
        assert "wrong secret" not in page_text(refused)  # the webhook secret was given, and is not what it takes
    assert SECRET not in page_text(refused) and ADMIN not in page_text(refused)


def test_a_new_admin_token_ends_old_sessions(make_app):
    first = make_app(admin_token=ADMIN).test_client()
    log_in(first, ADMIN)
    cookie = first.get_cookie(SESSION_COOKIE, path="/dashboard")
    assert cookie is not None
    other = make_app(admin_token=ADMIN + "-rotated").test_client()
    other.set_cookie(SESSION_COOKIE, cookie.value)
    assert other.get("/dashboard/data").status_code == 401


# -- what a server's row and the charts show ---------------------------------------------------


def data_of(client) -> dict:
    reply = client.get("/dashboard/data")
    assert reply.status_code == 200
    body = reply.get_json()
    assert DashboardReplySchema().validate(body) == {}  # strict: every field is declared, none is missing
    return body["data"]


def rows_of(client) -> dict[str, dict]:
    return {row["server_id"]: row for row in data_of(client)["servers"]}


def test_a_row_shows_models_in_flight_against_the_cap_ejection_and_draining(client, manager):
    manager.register_server("B1", "127.0.0.1", 9001, options={"models": ["llama3", "qwen2"], "max_concurrent": 4})
    manager.register_server("B2", "127.0.0.1", 9002)
    lease = manager.hold("B1")
    for _ in range(5):  # OUTLIER_CONSECUTIVE_FAILURES
        manager.report_result("B2", False, "HTTP 502")
    manager.set_draining("B2", True)
    log_in(client)
    rows = rows_of(client)
    lease.release()
    assert rows["B1"]["models"] == ["llama3", "qwen2"] and rows["B2"]["models"] == []
    assert (rows["B1"]["in_flight"], rows["B1"]["max_concurrent"]) == (1, 4)
    assert (rows["B2"]["in_flight"], rows["B2"]["max_concurrent"]) == (0, 0)
    assert (rows["B1"]["ejected"], rows["B1"]["ejection_seconds_left"]) == (False, None)
    assert rows["B2"]["ejected"] is True and 0 < rows["B2"]["ejection_seconds_left"] <= 30
    assert (rows["B1"]["draining"], rows["B2"]["draining"]) == (False, True)


def test_a_row_shows_its_allocation_keys_against_their_cap(client, manager):
    manager.register_server("B1", "127.0.0.1", 9001, options={"max_allocations": 2})
    manager.register_server("B2", "127.0.0.1", 9002)
    manager.set_draining("B2", True)
    for key in ("k1", "k2"):
        assert client.post("/allocations", json={"key": key}, headers={"X-Webhook-Secret": SECRET}).status_code == 201
    log_in(client)
    rows = rows_of(client)
    assert (rows["B1"]["allocations"], rows["B1"]["max_allocations"]) == (2, 2)
    assert (rows["B2"]["allocations"], rows["B2"]["max_allocations"]) == (0, 0)
    assert client.delete("/allocations/k1", headers={"X-Webhook-Secret": SECRET}).status_code == 200
    assert rows_of(client)["B1"]["allocations"] == 1


def test_a_row_shows_the_models_its_server_has_loaded(client, manager):
    manager.register_server("B1", "127.0.0.1", 9001, options={"models": ["llama3", "qwen2"]})
    manager.register_server("B2", "127.0.0.1", 9002, options={"models": ["llama3"]})
    manager.apply_loaded([("B1", "http://127.0.0.1:9001", [("qwen2:latest", 5 * GIB)])])
    log_in(client)

    rows = rows_of(client)

    assert (rows["B1"]["loaded_models"], rows["B2"]["loaded_models"]) == (["qwen2:latest"], [])
    assert "loaded_models" in client.get("/dashboard").get_data(as_text=True)  # the page shows them


def test_a_row_says_why_its_server_is_unhealthy_and_the_data_when_the_last_sweep_was(client, manager, fake_servers):
    up, down = fake_servers("B1"), fake_servers("B2")
    for server in (up, down):
        manager.register_server(server.server_id, "127.0.0.1", server.port)
    log_in(client)
    assert data_of(client)["last_sweep"] is None
    assert [row["last_error"] for row in rows_of(client).values()] == [None, None]
    down.stop()
    for _ in range(3):
        manager.run_health_sweep()
    data = data_of(client)
    rows = {row["server_id"]: row for row in data["servers"]}
    assert rows["B2"]["is_healthy"] is False
    assert rows["B2"]["last_error"] == "unreachable: Connection refused"
    assert rows["B1"]["last_error"] is None and rows["B1"]["last_check_time"].startswith("20")
    assert data["last_sweep"]["time"].startswith("20") and data["last_sweep"]["duration_s"] >= 0


def test_the_data_charts_the_last_15_minutes_for_the_fleet_and_each_server(app, client, manager):
    manager.register_server("B1", "127.0.0.1", 9001)
    manager.register_server("B2", "127.0.0.1", 9002)
    metrics = app.extensions["metrics"]
    metrics.request_done("B1", "GET", 200, 0.02)
    metrics.request_done("B1", "GET", 502, 0.02)
    metrics.request_done("none", "GET", 503, 0.001)  # no server had it: the fleet's, no server's
    log_in(client)
    data = data_of(client)
    assert (data["charts"]["bucket_seconds"], data["charts"]["buckets"]) == (10, 90)
    fleet, rows = data["charts"]["fleet"], {row["server_id"]: row for row in data["servers"]}
    assert [len(fleet[name]) for name in ("rps", "error_rate", "p95_s")] == [90, 90, 90]
    assert fleet["error_rate"][-1] == pytest.approx(2 / 3, abs=1e-3)
    assert rows["B1"]["charts"]["error_rate"][-1] == 0.5 and rows["B1"]["charts"]["rps"][-1] > 0
    assert rows["B1"]["charts"]["p95_s"][-1] == pytest.approx(0.01 + 0.015 * 0.95)
    quiet = rows["B2"]["charts"]
    assert set(quiet["rps"]) == {0.0} and set(quiet["error_rate"]) == {None} and set(quiet["p95_s"]) == {None}


# -- the job queue and the pull workers -------------------------------------------------------

ASYNC = {"Prefer": "respond-async"}
WORKER = {"Authorization": f"Bearer {SECRET}"}  # WORKER_TOKEN unset: the webhook secret, as a Bearer token


def submit(client, priority: str | None = None) -> str:
    """Queue a job: no server is registered, so it waits."""
    headers = ASYNC if priority is None else {**ASYNC, "X-Job-Priority": priority}
    answer = client.post("/api/echo", data=b"hello", headers=headers)
    assert answer.status_code == 202, answer.get_data(as_text=True)
    return answer.get_json()["job_id"]


def lease(client, worker_id: str = "W1", max_jobs: int = 1) -> list[dict]:
    body = {"worker_id": worker_id, "routes": ["/api/"], "max_jobs": max_jobs}
    answer = client.post("/workers/lease", json=body, headers=WORKER)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()["jobs"]


def test_with_no_jobs_the_queue_is_empty_and_there_are_no_workers(client):
    log_in(client)
    data = data_of(client)
    assert data["jobs"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "expired": 0,
                            "queued_by_priority": [0] * 10, "oldest_wait_s": None}  # fmt: skip
    assert data["workers"] == {"workers": [], "gone_after_seconds": 90.0}


def test_the_data_counts_queued_jobs_per_priority_and_the_oldest_wait(app, client):
    store = app.extensions["jobs"].store
    real_clock = store.clock
    store.clock = lambda: real_clock() - 120  # the first job was queued two minutes ago
    submit(client)
    store.clock = real_clock
    submit(client), submit(client, "0"), submit(client, "9")
    log_in(client)
    jobs = data_of(client)["jobs"]
    assert (jobs["queued"], jobs["running"], jobs["failed"]) == (4, 0, 0)
    assert jobs["queued_by_priority"] == [1, 0, 0, 0, 0, 2, 0, 0, 0, 1]  # 5 when X-Job-Priority is absent
    assert jobs["oldest_wait_s"] >= 120  # the oldest job's, not the newest's


def test_the_data_counts_running_failed_and_cancelled_jobs_and_shows_each_worker(app, client):
    first, second, third = submit(client), submit(client), submit(client)
    leased = {job["job_id"]: job for job in lease(client, "W1", max_jobs=2)}
    assert set(leased) == {first, second}
    answer = {"lease_token": leased[first]["lease_token"], "error": "bad input", "retry": False}
    failed = client.post(f"/jobs/{first}/fail", json=answer, headers=WORKER)
    assert failed.get_json()["status"] == "failed"
    assert client.delete(f"/jobs/{third}").status_code == 200
    log_in(client)
    data = data_of(client)
    assert {name: data["jobs"][name] for name in ("queued", "running", "failed", "cancelled", "succeeded")} == {
        "queued": 0, "running": 1, "failed": 1, "cancelled": 1, "succeeded": 0}  # fmt: skip
    assert data["jobs"]["oldest_wait_s"] is None  # none queued: no wait, not a zero one
    [worker] = data["workers"]["workers"]
    assert (worker["worker_id"], worker["state"], worker["jobs"]) == ("W1", "active", [second])
    assert (worker["routes"], worker["max_jobs"]) == (["/api/"], 2)
    assert worker["last_seen_at"] == pytest.approx(time.time(), abs=60)  # a Unix time, not a monotonic one
    admin = client.get("/admin/workers", headers=WORKER).get_json()["data"]  # the same list as the admin API's
    assert admin == data["workers"]


def test_a_silent_worker_shows_as_gone(app, client):
    submit(client)
    lease(client, "W1")
    registry = app.extensions["jobs"].workers
    real_clock = registry.clock
    registry.clock = lambda: real_clock() + 91  # three 30 s lease periods of silence, and a second
    log_in(client)
    [worker] = data_of(client)["workers"]["workers"]
    assert worker["state"] == "gone" and len(worker["jobs"]) == 1  # its lease runs out on its own, later


# -- drain, enable and unregister from the page -------------------------------------------------


def token_of(client) -> str:
    return data_of(client)["csrf_token"]


def test_drain_enable_and_unregister_with_the_logins_token(client, manager):
    manager.register_server("B1", "127.0.0.1", 9001)
    log_in(client)
    headers = {"X-CSRF-Token": token_of(client)}
    drained = client.post("/dashboard/servers/B1/drain", headers=headers)
    assert drained.status_code == 200
    assert drained.get_json()["message"] == "server B1 draining"  # the admin API's reply, from its code
    assert ServerReplySchema().validate(drained.get_json()) == {}
    assert manager.get_server("B1").draining is True
    enabled = client.post("/dashboard/servers/B1/enable", headers=headers)
    assert (enabled.status_code, enabled.get_json()["data"]["draining"]) == (200, False)
    assert manager.get_server("B1").draining is False
    removed = client.delete("/dashboard/servers/B1", headers=headers)
    assert removed.get_json() == {"success": True, "message": "server B1 unregistered", "server_id": "B1"}
    assert manager.get_server("B1") is None
    missing = client.post("/dashboard/servers/B1/drain", headers=headers)
    assert missing.status_code == 404
    assert missing.get_json()["message"] == "server B1 is not registered"


ACTIONS = [("post", "/dashboard/servers/B1/drain"), ("post", "/dashboard/servers/B1/enable"),
           ("delete", "/dashboard/servers/B1")]  # fmt: skip


@pytest.mark.parametrize(("method", "path"), ACTIONS)
def test_an_action_needs_a_login(client, manager, method, path):
    manager.register_server("B1", "127.0.0.1", 9001)
    response = getattr(client, method)(path, headers={"X-CSRF-Token": "anything"})
    assert response.status_code == 401
    assert response.get_json()["message"] == "log in at /dashboard first"
    assert manager.get_server("B1") is not None and manager.get_server("B1").draining is False


@pytest.mark.parametrize("token", [None, "", "wrong", "another login's"])
@pytest.mark.parametrize(("method", "path"), ACTIONS)
def test_an_action_without_the_logins_csrf_token_is_forbidden(app, client, manager, method, path, token):
    manager.register_server("B1", "127.0.0.1", 9001)
    manager.set_draining("B1", True)  # so that enable would change it too
    log_in(client)
    if token == "another login's":
        other = app.test_client()
        log_in(other)
        token = token_of(other)
        assert token != token_of(client)
    headers = {} if token is None else {"X-CSRF-Token": token}
    response = getattr(client, method)(path, headers=headers)
    assert response.status_code == 403
    assert response.get_json() == {
        "success": False,
        "message": "missing or wrong X-CSRF-Token header: reload the dashboard and try again",
        "errors": None,
    }
    assert manager.get_server("B1") is not None and manager.get_server("B1").draining is True


def test_an_action_from_another_site_is_forbidden_even_with_the_token(client, manager):
    manager.register_server("B1", "127.0.0.1", 9001)
    log_in(client)
    headers = {"X-CSRF-Token": token_of(client), "Origin": "http://evil.example"}
    response = client.post("/dashboard/servers/B1/drain", headers=headers)
    assert (response.status_code, response.get_json()["message"]) == (
        403,
        "refused: the request came from another site",
    )
    assert manager.get_server("B1").draining is False


def test_a_token_dies_with_its_login(app, client, manager):
    manager.register_server("B1", "127.0.0.1", 9001)
    stolen = session_cookie(log_in(client))
    token = token_of(client)
    assert token == token_of(client)  # one token for the whole login, not one per reply
    client.post("/dashboard/logout")
    log_in(client)
    assert token_of(client) != token  # a new login, a new token
    replayed = app.test_client(use_cookies=False).post(
        "/dashboard/servers/B1/drain", headers={"Cookie": f"{SESSION_COOKIE}={stolen}", "X-CSRF-Token": token}
    )
    assert replayed.status_code == 401
    assert manager.get_server("B1").draining is False


# -- the page in a real browser --------------------------------------------------------------


@pytest.fixture(scope="session")
def chromedriver() -> str:
    """Debian's chromium and chromedriver, installed here with apt-get if missing and run as root (as CI is)."""
    import os  # here, so that this fixture is all that changed

    if not (shutil.which("chromedriver") and shutil.which("chromium")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail(
                "the dashboard's browser test needs chromium and chromedriver on PATH; make test installs them "
                "only as root, with apt-get. Install them (Debian or Ubuntu: sudo apt-get install chromium "
                "chromium-driver) and run make test again.",
                pytrace=False,
            )
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True, timeout=900)
    path = shutil.which("chromedriver")
    assert path, "chromedriver is missing even after apt-get install chromium-driver"
    return path


@pytest.fixture
def browser(chromedriver: str) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dashboard-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1280,800",
    ):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_dashboard(browser, gateway, width: int | None = None):
    """Log in to the gateway's dashboard, noting any CSP violation in window.violations; a WebDriverWait."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if width is not None:  # the page's viewport, not the window's outer size
        metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    violations = "window.violations = []; document.addEventListener('securitypolicyviolation', e => "
    violations += "window.violations.push(e.violatedDirective + ' ' + e.blockedURI));"
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": violations})
    browser.get(gateway.url + "/dashboard")
    assert not browser.find_elements(By.ID, "servers")
    browser.find_element(By.NAME, "secret").send_keys(SECRET)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    return WebDriverWait(browser, 15, poll_frequency=0.2)


def rows_shown(browser) -> int:
    return browser.execute_script("return document.querySelectorAll('#servers td.health').length")


def test_the_browser_sees_a_killed_server_turn_unhealthy(browser, live_gateway, fake_servers):
    from selenium.webdriver.common.by import By

    gateway = live_gateway(health_check_interval=3600.0)
    servers = [fake_servers(f"B{i}") for i in (1, 2, 3)]
    for server in servers:
        gateway.register(server)
    wait = open_dashboard(browser, gateway)

    def health(server_id: str) -> str | None:
        cells = browser.find_elements(By.CSS_SELECTOR, f'#servers tr[data-server-id="{server_id}"] td.health .status')
        return cells[0].text if cells else None

    wait.until(lambda _: [health(f"B{i}") for i in (1, 2, 3)] == ["healthy"] * 3)
    assert SECRET not in browser.current_url and SECRET not in browser.page_source
    assert browser.find_element(By.ID, "total_servers").text == "3"
    browser.execute_script("window.sameDocument = true")  # a reload would drop it

    servers[1].stop()
    for _ in range(3):
        gateway.manager.run_health_sweep()
    assert not gateway.manager.get_server("B2").is_healthy
    wait.until(lambda _: health("B2") == "UNHEALTHY")  # the page's own refresh, no reload
    row = browser.find_element(By.CSS_SELECTOR, '#servers tr[data-server-id="B2"]')
    assert "unhealthy" in row.get_attribute("class")
    assert row.find_element(By.CSS_SELECTOR, "td.health .since").text.startswith("for ")
    assert row.find_element(By.CSS_SELECTOR, "td.check").text == "unreachable: Connection refused\n3 failed in a row"
    assert browser.find_element(By.ID, "last_sweep").text.startswith("last health sweep ")
    assert [health("B1"), health("B3")] == ["healthy", "healthy"]
    assert browser.find_element(By.ID, "unhealthy_servers").text == "1"
    assert browser.execute_script("return window.sameDocument === true")
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")  # 1280 px
    assert browser.execute_script("return window.violations") == []  # the page works under its CSP
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: no script can read it
    echoed = browser.execute_async_script(
        "fetch('/api/echo', {credentials: 'same-origin'}).then(r => r.json()).then(arguments[0])"
    )
    assert "cookie" not in {name.lower() for name in echoed["headers"]}  # Path=/dashboard: never sent upstream

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    assert Path(screenshot).stat().st_size > 0


def test_login_behind_a_tls_proxy_is_same_origin(app):
    client = app.test_client()
    response = client.post(
        "/dashboard/login",
        data={"secret": SECRET},
        headers={"Origin": "https://localhost"},
        base_url="http://localhost",
    )
    assert response.status_code == 303


def chart_path(browser, server_id: str, name: str) -> list[tuple[float, float]]:
    """The points (x, y) of a chart's SVG path: M/L x y, then H to the bucket's right edge."""
    d = browser.execute_script(
        "const path = document.querySelector(`#charts .chart.${arguments[1]}[data-chart='${arguments[0]}'] path`);"
        "return path ? path.getAttribute('d') : null;",
        server_id,
        name,
    )
    if not d:
        return []
    points = re.findall(r"[ML](-?[\d.]+) (-?[\d.]+)", d)
    return [(float(x), float(y)) for x, y in points]


def test_the_browser_charts_requests_and_drains_a_server_after_a_confirming_click(browser, live_gateway, fake_servers):
    from selenium.webdriver.common.by import By

    gateway = live_gateway(health_check_interval=3600.0)
    for server_id in ("B1", "B2"):
        gateway.register(fake_servers(server_id))
    wait = open_dashboard(browser, gateway)
    wait.until(lambda _: rows_shown(browser) == 2)
    assert chart_path(browser, "B1", "p95_s") == []  # no requests yet: nothing drawn, not a zero line
    assert {y for _, y in chart_path(browser, "B1", "rps")} == {29.0}  # 0 req/s, on the baseline

    for _ in range(8):
        assert requests.get(gateway.url + "/api/echo", timeout=5).status_code == 200
    wait.until(lambda _: any(y < 29.0 for _, y in chart_path(browser, "B1", "rps")))  # the page's own refresh
    assert chart_path(browser, "B1", "p95_s") and chart_path(browser, "", "p95_s")  # "" is the fleet's row
    assert chart_path(browser, "B1", "error_rate")[-1][1] == 29.0  # requests, none failed: a 0 % line
    value = browser.find_element(By.CSS_SELECTOR, "#charts .chart.rps[data-chart='B1'] .value").text
    assert "req/s" in value and "peak" in value

    toggle = browser.find_element(By.CSS_SELECTOR, '#servers tr[data-server-id="B1"] button.toggle')
    assert toggle.text == "drain"
    toggle.click()
    assert toggle.text == "confirm drain B1?"
    assert gateway.manager.get_server("B1").draining is False  # one click only asks
    toggle.click()
    wait.until(lambda _: gateway.manager.get_server("B1").draining)
    wait.until(lambda _: toggle.text == "enable")
    state = browser.find_element(By.CSS_SELECTOR, '#servers tr[data-server-id="B1"] td.state')
    assert state.text == "draining"
    assert browser.find_element(By.ID, "action_message").text == "server B1 draining"

    forged = browser.execute_async_script(  # the page's own origin and cookie, without the token
        "fetch('/dashboard/servers/B2/drain', {method: 'POST', credentials: 'same-origin'})"
        ".then(r => arguments[0](r.status))"
    )
    assert forged == 403
    assert gateway.manager.get_server("B2").draining is False
    assert browser.execute_script("return window.violations") == []


def test_the_browser_shows_each_servers_allocation_keys_against_their_cap(browser, live_gateway, fake_servers):
    from selenium.webdriver.common.by import By

    gateway = live_gateway(health_check_interval=3600.0)
    for server_id in ("B1", "B2"):
        gateway.register(fake_servers(server_id))
    gateway.manager.update_server("B2", {"max_allocations": 1})
    wait = open_dashboard(browser, gateway)
    wait.until(lambda _: rows_shown(browser) == 2)
    cells = {
        server_id: browser.find_element(By.CSS_SELECTOR, f'#servers tr[data-server-id="{server_id}"] td.keys')
        for server_id in ("B1", "B2")
    }
    wait.until(lambda _: (cells["B1"].text, cells["B2"].text) == ("0 / no cap", "0 / 1"))
    for key in ("k1", "k2"):  # B1, then B2: the lower score, ties to the first registered
        answer = requests.post(
            gateway.url + "/allocations", json={"key": key}, headers={"X-Webhook-Secret": SECRET}, timeout=5
        )
        assert answer.status_code == 201
    wait.until(lambda _: (cells["B1"].text, cells["B2"].text) == ("1 / no cap", "1 / 1"))  # the page's own refresh
    assert "full" in cells["B2"].get_attribute("class").split()
    assert browser.execute_script("return window.violations") == []


def queue_jobs(gateway, *priorities: str) -> None:
    """Queue one job per priority over HTTP: no server is registered, so each waits."""
    for priority in priorities:
        headers = {**ASYNC, "X-Job-Priority": priority}
        assert requests.post(gateway.url + "/api/echo", data=b"x", headers=headers, timeout=5).status_code == 202


def lease_over_http(gateway, worker_id: str, max_jobs: int = 1) -> list[dict]:
    body = {"worker_id": worker_id, "routes": ["/api/"], "max_jobs": max_jobs}
    answer = requests.post(gateway.url + "/workers/lease", json=body, headers=WORKER, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()["jobs"]


def test_the_browser_shows_the_queue_and_a_worker_once_it_leases(browser, live_gateway):
    from selenium.webdriver.common.by import By

    gateway = live_gateway()
    queue_jobs(gateway, "0", "5", "5")
    wait = open_dashboard(browser, gateway)

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    def at_priority(priority: int) -> str:
        return browser.find_element(By.CSS_SELECTOR, f'#priorities [data-priority="{priority}"] .count').text

    wait.until(lambda _: text("jobs_queued") == "3")
    assert (text("jobs_running"), text("jobs_failed")) == ("0", "0")
    assert [at_priority(p) for p in range(10)] == ["1", "0", "0", "0", "0", "2", "0", "0", "0", "0"]
    assert re.fullmatch(r"\d+ (s|min|h|d)", text("jobs_oldest_wait"))
    assert browser.find_element(By.ID, "no_workers").is_displayed()
    assert not browser.find_element(By.ID, "workers").is_displayed()  # no made-up row: no table at all
    browser.execute_script("window.sameDocument = true")

    [leased] = lease_over_http(gateway, "gpu-pull-1")
    row = '#workers tr[data-worker-id="gpu-pull-1"]'
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, row))  # the page's own refresh, no reload
    wait.until(lambda _: text("jobs_queued") == "2" and text("jobs_running") == "1")
    assert at_priority(0) == "0"  # the lease took the priority-0 job first
    cells = {
        cell.get_attribute("data-label"): cell.text for cell in browser.find_elements(By.CSS_SELECTOR, row + " td")
    }
    assert cells["state"] == "active"
    assert cells["jobs held"] == "1" and cells["serves"] == "/api/" and cells["max jobs"] == "1"
    assert cells["last seen"].endswith(" ago")
    assert not browser.find_element(By.ID, "no_workers").is_displayed()
    assert browser.find_element(By.CSS_SELECTOR, row + " td.jobs").get_attribute("title") == leased["job_id"]
    assert browser.execute_script("return window.sameDocument === true")
    assert browser.execute_script("return window.violations") == []


def test_at_700_px_wide_the_servers_fit_without_a_sideways_scrollbar(browser, live_gateway, fake_servers):
    gateway = live_gateway(health_check_interval=3600.0)
    servers = [fake_servers(f"gpu-server-{i:02d}") for i in range(1, 4)]
    long_models = {"models": [f"meta-llama/Meta-Llama-3.1-70B-Instruct-{n}" for n in range(4)], "max_concurrent": 8}
    queue_jobs(gateway, "0", "3", "5", "9")  # before the servers join, or they would take every one
    lease_over_http(gateway, "gpu-pull-worker-behind-nat-" + "x" * 37, max_jobs=2)  # the longest worker id
    for server in servers:
        gateway.manager.register_server(server.server_id, "127.0.0.1", server.port, options=long_models)
    servers[2].stop()
    for _ in range(3):
        gateway.manager.run_health_sweep()
    wait = open_dashboard(browser, gateway, width=700)
    wait.until(lambda _: rows_shown(browser) == 3)
    wait.until(lambda _: browser.execute_script("return document.querySelectorAll('#workers td.state').length") == 1)
    widths = browser.execute_script(
        "return [window.innerWidth, document.documentElement.scrollWidth,"
        " document.getElementById('servers').scrollWidth, document.getElementById('workers').scrollWidth,"
        " document.getElementById('jobs').scrollWidth, document.body.clientWidth]"
    )
    inner, page, table, workers, jobs, body = widths
    assert inner == 700
    assert page <= inner, f"the page is {page} px wide in a {inner} px window"
    assert table <= body, f"the table is {table} px wide in a body of {body} px"
    assert workers <= body, f"the workers' table is {workers} px wide in a body of {body} px"
    assert jobs <= body, f"the jobs' panel is {jobs} px wide in a body of {body} px"
    assert browser.execute_script("return window.violations") == []
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard-700px.png"))
