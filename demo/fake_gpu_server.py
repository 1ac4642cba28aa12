r"""A small real GPU-server stand-in: /health, image jobs, an echo, and a slow stream.

Run one:  python demo/fake_gpu_server.py --server-id B1 --port 9001 \
              --register-to http://127.0.0.1:5000   (the secret comes from WEBHOOK_SECRET)
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit
from urllib.request import Request, urlopen


class KillableHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server that runs in the background and can die as a killed process does."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        super().__init__(address, handler)
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> Self:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Die as a killed process does: refuse new connections and cut the open ones."""
        self.shutdown()
        self.server_close()
        with self._connections_lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        self.release_waiting()
        if self._thread:
            self._thread.join(timeout=5)

    def release_waiting(self) -> None:
        """Let handlers held at a gate finish, so none outlives the server."""


class FakeGPUServer(KillableHTTPServer):
    """A threaded HTTP server that plays one GPU server of the fleet."""

    def __init__(self, server_id: str, host: str = "127.0.0.1", port: int = 0, keep_keys: bool = False) -> None:
        super().__init__((host, port), Handler)
        self.server_id = server_id
        self.healthy = True
        self.tasks: dict[str, float] = {}
        self.requests: list[dict[str, Any]] = []
        self.stream_gate = threading.Event()  # a gated stream waits here after its first chunk
        self.aborted_streams = 0
        # With keep_keys, an Idempotency-Key seen before gets the first answer again, without the work
        # being done twice (a repeat that comes while the first still runs waits for it), as seed 004's
        # GPU side drops a repeated request_id. `runs` counts the work done per key.
        self.keep_keys = keep_keys
        self.answers: dict[str, tuple[threading.Event, list[bytes]]] = {}
        self.runs: dict[str, int] = {}
        self.keys_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: FakeGPUServer
    protocol_version = "HTTP/1.1"
    # A real server's answers leave at once: with Nagle's algorithm on, a second write on a
    # kept-alive connection waits for the client's delayed ACK (about 40 ms on Linux).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        if os.environ.get("FAKE_GPU_VERBOSE"):
            super().log_message(format, *args)

    def do_GET(self) -> None:
        key = self.headers.get("Idempotency-Key")
        if key is None or not self.server.keep_keys:
            return self.route()
        with self.server.keys_lock:
            first = key not in self.server.answers
            if first:
                self.server.answers[key] = (threading.Event(), [])
            done, answer = self.server.answers[key]
        if not first:  # a repeat: the first answer, once it is there; the body is read and dropped
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            done.wait(60)
            self.wfile.write(b"".join(answer))
            return None
        sent, self.wfile = self.wfile, io.BytesIO()
        try:
            self.route()
        finally:
            written, self.wfile = self.wfile.getvalue(), sent
            answer.append(written)
            with self.server.keys_lock:
                self.server.runs[key] = self.server.runs.get(key, 0) + 1
            done.set()
        with contextlib.suppress(OSError):  # the caller may be gone (a gateway killed meanwhile)
            self.wfile.write(written)
        return None

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def route(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        segments = [s for s in parts.path.split("/") if s]
        self.server.requests.append({"method": self.command, "path": parts.path, "query": query})
        if parts.path == "/health":
            status = 200 if self.server.healthy else 503
            return self.send_json(status, {"status": "healthy" if status == 200 else "unhealthy"})
        if parts.path == "/_control/health" and self.command == "POST":
            self.server.healthy = bool(json.loads(body or b"{}").get("healthy", True))
            return self.send_json(200, {"healthy": self.server.healthy})
        if segments[:2] == ["api", "enhance"] and self.command == "POST":
            task_id = query.get("force_task_id") or uuid.uuid4().hex
            self.server.tasks[task_id] = time.time()
            nested = query.get("nested") == "1"
            reply = {"success": True, "data": {"task_id": task_id}} if nested else {"success": True, "task_id": task_id}
            if query.get("gzip") == "1":
                data = gzip.compress(json.dumps({"server_id": self.server.server_id, **reply}).encode())
                return self.send_bytes(200, data, "application/json", [("Content-Encoding", "gzip")])
            return self.send_json(200, reply)
        if segments[:2] in (["api", "stall-json"], ["api", "short-json"]):
            return self.send_partial_json(stall=segments[1] == "stall-json", delay=float(query.get("delay", "2")))
        if segments[:2] in (["api", "status"], ["api", "download"]) or segments[:2] == ["api", "task"]:
            task_id = segments[2] if len(segments) > 2 else query.get("task_id", "")
            if task_id not in self.server.tasks:
                return self.send_json(404, {"success": False, "message": f"unknown task {task_id}"})
            if segments[1] == "download":
                return self.send_bytes(200, f"image-bytes-of-{task_id}".encode(), "image/png")
            return self.send_json(200, {"task_id": task_id, "status": "completed"})
        if segments[:2] == ["api", "stream"]:
            gated = query.get("gated") == "1"
            return self.send_stream(int(query.get("n", "5")), float(query.get("delay", "0.2")), gated)
        if segments[:2] == ["api", "chunked-json"]:  # a JSON reply framed in chunks, naming a new task
            task_id = uuid.uuid4().hex
            self.server.tasks[task_id] = time.time()
            lying = query.get("lying_length") == "1"  # also a Content-Length that chunking overrides
            return self.send_chunked_json({"server_id": self.server.server_id, "task_id": task_id}, lying)
        if segments[:2] == ["api", "interim"]:  # 100 Continue and 103 Early Hints before the answer
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
            return self.send_json(200, {"after": "interim"})
        if segments[:2] == ["api", "bad-header"]:  # a header no client may be sent
            header = ("X-Split", "one\rtwo") if query.get("kind") == "cr" else ("Bad Name", "x")
            return self.send_json(200, {}, extra_headers=[header])
        if segments[:2] == ["api", "deep-json"]:  # nested deeper than Python's json can parse
            return self.send_bytes(200, b"[" * 100_000 + b"]" * 100_000, "application/json")
        if segments[:2] == ["api", "spoof"]:  # a backend that names itself in our header
            return self.send_json(200, {}, extra_headers=[("X-Backend-Server", "evil-000001")])
        if segments[:2] == ["api", "echo-bytes"]:
            return self.send_bytes(200, body, "application/octet-stream")
        if segments[:2] == ["api", "slow"]:
            time.sleep(float(query.get("delay", "2")))
        if segments[:2] == ["api", "status-code"]:
            return self.send_json(int(query.get("code", "500")), {"code": query.get("code")})
        self.send_json(
            200,
            {
                "method": self.command,
                "path": parts.path,
                "query": parts.query,
                "headers": dict(self.headers.items()),
                "body": body.decode("utf-8", "replace"),
            },
            extra_headers=[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Custom", "kept")],
        )

    def send_json(self, status: int, payload: dict[str, Any], extra_headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        payload = {"server_id": self.server.server_id, **payload}
        self.send_bytes(status, json.dumps(payload).encode(), "application/json", extra_headers)

    def send_bytes(self, status: int, data: bytes, content_type: str, extra_headers: Any = ()) -> None:
        """The head and the body in one write (end_headers alone would send the head by itself)."""
        head = io.BytesIO()
        self.wfile, wfile = head, self.wfile
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if status != 204:  # RFC 9110: a 204 has no body and no Content-Length
                self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Served-By", self.server.server_id)
            for name, value in extra_headers:
                self.send_header(name, value)
            self.end_headers()
        finally:
            self.wfile = wfile
        body = data if self.command != "HEAD" and status not in (204, 304) else b""
        self.wfile.write(head.getvalue() + body)

    def send_chunked_json(self, payload: dict[str, Any], lying_length: bool = False) -> None:
        """The JSON document in two chunks, with no Content-Length (or a wrong one, which chunking overrides)."""
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if lying_length:
            self.send_header("Content-Length", str(len(data) + 500))
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        half = len(data) // 2
        for part in (data[:half], data[half:], b""):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))

    def send_partial_json(self, stall: bool, delay: float) -> None:
        """Promise 100 bytes of JSON, send 10, then stall or hang up."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "100")
        self.end_headers()
        self.wfile.write(b'{"task_id"')
        self.wfile.flush()
        if stall:
            time.sleep(delay)
        self.close_connection = True

    def send_stream(self, count: int, delay: float, gated: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(count):
                line = f"data: {self.server.server_id} chunk {i} at {time.time():.6f}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                if gated and i == 0:
                    self.server.stream_gate.wait(timeout=30)
                time.sleep(delay)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.server.aborted_streams += 1
            self.close_connection = True


def register(gateway: str, body: dict[str, Any]) -> dict[str, Any]:
    """Call the gateway's register webhook, as a GPU server does at startup."""
    data = json.dumps(body).encode()
    request = Request(gateway.rstrip("/") + "/webhook/register", data, {"Content-Type": "application/json"})
    with urlopen(request, timeout=10) as response:
        return json.load(response)


def register_and_serve(server: KillableHTTPServer, gateway: str | None, body: dict[str, Any]) -> None:
    """Register (retrying for 30 s while the gateway starts), then serve until interrupted."""
    if gateway:
        body = {**body, "secret": os.environ["WEBHOOK_SECRET"]}
        for attempt in range(30):
            try:
                print(register(gateway, body), flush=True)
                break
            except OSError as exc:
                print(f"register attempt {attempt + 1} failed: {exc}; retrying", flush=True)
                time.sleep(1)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


def require_secret(parser: argparse.ArgumentParser, gateway: str | None) -> None:
    """A usage error (exit status 2) for --register-to without WEBHOOK_SECRET."""
    if gateway and not os.environ.get("WEBHOOK_SECRET"):
        parser.error(
            "--register-to needs the gateway's webhook secret in WEBHOOK_SECRET; for the one make run "
            "generated: export WEBHOOK_SECRET=$(cat .webhook_secret)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-id", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--register-to", metavar="GATEWAY_URL")
    args = parser.parse_args()
    require_secret(parser, args.register_to)
    server = FakeGPUServer(args.server_id, args.host, args.port)
    print(f"fake GPU server {args.server_id} on http://{args.host}:{server.port}", flush=True)
    register_and_serve(server, args.register_to, {"server_id": args.server_id, "ip": args.host, "port": server.port})


if __name__ == "__main__":
    main()
