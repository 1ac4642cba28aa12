"""Reading a request body with a size limit that also holds for chunked bodies."""

from __future__ import annotations

from werkzeug.exceptions import RequestEntityTooLarge

from gateway.proxy.current_request import request


def read_body(limit: int) -> bytes:
    """The whole request body (cached for get_json), or 413 when it is over `limit` bytes.

    werkzeug enforces max_content_length on a body without Content-Length (chunked) by
    stopping quietly at the limit, which would hand on a truncated body. Allowing one byte
    more and checking for it tells a body of exactly `limit` bytes from a longer one.
    """
    environ = request.environ
    if environ.get("CONTENT_LENGTH", "0") in ("0", "") and "HTTP_TRANSFER_ENCODING" not in environ:
        return b""  # no body was sent (most GETs): nothing to read, as werkzeug would find
    request.max_content_length = limit + 1
    body = request.get_data(cache=True)
    if len(body) > limit:
        raise RequestEntityTooLarge(f"the request body is over the limit of {limit} bytes")
    return body
