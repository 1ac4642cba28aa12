"""The request being proxied: Flask's, or one the proxy's fast path made without Flask's dispatch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import cast

from flask import request as flask_request
from werkzeug.local import LocalProxy
from werkzeug.wrappers import Request

_fast: ContextVar[Request | None] = ContextVar("proxied_request", default=None)


def _current() -> Request:
    fast = _fast.get()
    return fast if fast is not None else cast(Request, flask_request._get_current_object())  # type: ignore[attr-defined]


request: Request = cast(Request, LocalProxy(_current))  # one per thread or greenlet, like flask.request


@contextmanager
def serving(req: Request) -> Iterator[None]:
    """Make `req` the current request while the block runs."""
    token = _fast.set(req)
    try:
        yield
    finally:
        _fast.reset(token)
