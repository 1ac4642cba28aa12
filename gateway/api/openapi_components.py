"""The pieces /openapi.json's operations share: the security schemes, the named error replies, the builders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.api import dashboard
from gateway.proxy.forwarding import SESSION_COOKIE

JSON = "application/json"
# Each view function's operations, by HTTP method.
RouteOperations = dict[Callable[..., Any], dict[str, dict[str, Any]]]

SECURITY_SCHEMES = {
    "webhookSecret": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Webhook-Secret",
        "description": "WEBHOOK_SECRET, which every GPU server holds. /webhook/register and /webhook/unregister"
        " also take it in the body's `secret` field, as the seed's clients send it.",
    },
    "webhookBearer": {"type": "http", "scheme": "bearer", "description": "WEBHOOK_SECRET as a Bearer token."},
    "webhookQuery": {
        "type": "apiKey",
        "in": "query",
        "name": "secret",
        "description": "WEBHOOK_SECRET in the URL: GET /webhook/servers only, for the seed's clients.",
    },
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "ADMIN_TOKEN as a Bearer token. While ADMIN_TOKEN is unset, the webhook secret"
        " (X-Webhook-Secret or Bearer) opens the admin endpoints instead.",
    },
    "workerToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "WORKER_TOKEN as a Bearer token, for pull workers. While WORKER_TOKEN is unset, the"
        " webhook secret, as a Bearer token too.",
    },
    "metricsToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "METRICS_TOKEN as a Bearer token; /metrics is open while it is unset.",
    },
    "dashboardSession": {
        "type": "apiKey",
        "in": "cookie",
        "name": SESSION_COOKIE,
        "description": "The signed cookie that POST /dashboard/login sets.",
    },
    "dashboardCsrf": {
        "type": "apiKey",
        "in": "header",
        "name": dashboard.CSRF_HEADER,
        "description": "The login's csrf_token from GET /dashboard/data, which the dashboard's actions send back.",
    },
}
OPEN: list[dict[str, list[str]]] = []
WEBHOOK: list[dict[str, list[str]]] = [{"webhookSecret": []}, {"webhookBearer": []}]
ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}, {"webhookSecret": []}]
WORKER: list[dict[str, list[str]]] = [{"workerToken": []}]
DASHBOARD_ACTION: list[dict[str, list[str]]] = [{"dashboardSession": [], "dashboardCsrf": []}]  # both at once

ERROR_RESPONSES = {
    400: ("BadRequest", "The body is not a JSON object, or a field is invalid (`errors` names each)."),
    401: ("Unauthorized", "The credential is missing or wrong; `message` says where to send it."),
    403: ("Forbidden", "A dashboard action from another site, or without the login's X-CSRF-Token."),
    404: ("NotFound", "No server is registered under that id."),
    413: ("PayloadTooLarge", "The body is over the limit of 64 KiB."),
    503: ("NotSaved", "The change could not be saved to disk; try again after Retry-After seconds."),
    409: ("Conflict", "The job is not in a state that allows this (finished already, say)."),
    410: ("Gone", "The job was cancelled or expired: it has no answer."),
    422: ("KeyReused", "This Idempotency-Key was used for a different request."),
    502: ("JobFailed", "The job failed before any server answered; `message` says why."),
    507: ("StoreFull", "The job store is at JOB_STORE_MAX_BYTES; try again when jobs have finished."),
}
# Errors that share a status with one above but mean something else.
OTHER_ERRORS = {
    "TooManyPolls": "WORKER_MAX_LONG_POLLS long polls are open; try again after Retry-After seconds.",
    "NoRoom": "No server that may take the key (healthy, not draining, at its location) has room; try again"
    " after Retry-After seconds. Also 503 when Redis does not answer.",
    "NoAllocation": "No allocation has that key.",
    "MoveConflict": "The server is unhealthy, draining or full, or the key is being moved already.",
    "MoveRefused": "ALLOCATION_MIGRATE_URL refused the move, or did not answer in time: the key stayed.",
    "StaleLease": "The lease token is not the job's current one: its lease ran out and moved on. Nothing changed.",
}


def reply(schema: Any, description: str = "OK") -> dict[str, Any]:
    """A JSON response with `schema`."""
    return {"description": description, "content": {JSON: {"schema": schema}}}


def json_body(schema: Any) -> dict[str, Any]:
    """A required JSON request body with `schema`."""
    return {"required": True, "content": {JSON: {"schema": schema}}}


def operation(tag: str, security: list[Any], ok: dict[str, Any], *errors: int, **extra: Any) -> dict[str, Any]:
    """One operation: its 200 reply, the shared error replies it can give, and anything else it names."""
    responses = {"200": ok, **{str(code): ERROR_RESPONSES[code][0] for code in errors}}
    return {"tags": [tag], "security": security, "responses": responses, **extra}


def admin_operation(ok: Any, *errors: int, **extra: Any) -> dict[str, Any]:
    """An /admin operation: the admin credential, and a 401 without it."""
    return operation("admin", ADMIN, reply(ok), 401, *errors, **extra)
