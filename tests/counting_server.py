"""The fake GPU server, counting the /api/slow requests it works on at once: caps are checked where they bite."""

from __future__ import annotations

import threading
import time
from urllib.parse import parse_qs, urlsplit

from demo.fake_gpu_server import FakeGPUServer, Handler


class CountingHandler(Handler):
    """Counts /api/slow?delay=S requests in progress, and the most at once."""

    def route(self) -> None:
        parts = urlsplit(self.path)
        if not parts.path.startswith("/api/slow"):
            return super().route()
        delay = float(parse_qs(parts.query).get("delay", ["0.2"])[-1])
        server = self.server
        with server.count_lock:  # type: ignore[attr-defined]
            server.working += 1  # type: ignore[attr-defined]
            server.most_at_once = max(server.most_at_once, server.working)  # type: ignore[attr-defined]
        try:
            time.sleep(delay)
        finally:
            with server.count_lock:  # type: ignore[attr-defined]  # before the answer: the slot is freed after it
                server.working -= 1  # type: ignore[attr-defined]
        return self.send_json(200, {"slow": True})


def counting(server: FakeGPUServer) -> FakeGPUServer:
    """Make a started fake server count its slow requests."""
    server.RequestHandlerClass = CountingHandler
    server.count_lock, server.working, server.most_at_once = threading.Lock(), 0, 0  # type: ignore[attr-defined]
    return server
