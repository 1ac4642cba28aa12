"""One error shape for the whole gateway: {"success": false, "message": ..., "errors": ...}."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from gateway.cluster.connection import RedisUnavailable


def error_response(status: int, message: str, errors: Any = None, headers: dict[str, str] | None = None) -> Response:
    """A JSON error reply."""
    response = jsonify(success=False, message=message, errors=errors)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def handle_http_exception(exc: HTTPException) -> Response:
    """Turn Flask's and werkzeug's HTTP errors into the JSON shape."""
    response = error_response(exc.code or 500, exc.description or exc.name)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def handle_validation_error(exc: ValidationError) -> Response:
    """A body that failed its schema: 400 with each field's messages."""
    fields = sorted(exc.messages) if isinstance(exc.messages, dict) else []
    message = f"invalid fields: {', '.join(fields)}" if fields else "invalid request body"
    return error_response(400, message, exc.messages)


def handle_redis_unavailable(exc: RedisUnavailable) -> Response:
    """Redis did not answer a change: 503 with Retry-After; nothing was changed, so the client tries again."""
    message = "the shared state (Redis) is unreachable; nothing was changed: try again"
    return error_response(503, message, {"redis": str(exc)}, {"Retry-After": exc.retry_after})


def init_app(app: Flask) -> None:
    """Register the error handlers."""
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(ValidationError, handle_validation_error)
    app.register_error_handler(RedisUnavailable, handle_redis_unavailable)
