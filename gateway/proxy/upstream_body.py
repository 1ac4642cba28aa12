"""A server's answer streamed to the client: chunks as they come, the connection settled on close."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from gateway.proxy.current_request import request
from gateway.proxy.upstream import IncompleteBody, UpstreamResponse

if TYPE_CHECKING:
    from gateway.proxy.exchange import Exchange  # told when the answer breaks off

STREAM_CHUNK = 64 * 1024


class UpstreamBody:
    """The streamed body: yields chunks as they arrive and settles the connection on close."""

    aborted = False  # set when the server broke off the body: the request then counts as failed
    open_ended = False  # no Content-Length: a stream, judged slow by its first byte, not its last

    def __init__(
        self, upstream: UpstreamResponse, first: bytes, has_body: bool, exchange: Exchange, label: str, base_url: str
    ) -> None:
        self.upstream = upstream
        self.first = first
        self.complete = not has_body  # HEAD, 204 and 304 have nothing to read
        self.exchange, self.label, self.base_url = exchange, label, base_url
        self.environ = request.environ  # its client socket is looked up only if the body breaks off

    def __iter__(self) -> Iterator[bytes]:
        sent = len(self.first)
        if self.first:
            yield self.first
        try:
            while chunk := self.upstream.read1(STREAM_CHUNK, decode_content=False):
                yield chunk
                sent += len(chunk)
            if self.upstream.length_remaining:
                raise IncompleteBody(None, f"IncompleteRead: {self.upstream.length_remaining} bytes never came")
        except OSError as exc:
            self.aborted = True
            self.exchange.stream_broke_off(self.label, self.base_url, sent, exc)
            if not self.cut_client():
                raise  # no socket to cut: the WSGI server must see the failure, or it ends the body cleanly
            return
        self.complete = True

    def cut_client(self) -> bool:
        """Shut the client's connection so it sees a cut-off body, without an error for the WSGI server to log."""
        client = client_socket(self.environ)
        if client is None:
            return False
        with contextlib.suppress(OSError):  # the client is gone already: cut all the same
            client.shutdown(socket.SHUT_RDWR)
        return True

    def close(self) -> None:
        """Called by the WSGI server whatever happened: reuse the connection only if drained."""
        if self.complete:
            self.upstream.release_conn()
        else:
            self.upstream.close()


def client_socket(environ: dict[str, Any]) -> socket.socket | None:
    """The client's connection, from gunicorn's environ or werkzeug's; None under a test client."""
    return environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
