"""A cap on the requests one client address has in progress at once (CLIENT_MAX_CONNECTIONS)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gateway.proxy.body_limit import RESPONSE_KEY

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]


class ClientLimit:
    """WSGI middleware: a client at its cap gets 429 at once, before its body is read.

    It sits inside ProxyFix, so behind trusted proxies the address counted is the client's,
    not the proxy's. A request counts from its head until its answer is closed (a stream
    counts while it streams), which is how long it holds a connection of the gateway's.
    """

    def __init__(self, wsgi_app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]], limit: int) -> None:
        self.wsgi_app = wsgi_app
        self.limit = limit
        self.active: dict[str, int] = {}  # address -> requests in progress; an entry goes at zero
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        address = environ.get("REMOTE_ADDR") or ""
        with self._lock:
            count = self.active.get(address, 0)
            if count >= self.limit:
                return self.refuse(address, environ, start_response)
            self.active[address] = count + 1
        try:
            answer = self.wsgi_app(environ, start_response)
        except BaseException:
            self.release(address)
            raise
        return Counted(answer, self, address)

    def release(self, address: str) -> None:
        """One request of `address` is over."""
        with self._lock:
            count = self.active.get(address, 0) - 1
            if count > 0:
                self.active[address] = count
            else:
                self.active.pop(address, None)

    def refuse(self, address: str, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        """429, and the connection closed after it: its body is never read."""
        response = environ.get(RESPONSE_KEY)
        if response is not None:
            response.force_close()
        log.warning("client %s is at its %d requests in progress: refused one more", address, self.limit)
        message = f"this client already has {self.limit} requests in progress (CLIENT_MAX_CONNECTIONS)"
        body = json.dumps({"success": False, "message": message, "errors": None}).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Retry-After", "1")]
        start_response("429 TOO MANY REQUESTS", headers)
        return [body]


class Counted:
    """An answer that gives its client's count back when the server closes it, on every path."""

    __slots__ = ("address", "answer", "limit")

    def __init__(self, answer: Iterable[bytes], limit: ClientLimit, address: str) -> None:
        self.answer = answer
        self.limit = limit
        self.address = address

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.answer)

    def close(self) -> None:
        try:
            close = getattr(self.answer, "close", None)
            if close is not None:
                close()
        finally:
            self.limit.release(self.address)
