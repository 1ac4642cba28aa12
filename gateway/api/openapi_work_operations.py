"""How /openapi.json describes the routes work goes through: the LLM APIs, the proxied prefixes, jobs, pull workers."""

from __future__ import annotations

from typing import Any

from gateway.api import job_replies, jobs, llm, llm_replies, worker_socket, workers
from gateway.api.openapi_components import (
    ERROR_RESPONSES,
    JSON,
    OPEN,
    WORKER,
    RouteOperations,
    admin_operation,
    json_body,
    operation,
    reply,
)
from gateway.api.schemas import JobAnswerSchema, JobFailureSchema, LeaseSchema, LeaseTokenSchema, ModelRequestSchema
from gateway.proxy import views

FORM = "multipart/form-data"
PASSED_THROUGH = {"default": {"description": "the GPU server's answer, passed through as it sent it"}}


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


WORK_OPERATIONS: RouteOperations = {
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
