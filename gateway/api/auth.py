"""The preset secret, the admin, worker and server tokens: where a caller may present each; constant-time checks."""

from __future__ import annotations

import hmac
from typing import Any

from flask import Response, current_app, request

from gateway.errors import error_response


def presented_secret(body: Any = None, allow_query: bool = False) -> str | None:
    """The secret from the X-Webhook-Secret header, a Bearer token, the body, or `?secret=`."""
    header = request.headers.get("X-Webhook-Secret")
    if header:
        return header
    token = presented_bearer()
    if token is not None:
        return token
    if isinstance(body, dict) and isinstance(body.get("secret"), str):
        return body["secret"]
    if allow_query and b"secret=" in request.query_string:  # literal, so log redaction always matches it
        return request.args.get("secret")
    return None


def presented_server_token(body: Any = None) -> str | None:
    """A server's own token (REGISTRATION_BINDING=token), from the X-Server-Token header or the body."""
    header = request.headers.get("X-Server-Token")
    if header:
        return header
    if isinstance(body, dict) and isinstance(body.get("server_token"), str):
        return body["server_token"]
    return None


def presented_bearer() -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def secret_matches(presented: str | None) -> bool:
    """Compare with the configured webhook secret in constant time."""
    return _equal(presented, current_app.config["GATEWAY"].webhook_secret)


def admin_matches(presented: str | None) -> bool:
    """Compare with the admin credential (ADMIN_TOKEN, or the webhook secret while it is unset)."""
    config = current_app.config["GATEWAY"]
    return _equal(presented, config.admin_token or config.webhook_secret)


def admin_authorized() -> bool:
    """Whether the request carries the admin credential in a header (never the body or the URL).

    With ADMIN_TOKEN set, only `Authorization: Bearer <ADMIN_TOKEN>` counts: every GPU server
    holds the webhook secret, and holding it must not make one an operator. Without it, the
    webhook secret opens the admin endpoints as before, in X-Webhook-Secret or as a Bearer token.
    """
    if current_app.config["GATEWAY"].admin_token:
        return admin_matches(presented_bearer())
    return admin_matches(presented_secret())


def admin_refusal() -> Response:
    """The 401 reply to a missing or wrong admin credential, saying where to send it."""
    if current_app.config["GATEWAY"].admin_token:
        return error_response(401, "missing or invalid admin token (send it as Authorization: Bearer <ADMIN_TOKEN>)")
    return error_response(401, "missing or invalid secret (send it in X-Webhook-Secret or as a Bearer token)")


def worker_authorized() -> bool:
    """Whether the request carries the pull workers' credential as a Bearer token.

    That is WORKER_TOKEN; while it is unset, the webhook secret, which a GPU host holds already.
    """
    config = current_app.config["GATEWAY"]
    return _equal(presented_bearer(), config.worker_token or config.webhook_secret)


def worker_refusal() -> Response:
    """The 401 reply to a missing or wrong worker credential, saying where to send it."""
    if current_app.config["GATEWAY"].worker_token:
        return error_response(401, "missing or invalid worker token (send it as Authorization: Bearer <WORKER_TOKEN>)")
    return error_response(
        401, "missing or invalid worker credential (send the webhook secret as Authorization: Bearer <WEBHOOK_SECRET>)"
    )


def _equal(presented: str | None, expected: str) -> bool:
    if presented is None or not expected:
        return False
    # surrogatepass: a JSON body may carry lone surrogates ("\ud800"); they must fail, not crash.
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode())
