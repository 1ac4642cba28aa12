"""The LLM-serving routes: OpenAI and Ollama APIs, each request routed by the model it names.

A request goes to a server that has its model (under the server's own name for it, when a
`model_map` says so), streams back chunk by chunk, and fails over before the first byte. One
with an allocated `X-Allocation-Key` goes to that key's server, which must serve the model.
Errors come in the shape the client's API uses, never as a 500.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from gateway.api.llm_fleet import FleetAnswers, FleetQuery, T, loaded_models, version_key, version_of
from gateway.api.llm_request import BadRequest, ModelRequest, parse_body
from gateway.config import Config
from gateway.errors import handle_http_exception
from gateway.fleet.resources import GIB
from gateway.jobs import intake
from gateway.manager import BackendManager, Lease, NoServer, RouteRequest
from gateway.proxy.body_limit import read_body
from gateway.proxy.forwarding import BadTarget, request_target, required_gpu_memory, upstream_headers
from gateway.proxy.handler import SESSION_HEADER, Answer, Body, Proxy
from gateway.proxy.relay import Relay
from gateway.proxy.views import as_response, observe
from gateway.routing.catalog import model_key
from gateway.routing.prefix import PROMPT_PATHS, prefix_hashes

OPENAI_PREFIX = "/v1/"
# Named in /openapi.json; any other POST under /v1/ that names a model is routed the same way.
OPENAI_POSTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/images/generations",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/rerank",
    "/v1/score",
    "/v1/moderations",
)
OLLAMA_POSTS = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show")
STREAM_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}  # nginx in front must not buffer
SERVED_UNDER_V1 = "under /v1/ the gateway serves GET /v1/models, GET /v1/models/{model} and POSTs that name a model"


@dataclass(frozen=True)
class Dialect:
    """How one API (OpenAI or Ollama) shapes its errors."""

    openai: bool

    def error(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        retry_after: str | None = None,
    ) -> Response:
        """An error in this API's shape."""
        if self.openai:
            kind = "invalid_request_error" if status < 500 else "server_error"
            response = jsonify(error={"message": message, "type": kind, "param": param, "code": code})
        else:
            response = jsonify(error=message)
        response.status_code = status
        if retry_after:
            response.headers["Retry-After"] = retry_after
        return response


OPENAI, OLLAMA = Dialect(openai=True), Dialect(openai=False)


def forward_llm(dialect: Dialect) -> Response:
    """Route the current request by its model and stream the answer back; every error in the API's shape."""
    try:
        return route_by_model(dialect)
    except HTTPException as exc:  # a body that broke off or came too slowly, a request that looped (508)
        return dialect.error(exc.code or 400, exc.description or exc.name)


def route_by_model(dialect: Dialect) -> Response:
    """Read the body, find its model, and send it to a server that has the model."""
    config: Config = current_app.config["GATEWAY"]
    try:
        target = llm_target(dialect)
        raw = read_body(config.proxy_max_body_bytes, config.client_body_timeout)
        body = parse_body(raw, request.path, request.content_type or "")
        required = required_gpu_memory()
    except BadRequest as exc:
        return dialect.error(400, str(exc), param=exc.param)
    except (BadTarget, ValueError) as exc:  # a path that climbs out of /v1/; the GPU memory header
        return dialect.error(400, str(exc))
    except RequestEntityTooLarge:  # werkzeug's own message (Content-Length over) would not say the limit
        return dialect.error(413, f"the request body is over the limit of {config.proxy_max_body_bytes} bytes")
    proxy: Proxy = current_app.extensions["proxy"]
    headers = upstream_headers()
    # An allocated X-Allocation-Key goes to its key's server at once, as on the proxy: before the jobs.
    answer = proxy.pinned.forward_allocated(target, body_for(raw, body), headers, model=body.model)
    if answer is None:
        if proxy.jobs is not None and intake.wanted(request.environ):  # a job, run by a server with the model
            job = proxy.as_job(target, headers, raw, model=body.model)
            if job is not None:
                return in_dialect(as_response(job), dialect)
        answer = forward_by_model(proxy, config, dialect, target, headers, raw, body, required)
    # A form does not say whether it asked for a stream, so an answer of no known length counts as one.
    open_ended = isinstance(answer, Relay) and not isinstance(answer.body, bytes) and answer.body.open_ended
    response = as_response(answer)
    if (body.stream or open_ended) and response.status_code < 300:
        response.headers.update(STREAM_HEADERS)
    return in_dialect(response, dialect)


