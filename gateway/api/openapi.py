"""GET /openapi.json: the gateway's own API as OpenAPI 3.1, built once per app from its routes and schemas.

Paths come from the app's URL map, so only routes the app has are described (the LLM routes
when LLM_ROUTES is on, each configured proxy prefix). Bodies and replies come from the
marshmallow schemas in schemas.py and replies.py, through apispec's MarshmallowPlugin.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, Response, current_app
from marshmallow import fields

from gateway.api import (
    admin,
    allocation_replies,
    allocation_schemas,
    allocations,
    dashboard,
    job_replies,
    jobs,
    llm,
    llm_replies,
    replies,
    routing_replies,
    server_replies,
    status,
    status_replies,
    webhook,
    worker_socket,
    workers,
)
from gateway.api.schemas import (
    NAME_PATTERN,
    Count,
    Gigabytes,
    JobAnswerSchema,
    JobFailureSchema,
    LeaseSchema,
    LeaseTokenSchema,
    ModelRequestSchema,
    Name,
    Port,
    RegisterSchema,
    Seconds,
    ServerIdSchema,
    ServerOptionsSchema,
)
from gateway.fleet.model_memory import MAX_MODEL_GB
from gateway.observability import metrics
from gateway.proxy import views
from gateway.proxy.forwarding import SESSION_COOKIE

JSON = "application/json"
FORM = "multipart/form-data"
RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")  # werkzeug's <converter:name>
# JSON Schema's integer takes 8000.0 too, which the gateway refuses, as it refuses true for 1.
WHOLE_NUMBER = "a JSON integer written without a fraction or exponent (8000, not 8000.0)"
PASSED_THROUGH = {"default": {"description": "the GPU server's answer, passed through as it sent it"}}

bp = Blueprint("openapi", __name__)

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


def dashboard_action(ok: Any) -> dict[str, Any]:
    """A change made from the dashboard's page: its login and CSRF token, as the admin API's change does."""
    return operation("dashboard", DASHBOARD_ACTION, reply(ok), 401, 403, 404, 503)


def llm_operation(summary: str, openai: bool) -> dict[str, Any]:
    """An LLM request routed by its model; what comes back is the GPU server's."""
    content: dict[str, Any] = {JSON: {"schema": ModelRequestSchema}}
    if openai:  # an audio transcription, say: the model is a form field, and the form goes on byte for byte
        form = {"type": "object", "required": ["model"], "properties": {"model": {"type": "string", "minLength": 1}}}
        content[FORM] = {"schema": form}
    return {
        "tags": ["llm"],
        "summary": summary,
        "security": OPEN,
        "requestBody": {"required": True, "content": content},
        "responses": PASSED_THROUGH,
        "description": "Routed to a server that has the model; its answer streams back as sent. The gateway's"
        " own errors (400 for a body without a model, 404 for an unknown model, 413, 502, 503, 504) come"
        " in this API's error shape. With an allocated `X-Allocation-Key` it goes to that key's server and"
        " nowhere else: 409 when that server does not serve the model, 503 while it is down and the key"
        " cannot move, 400 for a malformed key (docs/allocations.md).",
    }


def llm_read(ok: Any, error: Any, **extra: Any) -> dict[str, Any]:
    """A listing the gateway answers itself; its errors in its API's shape."""
    responses = {"200": ok, "default": reply(error, "An error, in this API's shape.")}
    return {"tags": ["llm"], "security": OPEN, "responses": responses, **extra}


MISSING_SERVERS = {
    "X-Missing-Servers": {
        "description": "the healthy servers left out: they failed, or did not answer within HEALTH_CHECK_TIMEOUT",
        "schema": {"type": "string"},
    }
}


ONE_MODEL = (
    "Any model GET /v1/models lists, under the same name (Ollama's rule: `llama3` is `llama3:latest`);"
    " another is a 404 with code `model_not_found`."
)
VERSION = "The lowest version among the healthy servers that answered; 503 with Retry-After when none did."


