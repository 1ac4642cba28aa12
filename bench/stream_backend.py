"""A stand-in LLM server for the streaming figures: slow token streams, and streams held open.

One asyncio process, so it holds thousands of open streams without a thread each.
  GET /health                      200 {"status":"ok"}
  GET|POST /api/stream?first=&chunks=&delay=
                                   text/event-stream: waits `first` s (the prompt), then sends
                                   `chunks` events `delay` s apart ("data: tok0", "data: tok1", ...)
  GET|POST /api/hold               sends "data: held" at once, then waits for /control/release
                                   (or --max-hold seconds) and ends with "data: done"
  POST /control/release            ends every held stream; answers {"released": n}
  GET /control/held                {"held": n}, the streams held open now

Run:  .venv/bin/python bench/stream_backend.py --port 8200 [--max-hold 120]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from typing import Any
from urllib.parse import parse_qs, urlsplit

HOST = "127.0.0.1"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024


def chunk(text: str) -> bytes:
    """One HTTP chunk holding one server-sent event."""
    data = f"data: {text}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


class StreamBackend:
    """The request handler and the state shared by its connections."""

    def __init__(self, max_hold_s: float) -> None:
        self.max_hold_s = max_hold_s
        self.release = asyncio.Event()
        self.held = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one kept-alive connection until the client closes it."""
        try:
            while True:
                method, target, headers = await read_head(reader)
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                await self.answer(method, target, writer)
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def answer(self, method: str, target: str, writer: asyncio.StreamWriter) -> None:
        """Route one request."""
        parts = urlsplit(target)
        if parts.path == "/health":
            await send_json(writer, 200, {"status": "ok"})
        elif parts.path == "/control/held":
            await send_json(writer, 200, {"held": self.held})
        elif parts.path == "/control/release" and method == "POST":
            released = self.held
            self.release.set()
            self.release = asyncio.Event()  # streams opened from now on wait for the next release
            await send_json(writer, 200, {"released": released})
        elif parts.path.startswith("/api/hold"):
            await self.hold(writer)
        elif parts.path.startswith("/api/stream"):
            query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
            await self.stream(writer, float(query.get("first", 0.1)), int(query.get("chunks", 10)), query)
        else:
            await send_json(writer, 404, {"error": f"no route {method} {parts.path}"})

    async def stream(self, writer: asyncio.StreamWriter, first_s: float, chunks: int, query: dict[str, str]) -> None:
        """Headers at once, the first token after `first_s`, the rest `delay` apart."""
        delay_s = float(query.get("delay", 0.05))
        writer.write(STREAM_HEAD)
        await writer.drain()
        await asyncio.sleep(first_s)
        for number in range(chunks):
            if number:
                await asyncio.sleep(delay_s)
            writer.write(chunk(f"tok{number}"))
            await writer.drain()
        writer.write(LAST_CHUNK)
        await writer.drain()

    async def hold(self, writer: asyncio.StreamWriter) -> None:
        """One event now, then wait for the release (or the longest hold) and end the stream."""
        release = self.release
        writer.write(STREAM_HEAD + chunk("held"))
        self.held += 1
        try:
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), timeout=self.max_hold_s)
        finally:
            self.held -= 1
        writer.write(chunk("done") + LAST_CHUNK)
        await writer.drain()


async def read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """The request line and headers (names lower-cased)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    if len(raw) > MAX_HEAD_BYTES:
        raise ValueError("request head too large")
    lines = raw.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def send_json(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any]) -> None:
    """A small JSON answer with Content-Length, keeping the connection."""
    body = json.dumps(payload).encode()
    reason = {200: "OK", 404: "Not Found"}.get(status, "Status")
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()


async def main_async(port: int, max_hold_s: float) -> None:
    backend = StreamBackend(max_hold_s)
    server = await asyncio.start_server(backend.serve, HOST, port, backlog=4096, limit=MAX_HEAD_BYTES)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"stream backend on http://{HOST}:{port}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-hold", type=float, default=120.0, help="longest a held stream waits, s (120)")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.port, args.max_hold))


if __name__ == "__main__":
    main()
