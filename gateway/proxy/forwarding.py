"""What crosses the proxy: the request target, headers both ways, and task ids in replies."""

from __future__ import annotations

import json
import secrets
import zlib
from functools import lru_cache
from urllib.parse import unquote

from werkzeug.exceptions import HTTPException
from werkzeug.sansio.utils import get_host

from gateway.proxy.current_request import request
from gateway.proxy.upstream import UpstreamResponse

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Expect: gunicorn has already answered the client's 100-continue, and the body goes up whole.
# The forwarding headers are the gateway's to set, from what it saw (and the proxies it trusts);
# those it does not set are dropped, so that a client cannot pass itself off as another.
FORWARDING = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-real-ip",
        "forwarded",
    }
)
NOT_FORWARDED = HOP_BY_HOP | FORWARDING | {"host", "content-length", "expect", "via"}
# The backend's own X-Backend-Server is dropped: ours names the server, for clients and metrics.
# Content-Length is set by the proxy from the body it actually passes on.
NOT_RETURNED = HOP_BY_HOP | {"x-backend-server", "content-length"}
REQUIRED_MEMORY_HEADER = "X-Required-GPU-Memory-GB"
# This gateway's name in Via (RFC 9110 7.6.3): a request that already carries it has looped.
VIA_NAME = f"gpu-gateway-{secrets.token_hex(4)}"
VIA = f"1.1 {VIA_NAME}"
SESSION_COOKIE = "gateway_session"  # the dashboard's session: the gateway's own, never sent upstream
MAX_DECODINGS = 3  # percent-decodings tried on a segment before it counts as unreadable
JSON_CAPTURE_LIMIT = 1024 * 1024  # a JSON reply up to this size is read whole to find its task_id


class BadTarget(Exception):
    """The request target cannot be forwarded safely."""


class LoopDetected(HTTPException):
    """508: the request came back to this gateway (RFC 5842 7.2), most likely from itself."""

    code = 508
    description = (
        "this request has already passed through this gateway (its Via header names it): "
        "a server registered at the gateway's own address would loop forever"
    )


def request_target(prefixes: tuple[str, ...]) -> str:
    """The raw path and query to forward.

    The raw target is forwarded as the client sent it, so `%2F` or `%3F` inside a segment
    keep their meaning; a target that could climb out of the prefix is refused.
    """
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or request.path
    raw_path = raw.split("?", 1)[0]
    if not raw_path.startswith("/"):
        raise BadTarget("the request target must be a path starting with '/'")
    prefix = next((p for p in prefixes if raw_path.startswith(p) or raw_path == p.rstrip("/")), None)
    if prefix is None:
        raise BadTarget(f"the path must start with one of {', '.join(prefixes)}, unencoded")
    rest = raw_path[len(prefix) :]
    segments = [unquote(segment) for segment in rest.split("/")] if "%" in rest else rest.split("/")
    if "." in rest or "%" in rest:  # without either, no segment can be '.' or '..'
        for segment in segments:
            if climbs(segment):
                raise BadTarget("the path may not contain '.' or '..' segments, encoded or not")
    query = request.environ.get("QUERY_STRING", "")
    return f"{raw_path}?{query}" if query else raw_path


def climbs(segment: str) -> bool:
    """True when a decoded segment is, or holds, '.' or '..' to some backend.

    Backends differ: Java servers drop `;parameters` (`..;/admin`), some decode again
    (`%252e%252e`), Windows ones split at backslashes. A segment still encoded after
    MAX_DECODINGS decodings counts as climbing too.
    """
    for _ in range(MAX_DECODINGS):
        for part in segment.replace("\\", "/").split("/"):
            if part.split(";", 1)[0] in (".", ".."):
                return True
        if "%" not in segment:
            return False
        segment = unquote(segment)
    return "%2" in segment.lower() or "%5c" in segment.lower()