def fleet_reply(schema: Any) -> dict[str, Any]:
    """The reply of a question put to every healthy server at once."""
    return {**reply(schema), "headers": MISSING_SERVERS}


def proxied_operations() -> dict[str, dict[str, Any]]:
    """A proxied prefix: any method, passed to a healthy server with the request as sent."""
    body = {"required": False, "content": {JSON: {"schema": {}}}}
    # Only 202 beside the server's own answers: a prefix may hold LLM paths, whose errors have their API's shape.
    described: dict[str, Any] = {
        "tags": ["proxy"],
        "security": OPEN,
        "responses": {**PASSED_THROUGH, "202": reply(job_replies.JobAcceptedSchema, "Stored as a job.")},
        "description": "Forwarded to the next healthy server, path, query, body and headers as sent. When no"
        " server can take it the gateway answers 502, 503 or 504 in its error shape. With `Prefer:"
        " respond-async` (or an `Idempotency-Key`) it is stored as a job and answered 202, or 400 for a bad"
        " job header, 422 for a key reused with another request, 507 when the job store is full (docs/jobs.md)."
        " With `X-Allocation-Key` it goes to that key's server, or is answered 503 while the server is down"
        " and the key cannot move (docs/allocations.md).",
    }
    return {
        method: {**described, **({"requestBody": body} if method in ("post", "put", "patch") else {})}
        for method in ("get", "post", "put", "patch", "delete")
    }


def job_operation(ok: dict[str, Any], *errors: int, **extra: Any) -> dict[str, Any]:
    """A job's own endpoint: its id is the credential (128 random bits)."""
    return operation("jobs", OPEN, ok, 404, *errors, **extra)


def held_job_operation(body: Any) -> dict[str, Any]:
    """A pull worker's call about a job it holds: the worker credential and the job's lease token."""
    described = operation("workers", WORKER, reply(job_replies.HeldJobReplySchema), 400, 401, 404, 413)
    described["responses"]["409"] = "StaleLease"
    return {**described, "requestBody": json_body(body)}


def lease_operation() -> dict[str, Any]:
    """`POST /workers/lease`: jobs, or 204 when none came within wait_seconds."""
    described = operation(
        "workers", WORKER, reply(job_replies.LeaseReplySchema), 400, 401, 413, requestBody=json_body(LeaseSchema)
    )
    described["responses"]["204"] = {"description": "No job came within wait_seconds."}
    described["responses"]["503"] = "TooManyPolls"
    return described