def forward_by_model(
    proxy: Proxy,
    config: Config,
    dialect: Dialect,
    target: str,
    headers: dict[str, str],
    raw: bytes,
    body: ModelRequest,
    required: float | None,
) -> Answer:
    """Send the request to a server the routing picks for its model, session key, memory need and prompt."""
    route = RouteRequest(
        model=body.model,
        session_key=request.headers.get(SESSION_HEADER) or body.user,
        required_bytes=None if required is None else int(required * GIB),
        prefix=prompt_prefix(config, body),
    )
    return proxy.forward_routed(
        route,
        target,
        body_for(raw, body),
        headers,
        lambda exc: no_server(dialect, exc),
        offline=proxy.offline(target, headers, raw, body.model),
    )


def prompt_prefix(config: Config, body: ModelRequest) -> tuple[int, ...]:
    """ROUTING_POLICY=prefix: the hashes of the prompt's first blocks, from the body parsed for its model."""
    if config.routing_policy != "prefix" or body.payload is None or request.path not in PROMPT_PATHS:
        return ()
    return prefix_hashes(body.model, body.payload, config.prefix_block_size, config.prefix_max_blocks)


def llm_target(dialect: Dialect) -> str:
    """The path and query to forward: under /v1/ as sent (any path, so checked); an Ollama route's own path."""
    if dialect.openai:
        return request_target((OPENAI_PREFIX,))
    query = request.environ.get("QUERY_STRING", "")
    return f"{request.path}?{query}" if query else request.path  # the rule's own path: nothing to climb out of


def body_for(raw: bytes, body: ModelRequest) -> Body:
    """The body to send a server: as received, or with the model renamed to the server's own name."""

    def build(lease: Lease) -> bytes:
        if lease.actual_model is None or lease.actual_model == body.model:
            return raw  # byte for byte
        return body.renamed(lease.actual_model)

    return build


def in_dialect(response: Response, dialect: Dialect) -> Response:
    """The gateway's own errors (502 every server failed, 504, ...) reshaped for the client's API."""
    # A server's answers pass untouched: they stream (or are 2xx), while the gateway's own
    # errors are whole JSON bodies in its {"success": false, ...} shape.
    if response.status_code < 400 or response.is_streamed or not response.is_json:
        return response
    document = response.get_json(silent=True)
    if not isinstance(document, dict) or document.get("success") is not False:
        return response
    reshaped = dialect.error(response.status_code, str(document.get("message", "")), code="gateway_error")
    for name, value in response.headers.items():
        if name.lower() not in ("content-type", "content-length"):
            reshaped.headers.add(name, value)
    response.close()  # runs its close callbacks (a lease's release) now: it is never sent
    return reshaped


def no_server(dialect: Dialect, exc: NoServer) -> Response:
    """Why no server took the request, in the client's API shape: 404 or 503, never 500."""
    proxy: Proxy = current_app.extensions["proxy"]
    retry_after = exc.retry_after or (proxy.retry_after if exc.status == 503 else None)
    param = "model" if exc.code.startswith("model_") else None
    return dialect.error(exc.status, exc.message, code=exc.code, param=param, retry_after=retry_after)


def openai_view(subpath: str = "") -> Response:
    """POST under /v1/: routed by the model its JSON body, or its multipart form, names."""
    return as_response(observe(lambda: forward_llm(OPENAI)))


def ollama_view() -> Response:
    """POST /api/generate, /api/chat, /api/embed, /api/embeddings, /api/show."""
    return as_response(observe(lambda: forward_llm(OLLAMA)))


def available_models() -> list[str]:
    """Every model some server can take work for now, by the names clients use, sorted."""
    manager: BackendManager = current_app.extensions["backend_manager"]
    return sorted(manager.model_catalog())


def openai_model(name: str) -> dict[str, Any]:
    """One model in OpenAI's shape."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "gpu-gateway"}


def openai_models_view() -> Response:
    """GET /v1/models: the union over the fleet, in OpenAI's shape."""
    return jsonify(object="list", data=[openai_model(name) for name in available_models()])


def openai_model_view(model_id: str) -> Response:
    """GET /v1/models/<model>: one model of the fleet, in OpenAI's shape; its id may hold '/' and ':'."""
    key = model_key(model_id)
    listed = next((name for name in available_models() if model_key(name) == key), None)
    if listed is None:
        message = f"model {model_id!r} is not served by any server"
        return OPENAI.error(404, message, code="model_not_found", param="model")
    return jsonify(openai_model(listed))


def ollama_tags_view() -> Response:
    """GET /api/tags: the union over the fleet, in Ollama's shape."""
    models = [
        {"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z", "size": 0, "digest": "", "details": {}}
        for name in available_models()
    ]
    return jsonify(models=models)


