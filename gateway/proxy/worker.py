"""gunicorn's gevent worker, with each response's head sent in one write with its first body bytes.

gunicorn writes a response's status line and headers with one `sendall`, then every body chunk
with another; under gevent each `sendall` also asks the socket for its buffer size. A proxied
answer is mostly one small chunk, so that is two writes (and four system calls) where one write
does. `CoalescingResponse` holds the head back until the first body bytes and sends both
together; a write that sends no body bytes, a file sent with sendfile, and the end of the
response all send a held head first, so nothing waits on bytes that never come.
It also formats the Date header once a second instead of for each response.

gateway/gunicorn_conf.py names `gateway.proxy.worker.GeventWorker` as its worker class.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any

from gunicorn.http import wsgi
from gunicorn.workers import ggevent

from gateway.proxy.body_limit import RESPONSE_KEY
from gateway.proxy.upstream import send_all

_date: tuple[int, str] = (-1, "")  # the second last formatted, and its Date header line


def date_line() -> str:
    """`Date: <IMF-fixdate>\\r\\n` for now, formatted once a second."""
    global _date
    now = int(time.time())
    cached = _date  # read once: another thread may replace it meanwhile
    if cached[0] != now:
        cached = _date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n")
    return cached[1]


class CoalescingResponse(wsgi.Response):
    """gunicorn's HTTP/1 response, its head held back to go out with the first body bytes."""

    headers_sent: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: bytes | None = None

    def default_headers(self) -> list[str]:
        """As gunicorn's, with the Date header made once a second."""
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        version = self.req.version
        lines = [
            f"HTTP/{version[0]}.{version[1]} {self.status}\r\n",
            f"Server: {self.version}\r\n",
            date_line(),
            f"Connection: {connection}\r\n",
        ]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        return lines

    def send_headers(self) -> None:
        """Make the head and hold it: the first body bytes (or `flush_head`) take it along."""
        if self.headers_sent:
            return
        lines = self.default_headers()
        lines.extend([f"{name}: {value}\r\n" for name, value in self.headers])
        lines.append("\r\n")
        self._held = "".join(lines).encode("latin-1")
        self.headers_sent = True

    def flush_head(self) -> None:
        """Send a held head now."""
        held, self._held = self._held, None
        if held:
            send_all(self.sock, held)

    def write(self, arg: bytes) -> None:
        super().write(arg)
        if self._held is not None:  # nothing went out (an empty chunk, a body HEAD or 204 may not
            self.flush_head()  # carry, bytes past Content-Length): the head must not wait for more

    def _emit_body(self, data: bytes) -> None:
        held, self._held = self._held, None
        if held is None:
            super()._emit_body(data)
        elif self.chunked:
            send_all(self.sock, b"%s%X\r\n%s\r\n" % (held, len(data), data))
        else:
            send_all(self.sock, held + data)

    def sendfile(self, respiter: Any) -> bool:
        self.send_headers()
        self.flush_head()
        return bool(super().sendfile(respiter))

    def close(self) -> None:
        self.send_headers()
        if self._held is not None and self.chunked:
            held, self._held = self._held, None
            send_all(self.sock, held + b"0\r\n\r\n")  # head and the last chunk of an empty body
            return
        self.flush_head()
        super().close()


def create(*args: Any, **kwargs: Any) -> tuple[wsgi.Response, dict[str, Any]]:
    """gunicorn's `wsgi.create`, with the response in the environ: the app may close the connection."""
    response, environ = _create(*args, **kwargs)
    environ[RESPONSE_KEY] = response
    return response, environ


_create = wsgi.create


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker, answering with CoalescingResponse."""

    def init_process(self) -> None:
        # gunicorn's request handler builds each response through `wsgi.create`, which takes the
        # module's Response class; this worker process uses ours, and puts it in the environ.
        wsgi.Response = CoalescingResponse
        wsgi.create = create
        super().init_process()
