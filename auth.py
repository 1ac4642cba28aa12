"""The preset secret: where a caller may present it, and a constant-time check."""

from __future__ import annotations

import hmac
from typing import Any

from flask import current_app, request


def presented_secret(body: Any = None, allow_query: bool = False) -> str | None:
    """The secret from the X-Webhook-Secret header, a Bearer token, the body, or `?secret=`."""
    header = request.headers.get("X-Webhook-Secret")
    if header:
        return header
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if isinstance(body, dict) and isinstance(body.get("secret"), str):
        return body["secret"]
    if allow_query:
        return request.args.get("secret")
    return None


def secret_matches(presented: str | None) -> bool:
    """Compare with the configured secret in constant time."""
    expected = current_app.config["GATEWAY"].webhook_secret
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())
