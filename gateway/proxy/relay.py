"""A proxied answer on its way to the client, as a plain WSGI response.

werkzeug's Response builds a Headers object, checks and rewrites headers again when it is
sent, and wraps the body in a ClosingIterator: work a response that only passes a server's
answer on does not need. The proxy's fast path sends a Relay as it is; Flask views turn it
into a werkzeug Response with `to_response`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from flask import Response
from werkzeug.http import HTTP_STATUS_CODES

log = logging.getLogger(__name__)


class Body(Protocol):
    """A streamed body: chunks as they come, and a close that settles the upstream connection."""

    aborted: bool  # the server broke the body off: the request failed, whatever the status said
    open_ended: bool  # no length known ahead: a stream, as an LLM sends its tokens

    def __iter__(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


_STATUS_LINES: dict[int, str] = {}


def status_line(code: int) -> str:
    """`200 OK`, `404 NOT FOUND`: the status as werkzeug writes it, made once per code."""
    line = _STATUS_LINES.get(code)
    if line is None:
        line = f"{code} {HTTP_STATUS_CODES.get(code, 'UNKNOWN').upper()}"
        _STATUS_LINES[code] = line
    return line


class Relay:
    """Status, headers (a list, repeats kept) and body, with callbacks run once when it closes.

    The WSGI server iterates it and then calls `close`, whether the body went out whole, broke
    off, or the client left: the callbacks (the in-flight count, the lease, the request log)
    run in every case, each even when one before it failed.
    """

    __slots__ = ("_callbacks", "_closed", "backend", "body", "headers", "status_code")

    def __init__(self, status_code: int, headers: list[tuple[str, str]], body: bytes | Body, backend: str) -> None:
        self.status_code = status_code
        self.headers = headers
        self.body = body
        self.backend = backend  # the server label users and metrics see
        self._callbacks: list[Callable[[], None]] = []
        self._closed = False

    def call_on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the response closes."""
        self._callbacks.append(callback)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Relay:
        try:
            start_response(status_line(self.status_code), self.headers)
        except BaseException:  # a header the server refuses: no iterator reaches it, so nothing closes it
            self.close()
            raise
        return self

    def __iter__(self) -> Iterator[bytes]:
        body = self.body
        return iter((body,)) if isinstance(body, bytes) else iter(body)

    def close(self) -> None:
        """Close the body, then run the callbacks in order; only the first call does anything."""
        if self._closed:
            return
        self._closed = True
        steps: list[Callable[[], None]] = [] if isinstance(self.body, bytes) else [self.body.close]
        failed: BaseException | None = None
        for step in steps + self._callbacks:
            try:
                step()
            except BaseException as exc:  # the rest still run, a greenlet being killed included:
                if isinstance(exc, Exception):  # a lease must be released whatever happened
                    log.exception("closing the response to the client failed")
                failed = failed or exc
        if failed is not None:
            raise failed

    def to_response(self) -> Response:
        """The same answer as a werkzeug Response, for a Flask view; closing it closes this."""
        body: Iterable[bytes] = [self.body] if isinstance(self.body, bytes) else self
        try:
            response = Response(body, status=self.status_code, headers=self.headers)
        except BaseException:  # a header werkzeug refuses: this answer is never sent
            self.close()
            raise
        if isinstance(self.body, bytes):
            response.call_on_close(self.close)  # werkzeug closes an iterable body itself, not a list
        return response
