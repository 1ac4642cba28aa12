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
    if allow_query and b"secret=" in request.query_string:  # literal, so log redaction always matches it
        return request.args.get("secret")
    return None


def secret_matches(presented: str | None) -> bool:
    """Compare with the configured secret in constant time."""
    expected = current_app.config["GATEWAY"].webhook_secret
    if presented is None:
        return False
    # surrogatepass: a JSON body may carry lone surrogates ("\ud800"); they must fail, not crash.
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode())
