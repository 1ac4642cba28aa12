"""The LLM-serving routes: OpenAI and Ollama APIs, each request routed by the model it names.

A request goes to a server that has its model (under the server's own name for it, when a
`model_map` says so), streams back chunk by chunk, and fails over before the first byte.
Errors come in the shape the client's API uses, never as a 500.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from gateway.config import Config
from gateway.fleet.resources import GIB
from gateway.manager import BackendManager, Lease, NoServer, RouteRequest
from gateway.proxy.body_limit import read_body
from gateway.proxy.forwarding import required_gpu_memory, upstream_headers
from gateway.proxy.handler import SESSION_HEADER, Proxy
from gateway.proxy.views import as_response, observe

OPENAI_POSTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
OLLAMA_POSTS = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show")
OLLAMA_STREAMS_BY_DEFAULT = frozenset({"/api/generate", "/api/chat"})  # Ollama's rule: unless "stream": false
NAME_ALSO_NAMES_MODEL = frozenset({"/api/show"})  # older Ollama clients send {"name": ...}, as Ollama accepts
STREAM_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}  # nginx in front must not buffer


class BadRequest(ValueError):
    """The request cannot be routed; the message names the problem (and `param` the field)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class LLMRequest:
    """What the gateway reads from an LLM request: enough to route it, nothing more."""

    model: str
    field: str  # the body's key that names the model: "model", or "name" in an older /api/show
    stream: bool
    session_key: str | None


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


def parse_request(raw: bytes, path: str, openai: bool) -> tuple[dict[str, Any], LLMRequest]:
    """The JSON body and what routing needs from it; BadRequest naming what is wrong."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than json parses
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(payload).__name__}")
    field = "name" if "model" not in payload and "name" in payload and path in NAME_ALSO_NAMES_MODEL else "model"
    model = payload.get(field)
    if model is None:
        raise BadRequest("the request body must name a 'model'", param="model")
    if not isinstance(model, str):
        raise BadRequest(f"'{field}' must be a string, not {type(model).__name__}", param=field)
    if not model:
        raise BadRequest(f"'{field}' must not be empty", param=field)
    stream = payload.get("stream")
    streams = stream is True if openai or path not in OLLAMA_STREAMS_BY_DEFAULT else stream is not False
    return payload, LLMRequest(model, field, streams, session_key(payload, openai))


def session_key(payload: dict[str, Any], openai: bool) -> str | None:
    """X-Session-Key, else (OpenAI) the body's `user`: one conversation stays on one server."""
    key = request.headers.get(SESSION_HEADER)
    if key:
        return key
    user = payload.get("user") if openai else None
    return user if isinstance(user, str) and user else None


def body_for(raw: bytes, payload: dict[str, Any], llm: LLMRequest) -> Callable[[Lease], bytes]:
    """The body to send a server: as received, or with the model renamed to the server's own name."""

    def build(lease: Lease) -> bytes:
        if lease.actual_model is None or lease.actual_model == llm.model:
            return raw  # byte for byte
        renamed = {**payload, llm.field: lease.actual_model}
        try:
            return json.dumps(renamed, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the client's JSON) has no UTF-8
            return json.dumps(renamed, separators=(",", ":")).encode()  # so it stays escaped, as sent

    return build


def forward_llm(dialect: Dialect) -> Response:
    """Route the current request by its model and stream the answer back."""
    config: Config = current_app.config["GATEWAY"]
    try:
        raw = read_body(config.proxy_max_body_bytes, config.client_body_timeout)
        payload, llm = parse_request(raw, request.path, dialect.openai)
        required = required_gpu_memory()
    except BadRequest as exc:
        return dialect.error(400, str(exc), param=exc.param)
    except ValueError as exc:  # the GPU memory header
        return dialect.error(400, str(exc))
    except RequestEntityTooLarge:  # werkzeug's own message (Content-Length over) would not say the limit
        return dialect.error(413, f"the request body is over the limit of {config.proxy_max_body_bytes} bytes")
    except HTTPException as exc:  # a client that hung up mid-body, say
        return dialect.error(exc.code or 400, exc.description or exc.name)
    proxy: Proxy = current_app.extensions["proxy"]
    route = RouteRequest(
        model=llm.model,
        session_key=llm.session_key,
        required_bytes=None if required is None else int(required * GIB),
    )
    query = request.environ.get("QUERY_STRING", "")
    target = f"{request.path}?{query}" if query else request.path  # the rule's own path: nothing to climb out of
    response = as_response(
        proxy.forward_routed(
            route, target, body_for(raw, payload, llm), upstream_headers(), lambda exc: no_server(dialect, exc)
        )
    )
    if llm.stream and response.status_code < 300:
        response.headers.update(STREAM_HEADERS)
    return in_dialect(response, dialect)


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


def openai_view() -> Response:
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings."""
    return as_response(observe(lambda: forward_llm(OPENAI)))


def ollama_view() -> Response:
    """POST /api/generate, /api/chat, /api/embed, /api/embeddings, /api/show."""
    return as_response(observe(lambda: forward_llm(OLLAMA)))


def available_models() -> list[str]:
    """Every model some server can take work for now, by the names clients use, sorted."""
    manager: BackendManager = current_app.extensions["backend_manager"]
    return sorted(manager.model_catalog())


def openai_models_view() -> Response:
    """GET /v1/models: the union over the fleet, in OpenAI's shape."""
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "gpu-gateway"} for name in available_models()]
    return jsonify(object="list", data=data)


def ollama_tags_view() -> Response:
    """GET /api/tags: the union over the fleet, in Ollama's shape."""
    models = [
        {"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z", "size": 0, "digest": "", "details": {}}
        for name in available_models()
    ]
    return jsonify(models=models)


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
    for path in OLLAMA_POSTS:
        app.add_url_rule(path, f"llm_ollama_{path}", ollama_view, **options)
    app.add_url_rule("/v1/models", "llm_openai_models", openai_models_view, methods=["GET"])
    app.add_url_rule("/api/tags", "llm_ollama_tags", ollama_tags_view, methods=["GET"])