def ollama_ps_view() -> Response:
    """GET /api/ps: the models loaded on every healthy server, each entry naming its server."""
    found = ask_healthy_servers("/api/ps", loaded_models)
    models = [{**entry, "server": server_id} for server_id, entries in found.answers for entry in entries]
    models.sort(key=lambda entry: (str(entry.get("name") or entry.get("model") or ""), entry["server"]))
    response = jsonify(models=models)
    response.headers.update(found.headers())
    return response


def ollama_version_view() -> Response:
    """GET /api/version: the lowest Ollama version among the healthy servers, which every one of them lives up to."""
    found = ask_healthy_servers("/api/version", version_of)
    versions = [version for _, version in found.answers]
    if versions:
        response = jsonify(version=min(versions, key=version_key))
    else:
        proxy: Proxy = current_app.extensions["proxy"]
        message = "no healthy Ollama server answered GET /api/version"
        response = OLLAMA.error(503, message, retry_after=proxy.retry_after)
    response.headers.update(found.headers())
    return response


def ask_healthy_servers(path: str, read: Callable[[Any], T]) -> FleetAnswers[T]:
    """GET `path` of every healthy server at once, draining ones too: what each answered by the deadline."""
    manager: BackendManager = current_app.extensions["backend_manager"]
    query: FleetQuery = current_app.extensions["llm_fleet"]
    return query.ask([server for server in manager.list_servers() if server.is_healthy], path, read)


def handle_llm_error(exc: HTTPException) -> Response:
    """Flask's own errors (404, 405, 500, ...) under /v1/ and on the Ollama routes, in that API's shape."""
    if request.path == "/v1" or request.path.startswith(OPENAI_PREFIX):
        return openai_error(exc)
    if (request.endpoint or "").startswith("llm_ollama"):
        return OLLAMA.error(exc.code or 500, exc.description or exc.name)
    return handle_http_exception(exc)


def openai_error(exc: HTTPException) -> Response:
    """An error under /v1/; a method refused only by the POST catch-all means a path the gateway does not serve."""
    method, path = request.method, request.path
    named = path in OPENAI_POSTS or path == "/v1/models" or path.startswith("/v1/models/")
    if isinstance(exc, NotFound) or (isinstance(exc, MethodNotAllowed) and not named):
        return OPENAI.error(404, f"{method} {path} is not served: {SERVED_UNDER_V1}")
    if isinstance(exc, MethodNotAllowed):
        allowed = ", ".join(exc.valid_methods or ())
        response = OPENAI.error(405, f"{method} is not allowed on {path}; it takes {allowed}")
        response.headers["Allow"] = allowed
        return response
    return OPENAI.error(exc.code or 500, exc.description or exc.name)


def init_app(app: Flask) -> None:
    """Add the LLM routes when LLM_ROUTES is on; their exact paths win over the /api/ proxy prefix."""
    config: Config = app.config["GATEWAY"]
    if not config.llm_routes:
        return
    # werkzeug ranks static rules above converter rules, so /api/generate beats /api/<anypath:path>.
    # No automatic OPTIONS: a browser's preflight still reaches the server (Ollama answers CORS itself).
    options: dict[str, Any] = {"methods": ["POST"], "provide_automatic_options": False}
    for path in OPENAI_POSTS:
        app.add_url_rule(path, f"llm_openai_{path}", openai_view, **options)
    # Any other POST under /v1/: its raw target is checked and forwarded as sent, so no slashes are merged.
    app.add_url_rule("/v1/<path:subpath>", "llm_openai", openai_view, merge_slashes=False, **options)
    for path in OLLAMA_POSTS:
        app.add_url_rule(path, f"llm_ollama_{path}", ollama_view, **options)
    app.add_url_rule("/v1/models", "llm_openai_models", openai_models_view, methods=["GET"])
    app.add_url_rule("/v1/models/<path:model_id>", "llm_openai_model", openai_model_view, methods=["GET"])
    app.add_url_rule("/api/tags", "llm_ollama_tags", ollama_tags_view, methods=["GET"])
    app.add_url_rule("/api/ps", "llm_ollama_ps", ollama_ps_view, methods=["GET"])
    app.add_url_rule("/api/version", "llm_ollama_version", ollama_version_view, methods=["GET"])
    app.extensions["llm_fleet"] = FleetQuery(config.health_check_timeout)
    # After errors.init_app (app.py): this takes the place of its HTTPException handler, and hands it
    # every request that is not the LLM routes'.
    app.register_error_handler(HTTPException, handle_llm_error)
