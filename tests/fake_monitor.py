"""A resource monitor stand-in on 127.0.0.1: GET /resources answers the document a test gives it, and counts reads."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GIB = 1024**3


def gpu_report(total_gib: float, used_gib: float) -> dict[str, Any]:
    """A gpu host's /resources with one GPU of `total_gib`, `used_gib` of it in use (threshold 90%)."""
    gpu = {"index": 0, "memory_total": int(total_gib * GIB), "memory_used": int(used_gib * GIB)}
    gpu["memory_free"] = gpu["memory_total"] - gpu["memory_used"]
    return {
        "device_type": "gpu",
        "cpu": {"percent": 10.0},
        "memory": {"total": 64 * GIB, "available": 32 * GIB, "percent": 50.0},
        "disk": {"percent": 20.0},
        "gpus": [gpu],
    }


class FakeMonitor(ThreadingHTTPServer):
    """Serves `document` at /resources; `reads` counts the GETs of it; with `gate`, each waits for it first."""

    daemon_threads = True

    def __init__(self, document: dict[str, Any]) -> None:
        super().__init__(("127.0.0.1", 0), MonitorHandler)
        self.document = document
        self.reads = 0
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count_read(self) -> None:
        with self._lock:
            self.reads += 1

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class MonitorHandler(BaseHTTPRequestHandler):
    server: FakeMonitor
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/resources":
            if self.server.gate is not None:
                self.server.gate.wait(timeout=10)
            self.server.count_read()
            body, status = json.dumps(self.server.document).encode(), 200
        else:
            body, status = b'{"status": "ok"}', 200 if self.path == "/health" else 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