def required_gpu_memory() -> float | None:
    """The GB of GPU memory the request asks for in X-Required-GPU-Memory-GB, if any."""
    raw = request.headers.get(REQUIRED_MEMORY_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1_000_000:  # also refuses nan and inf
        raise ValueError(f"{REQUIRED_MEMORY_HEADER} must be a positive number of GB, not {raw!r}")
    return value


def may_name_task(upstream: UpstreamResponse) -> bool:
    """A successful JSON reply to a request that can carry a body is read whole for its task_id."""
    content_type = upstream.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    is_json = content_type == "application/json" or content_type.endswith("+json")
    return is_json and 200 <= upstream.status < 300 and upstream.status != 204 and request.method != "HEAD"


def find_task_id(payload: bytes) -> str | None:
    """The `task_id` at the top level of a JSON object, or under its `data`."""
    if b"task_id" not in payload and b"\\u" not in payload:
        return None  # the key is not there, not even written with escapes: nothing to parse
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: a reply nested deeper than json can parse
        return None
    for holder in (document, document.get("data") if isinstance(document, dict) else None):
        if isinstance(holder, dict):
            value = holder.get("task_id")
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
                return str(value)
    return None


class TaskRoutes:
    """The paths that name a task (TASK_ROUTES): only these, and `?task_id=`, reach a task's owner.

    A reply's task_id can then claim only the requests that name it as a task, never another
    resource that happens to share the id (`{"task_id": "images"}` and `/api/images/1`).
    """

    def __init__(self, templates: tuple[str, ...]) -> None:
        self.templates = [(parts.index("{task_id}"), parts) for parts in (t.split("/") for t in templates)]

    def candidates(self) -> list[str]:
        """The task ids the current request names: `?task_id=`, then the route's id segment."""
        query = request.environ.get("QUERY_STRING", "")
        named = request.args.get("task_id", "") if "task_id" in query or "%" in query else ""  # else no such key
        found = [named] if named else []
        if self.templates:
            path = request.path.split("/")
            for index, parts in self.templates:
                if len(parts) == len(path) and all(
                    a == b for a, b in zip(parts, path, strict=True) if a != "{task_id}"
                ):
                    found.append(path[index])
        return [task for task in found if task]


def upstream_headers() -> dict[str, str]:
    """End-to-end request headers, plus Via, X-Forwarded-For/-Proto/-Host and X-Real-IP.

    X-Forwarded-For extends the chain only behind trusted proxies (TRUSTED_PROXY_COUNT, when
    ProxyFix has run); otherwise it names the peer alone. The gateway's own cookie stays here.
    Raises LoopDetected for a request that this gateway has forwarded before.
    """
    environ = request.environ
    connection = environ.get("HTTP_CONNECTION")
    dropped = _dropping(NOT_FORWARDED, connection) if connection else NOT_FORWARDED
    headers = {}
    for key, value in environ.items():  # werkzeug's EnvironHeaders, without its per-call cost
        known = _HEADER_NAMES.get(key)
        if known is None:
            known = _header_name(key)
            if len(_HEADER_NAMES) < 4096:
                _HEADER_NAMES[key] = known
        name, lowered = known
        if name and lowered not in dropped and (value or key.startswith("HTTP_")):
            headers[name] = value
    if "Cookie" in headers and SESSION_COOKIE in headers["Cookie"]:
        _drop_session_cookie(headers)
    via = environ.get("HTTP_VIA")
    if via is None:
        headers["Via"] = VIA
    elif VIA_NAME in via:
        raise LoopDetected()
    else:
        headers["Via"] = f"{via}, {VIA}"
    trusted = environ.get("werkzeug.proxy_fix.orig")
    peer = (trusted or environ).get("REMOTE_ADDR") or ""
    prior = environ.get("HTTP_X_FORWARDED_FOR") if trusted is not None else None
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Real-IP"] = environ.get("REMOTE_ADDR") or ""
    scheme = environ["wsgi.url_scheme"]
    headers["X-Forwarded-Proto"] = scheme
    host = environ.get("HTTP_HOST")  # as request.host has it, without its work when the client sent Host
    headers["X-Forwarded-Host"] = get_host(scheme, host) if host is not None else request.host
    return headers


def downstream_headers(upstream: UpstreamResponse) -> list[tuple[str, str]]:
    """End-to-end response headers, each repeated header kept apart (Set-Cookie)."""
    connection = upstream.headers.get("Connection")
    dropped = _dropping(NOT_RETURNED, connection) if connection else NOT_RETURNED
    return [(name, value) for name, value in upstream.headers.iteritems() if name.lower() not in dropped]


def decoded(payload: bytes, encoding: str) -> bytes:
    """A gzip/deflate body inflated for inspection (what is sent stays as it came), else as is."""
    if encoding.strip().lower() not in ("gzip", "x-gzip", "deflate"):
        return payload
    try:
        return zlib.decompressobj(wbits=47).decompress(payload, JSON_CAPTURE_LIMIT)  # 47: gzip or zlib header
    except zlib.error:
        return b""


def _drop_session_cookie(headers: dict[str, str]) -> None:
    """Take the dashboard's session out of a Cookie header; drop the header if nothing is left."""
    kept = [c for c in headers["Cookie"].split(";") if c.split("=", 1)[0].strip() != SESSION_COOKIE]
    if kept:
        headers["Cookie"] = ";".join(kept).strip()
    else:
        del headers["Cookie"]


_HEADER_NAMES: dict[str, tuple[str, str]] = {}  # environ key -> (header name, lower case), or ("", "")


def _header_name(key: str) -> tuple[str, str]:
    """The header an environ key carries: HTTP_X_API_KEY is X-Api-Key; CONTENT_TYPE is Content-Type."""
    if key.startswith("HTTP_") and key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
        name = key[5:].replace("_", "-").title()
    elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        name = key.replace("_", "-").title()
    else:
        return "", ""
    return name, name.lower()


@lru_cache(maxsize=256)  # clients and servers send a handful of Connection values
def _dropping(names: frozenset[str], connection: str) -> frozenset[str]:
    """`names` plus the headers a Connection header lists as hop-by-hop."""
    return names | {token.strip().lower() for token in connection.split(",") if token.strip()}
