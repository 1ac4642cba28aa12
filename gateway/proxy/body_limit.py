"""Reading a request body: within a size limit and a deadline, whole and well framed, or a 4xx."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from gunicorn.http.errors import ParseException
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, RequestTimeout

from gateway.proxy.current_request import request

RESPONSE_KEY = "gateway.response"  # gunicorn's response, put in the environ by gateway/proxy/worker.py
BODY_SECONDS = "gateway.body_seconds"  # the environ key: how long the client took to send its body


class BodyTimeout(Exception):
    """The body did not arrive in time."""


def read_body(limit: int, deadline: float | None = None) -> bytes:
    """The whole request body (cached for get_json); 413 over `limit` bytes, 408 after `deadline` s.

    werkzeug enforces max_content_length on a body without Content-Length (chunked) by
    stopping quietly at the limit, which would hand on a truncated body. Allowing one byte
    more and checking for it tells a body of exactly `limit` bytes from a longer one. A body
    shorter than its Content-Length (the client hung up), or badly chunked, is a 400 and is
    never forwarded; the connection then closes, since what follows on it cannot be read.
    """
    environ = request.environ
    declared = environ.get("CONTENT_LENGTH", "")
    if declared in ("0", "") and "HTTP_TRANSFER_ENCODING" not in environ:
        return b""  # no body was sent (most GETs): nothing to read, as werkzeug would find
    request.max_content_length = limit + 1
    started = time.perf_counter()
    try:
        with _deadline(deadline):
            body = request.get_data(cache=True)
    except ParseException as exc:  # gunicorn's chunked-body parser refused it
        raise _refused(BadRequest(f"the request body is badly framed: {exc}")) from None
    except OSError as exc:
        raise _refused(BadRequest(f"the request body broke off: {exc.strerror or exc}")) from None
    except BodyTimeout:
        raise _refused(RequestTimeout(f"the request body did not all arrive within {deadline:g}s")) from None
    finally:  # the client's time, not the gateway's (Server-Timing tells them apart)
        environ[BODY_SECONDS] = time.perf_counter() - started
    if len(body) > limit:
        raise RequestEntityTooLarge(f"the request body is over the limit of {limit} bytes")
    if declared.isdigit() and len(body) < int(declared):
        raise _refused(BadRequest(f"the request body ended after {len(body)} of its {declared} bytes"))
    return body


def _refused(exc: BadRequest | RequestTimeout) -> BadRequest | RequestTimeout:
    """`exc`, with the connection set to close after its answer."""
    response = request.environ.get(RESPONSE_KEY)
    if response is not None:
        response.force_close()
    return exc


@contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Under gevent (gunicorn's worker), raise BodyTimeout after `seconds`; elsewhere, no limit."""
    monkey = sys.modules.get("gevent.monkey")
    if seconds is None or monkey is None or not monkey.is_module_patched("socket"):
        yield
        return
    import gevent

    with gevent.Timeout(seconds, BodyTimeout):
        yield