# At least one option: an empty change is a 400 that says so.
OPTIONS_CHANGE = admin_operation(
    server_replies.ServerReplySchema,
    400,
    404,
    503,
    requestBody=json_body({"allOf": [ServerOptionsSchema], "minProperties": 1}),
)
OPERATIONS: dict[Callable[..., Any], dict[str, dict[str, Any]]] = {
    webhook.register: {
        "post": operation(
            "webhook",
            WEBHOOK,
            reply(server_replies.RegisterReplySchema),
            400,
            401,
            413,
            503,
            requestBody=json_body(RegisterSchema),
        )
    },
    webhook.unregister: {
        "post": operation(
            "webhook",
            WEBHOOK,
            reply(server_replies.UnregisterReplySchema),
            400,
            401,
            404,
            413,
            503,
            requestBody=json_body(ServerIdSchema),
        )
    },
    webhook.list_servers: {
        "get": operation("webhook", [*WEBHOOK, {"webhookQuery": []}], reply(server_replies.FleetReplySchema), 401)
    },
    admin.list_servers: {"get": admin_operation(server_replies.ServerListReplySchema)},
    admin.add_server: {
        "post": {
            **admin_operation(server_replies.ServerReplySchema, 400, 413, 503, requestBody=json_body("AdminRegister")),
            "responses": {
                "200": reply(server_replies.ServerReplySchema, "The server was registered already and is updated."),
                "201": reply(server_replies.ServerReplySchema, "The server is registered."),
                **{str(code): ERROR_RESPONSES[code][0] for code in (400, 401, 413, 503)},
            },
        }
    },
    admin.get_server: {"get": admin_operation(server_replies.ServerReplySchema, 404)},
    admin.update_server: {"patch": OPTIONS_CHANGE, "put": OPTIONS_CHANGE},
    admin.delete_server: {"delete": admin_operation(server_replies.UnregisterReplySchema, 404, 503)},
    admin.drain_server: {"post": admin_operation(server_replies.ServerReplySchema, 404, 503)},
    admin.enable_server: {"post": admin_operation(server_replies.ServerReplySchema, 404, 503)},
    admin.reset_token: {"post": admin_operation(server_replies.ServerReplySchema, 404, 503)},
    admin.priority_check: {"get": admin_operation(routing_replies.PriorityCheckReplySchema)},
    admin.priority_overview: {"get": admin_operation(routing_replies.PriorityOverviewReplySchema)},
    admin.rankings: {"get": admin_operation(routing_replies.RankingsReplySchema)},
    admin.resource_cache_stats: {"get": admin_operation(routing_replies.ResourceCacheReplySchema)},
    admin.resource_cache_clear: {
        "post": {
            **admin_operation(routing_replies.ResourceCacheClearedReplySchema),
            "responses": {
                "202": reply(
                    routing_replies.ResourceCacheClearedReplySchema, "The readings are dropped; the monitors are read."
                ),
                "401": ERROR_RESPONSES[401][0],
            },
        }
    },
    status.health: {"get": operation("status", OPEN, reply(status_replies.HealthSchema))},
    status.status: {"get": operation("status", ADMIN, reply(status_replies.StatusReplySchema), 401)},
    metrics.scrape: {
        "get": operation(
            "status",
            [{}, {"metricsToken": []}],
            {"description": "The Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}},
            401,
        )
    },
    dashboard.data: {
        "get": operation("dashboard", [{"dashboardSession": []}], reply(status_replies.DashboardReplySchema), 401)
    },
    dashboard.drain_server: {"post": dashboard_action(server_replies.ServerReplySchema)},
    dashboard.enable_server: {"post": dashboard_action(server_replies.ServerReplySchema)},
    dashboard.unregister_server: {"delete": dashboard_action(server_replies.UnregisterReplySchema)},
    llm.openai_models_view: {"get": llm_read(reply(llm_replies.OpenAIModelListSchema), llm_replies.OpenAIErrorSchema)},
    llm.openai_model_view: {
        "get": llm_read(reply(llm_replies.OpenAIModelSchema), llm_replies.OpenAIErrorSchema, description=ONE_MODEL)
    },
    llm.ollama_tags_view: {"get": llm_read(reply(llm_replies.OllamaTagsSchema), llm_replies.OllamaErrorSchema)},
    llm.ollama_ps_view: {"get": llm_read(fleet_reply(llm_replies.OllamaPsSchema), llm_replies.OllamaErrorSchema)},
    llm.ollama_version_view: {
        "get": llm_read(
            fleet_reply(llm_replies.OllamaVersionSchema), llm_replies.OllamaErrorSchema, description=VERSION
        )
    },
    llm.openai_view: {"post": llm_operation("OpenAI API, routed by the body's (or the form's) model", openai=True)},
    llm.ollama_view: {"post": llm_operation("Ollama API, routed by the body's model", openai=False)},
    views.proxy_view: proxied_operations(),
    jobs.get_job: {"get": job_operation(reply(job_replies.JobReplySchema))},
    jobs.get_result: {
        "get": {
            **job_operation({"description": "The server's answer, as it gave it."}, 410),
            "responses": {
                "200": {"description": "The server's answer, as it gave it (any status, headers and body)."},
                "202": reply(job_replies.JobReplySchema, "Not finished yet; ask again after Retry-After seconds."),
                "404": ERROR_RESPONSES[404][0],
                "410": ERROR_RESPONSES[410][0],
                "502": ERROR_RESPONSES[502][0],
            },
        }
    },
    jobs.cancel_job: {"delete": job_operation(reply(job_replies.JobReplySchema), 409)},
    jobs.list_jobs: {"get": admin_operation(job_replies.JobListReplySchema, 400)},
    jobs.retry_job: {"post": admin_operation(job_replies.JobReplySchema, 404, 409)},
    workers.lease: {"post": lease_operation()},
    worker_socket.worker_socket: {
        "get": {
            "tags": ["workers"],
            "security": WORKER,
            "description": "Upgrade to a WebSocket (RFC 6455). The worker's first message is"
            ' {"type": "hello", "worker_id", "routes" or "models", "max_jobs"}; jobs then come in seed'
            ' 004\'s envelope, each answered with {"type": "result", "request_id", "error", "result"}.'
            " See docs/jobs.md.",
            "responses": {
                "101": {"description": "Switching Protocols: the WebSocket is open."},
                "400": ERROR_RESPONSES[400][0],
                "401": ERROR_RESPONSES[401][0],
            },
        }
    },
    workers.heartbeat: {"post": held_job_operation(LeaseTokenSchema)},
    workers.complete: {"post": held_job_operation(JobAnswerSchema)},
    workers.fail: {"post": held_job_operation(JobFailureSchema)},
    workers.list_workers: {"get": admin_operation(job_replies.WorkerListReplySchema)},
}


def allocation_operation(ok: Any, *errors: str, **extra: Any) -> dict[str, Any]:
    """An /allocations operation: the admin credential, a 401 without it, and its own refusals by name."""
    described = operation("allocations", ADMIN, reply(ok), 401, **extra)
    for named in errors:
        status = {"NoRoom": 503, "NoAllocation": 404, "MoveConflict": 409, "MoveRefused": 502}.get(named)
        described["responses"][str(status or named)] = named if status else ERROR_RESPONSES[int(named)][0]
    return described


def query(schema: Any) -> list[dict[str, Any]]:
    """A query string's parameters, from a schema's fields."""
    return [{"in": "query", "schema": schema}]


PLACED = allocation_replies.PlacementReplySchema
OPERATIONS |= {
    allocations.allocate: {
        "post": {
            **allocation_operation(
                PLACED, "400", "413", "NoRoom", requestBody=json_body(allocation_schemas.AllocateSchema)
            ),
            "responses": {
                "200": reply(PLACED, "The key was allocated already: where it is."),
                "201": reply(PLACED, "The key is allocated: the server chosen, its load score, and why."),
                **{code: ERROR_RESPONSES[int(code)][0] for code in ("400", "401", "413")},
                "503": "NoRoom",
            },
        }
    },
    allocations.list_allocations: {
        "get": allocation_operation(
            allocation_replies.AllocationListReplySchema,
            "400",
            parameters=query(allocation_schemas.ListQuerySchema),
        )
    },
    allocations.history: {
        "get": allocation_operation(
            allocation_replies.HistoryReplySchema, "400", parameters=query(allocation_schemas.HistoryQuerySchema)
        )
    },
    allocations.rebalance: {
        "post": {
            **allocation_operation(allocation_replies.RebalanceReplySchema, "400", "413"),
            "requestBody": {
                "required": False,
                "content": {JSON: {"schema": allocation_schemas.RebalanceRequestSchema}},
            },
        }
    },
    allocations.get_allocation: {"get": allocation_operation(allocation_replies.AllocationReplySchema, "NoAllocation")},
    allocations.release_allocation: {
        "delete": allocation_operation(allocation_replies.AllocationReplySchema, "NoAllocation")
    },
    allocations.move_allocation: {
        "post": allocation_operation(
            PLACED,
            "400",
            "413",
            "NoAllocation",
            "MoveConflict",
            "MoveRefused",
            requestBody=json_body(allocation_schemas.MoveRequestSchema),
        )
    },
}


@bp.get("/openapi.json")
def openapi_json() -> Response:
    """This API as OpenAPI 3.1."""
    return current_app.response_class(current_app.extensions["openapi"], mimetype=JSON)


OPERATIONS[openapi_json] = {"get": operation("status", OPEN, reply({"type": "object"}, "This document."))}


def build_spec(app: Flask) -> dict[str, Any]:
    """The OpenAPI document of every route of `app` that OPERATIONS describes."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="GPU Gateway",
        version=app.config["GATEWAY_VERSION"],
        openapi_version="3.1.0",
        plugins=[plugin],
        info={"description": "One stable address in front of a changing fleet of GPU servers."},
    )
    assert plugin.converter is not None  # set by APISpec's init_spec
    plugin.converter.add_attribute_function(field_properties)
    spec.components.schema("Error", schema=replies.ErrorSchema)
    spec.components.schema("AdminRegister", schema=RegisterSchema(exclude=("secret",)))  # the secret goes in a header
    for name, description in [*ERROR_RESPONSES.values(), *OTHER_ERRORS.items()]:
        spec.components.response(name, reply("Error", description))
    for scheme, definition in SECURITY_SCHEMES.items():
        spec.components.security_scheme(scheme, definition)
    for rule in sorted(app.url_map.iter_rules(), key=lambda rule: rule.rule):
        described = OPERATIONS.get(app.view_functions[rule.endpoint], {})
        methods = {method.lower() for method in rule.methods or ()}
        operations = {method: copy.deepcopy(op) for method, op in described.items() if method in methods}
        if not operations:
            continue
        path = RULE_ARGUMENT.sub(r"{\1}", rule.rule)
        summary = (app.view_functions[rule.endpoint].__doc__ or "").strip().splitlines()[0]
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": path_schema(name)} for name in rule.arguments
        ]
        for method, op in operations.items():
            op.setdefault("summary", summary)
            op["operationId"] = re.sub(r"\W+", "_", f"{method}{path}").strip("_")
        spec.path(path=path, operations=operations, parameters=parameters)
    return spec.to_dict()


def path_schema(name: str) -> dict[str, Any]:
    """A path parameter's schema; the proxied `path` may be empty."""
    return {"type": "string"} if name == "path" else {"type": "string", "minLength": 1}


def field_properties(self: Any, field: fields.Field, ret: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """The bounds of the gateway's own field types, and patterns in JSON Schema's regex dialect."""
    found: dict[str, Any] = {}
    if isinstance(field, Port):
        found = {"minimum": 1, "maximum": 65535, "description": f"{WHOLE_NUMBER}, or a string of its digits"}
    elif isinstance(field, Count):
        found = {"minimum": field.low, "maximum": field.high, "description": WHOLE_NUMBER}
    elif isinstance(field, Gigabytes):
        found = {"exclusiveMinimum": 0, "maximum": MAX_MODEL_GB}
    elif isinstance(field, Seconds):
        found = {"minimum": field.low, "maximum": field.high}
    elif isinstance(field, Name):  # its check is in code, not a Regexp validator apispec could read
        found = {"pattern": ecma_pattern(NAME_PATTERN.pattern)}
    elif isinstance(field, fields.Dict):
        if isinstance(field.key_field, Name):
            found["propertyNames"] = {"pattern": ecma_pattern(NAME_PATTERN.pattern)}
        # apispec gives a Length validator's bounds as maxLength, which says nothing of an object
        for bound in ("minLength", "maxLength"):
            if bound in ret:
                found[bound.replace("Length", "Properties")] = ret.pop(bound)
    if "pattern" in ret:
        found["pattern"] = ecma_pattern(ret["pattern"])
    return found


def ecma_pattern(pattern: str) -> str:
    """A whole-string Python pattern in ECMA 262's dialect, which JSON Schema uses: ^ and $ for \\A and \\Z.

    A range of lone surrogates is dropped: a JSON Schema validator's strings cannot hold one, and
    the gateway refuses them itself.
    """
    return pattern.replace(r"\A", "^").replace(r"\Z", "$").replace(r"\ud800-\udfff", "")


def init_app(app: Flask) -> None:
    """Add /openapi.json and build its document; call after every other route is added."""
    app.register_blueprint(bp)
    app.extensions["openapi"] = json.dumps(build_spec(app), ensure_ascii=False)
