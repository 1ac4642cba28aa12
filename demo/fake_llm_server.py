r"""A small real LLM-server stand-in speaking the Ollama and OpenAI APIs, streams included.

Every answer names the server and the model it received, so a test (or you) can see where a
request went and which model name reached the server. A generation's prompt goes through a
simulated KV prefix cache (demo/prompt_cache.py): its answer says in X-Cache-Hit-Blocks how many
leading blocks were cached, GET /_stats counts them, and --cold-ms-per-block makes a box slower
for each block it had not seen. Run a fake Ollama box:

    python demo/fake_llm_server.py --server-id B1 --port 11434 --models llama3:8b,qwen2:7b \
        --register-to http://127.0.0.1:5000    (the secret comes from WEBHOOK_SECRET)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

if __package__:  # imported as demo.fake_llm_server (tests)
    from demo.fake_gpu_server import KillableHTTPServer, register_and_serve, require_secret
    from demo.prompt_cache import PromptCache, SimulatedPrefill
else:  # run as a script: demo/ is on sys.path
    from fake_gpu_server import KillableHTTPServer, register_and_serve, require_secret  # type: ignore[no-redef]
    from prompt_cache import PromptCache, SimulatedPrefill  # type: ignore[no-redef]

EMBEDDING_SIZE = 8
CACHE_HEADER = "X-Cache-Hit-Blocks"  # on a generation's answer: the prompt's leading blocks the box had cached
STREAM_ABORTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class FakeLLMServer(KillableHTTPServer):
    """A threaded HTTP server that plays one Ollama/vLLM box with the given models."""

    def __init__(
        self,
        server_id: str,
        models: list[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        chunks: int = 5,
        chunk_delay: float = 0.0,
        gate: threading.Event | None = None,
        loaded: list[str] | None = None,
        version: str = "0.6.5",
        listing_gate: threading.Event | None = None,
        cold_ms_per_block: float = 0.0,
        prefill_slots: int = 0,
        cache_blocks: int = 10_000,
        cache_block_chars: int = 256,
        vram: dict[str, int] | None = None,
    ) -> None:
        super().__init__((host, port), LLMHandler)
        self.server_id = server_id
        self.models = list(models or ["llama3:8b"])
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.gate = gate  # when set, every stream waits here after its first chunk
        self.loaded = list(self.models if loaded is None else loaded)  # what /api/ps says is in memory
        self.vram = dict(vram or {})  # /api/ps's size_vram of a loaded model, in bytes; 1 when not given
        self.version = version  # what /api/version says
        self.listing_gate = listing_gate  # when set, /api/ps and /api/version wait here: a box that hangs
        # A simulated KV prefix cache: a generation waits cold_ms_per_block for each prompt block it had not seen.
        self.cache = PromptCache(cache_block_chars, cache_blocks)
        self.prefill = SimulatedPrefill(self.cache, cold_ms_per_block, prefill_slots)
        self.healthy = True
        self.requests: list[dict[str, Any]] = []
        self.aborted_streams = 0
        self.in_progress = 0
        self._counts_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release_waiting(self) -> None:
        """A stream or a listing held at a gate must not outlive the server."""
        for gate in (self.gate, self.listing_gate):
            if gate is not None:
                gate.set()

    def count(self, name: str, delta: int) -> None:
        """Change one of the counters under the lock (handlers run on many threads)."""
        with self._counts_lock:
            setattr(self, name, getattr(self, name) + delta)

    def serves(self, model: str) -> bool:
        """True when it has the model; as in Ollama, `name` is `name:latest`."""
        return model_key(model) in {model_key(m) for m in self.models}

    def requests_to(self, path: str) -> list[dict[str, Any]]:
        """The recorded requests to one path."""
        return [entry for entry in list(self.requests) if entry["path"] == path]


class LLMHandler(BaseHTTPRequestHandler):
    server: FakeLLMServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as Ollama and vLLM do: each token leaves at once, on kept-alive connections too

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        if os.environ.get("FAKE_LLM_VERBOSE"):
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self.server.count("in_progress", 1)
        try:
            self.route()
        finally:
            self.server.count("in_progress", -1)

    do_POST = do_GET

    def route(self) -> None:
        self.cache_hits: int | None = None  # this request's, for CACHE_HEADER (a connection carries many)
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        content_type = self.headers.get("Content-Type", "")
        try:
            body = (
                form_fields(raw, content_type) if content_type.startswith("multipart/") else json.loads(raw or b"null")
            )
        except ValueError:
            body = None
        self.server.requests.append(
            {
                "method": self.command,
                "path": parts.path,
                "query": {k: v[-1] for k, v in parse_qs(parts.query).items()},
                "headers": dict(self.headers.items()),
                "raw": raw,
                "body": body,
            }
        )
        openai = parts.path.startswith("/v1/")
        if parts.path == "/health":
            return self.send_json(200 if self.server.healthy else 503, {"status": "ok"})
        if self.command == "GET" and parts.path == "/_stats":  # the simulated cache's counts
            return self.send_json(200, self.server.cache.stats())
        if self.command == "GET" and parts.path in ("/api/tags", "/v1/models"):
            return self.send_json(200, self.list_models(openai))
        if self.command == "GET" and parts.path in ("/api/ps", "/api/version"):
            if self.server.listing_gate is not None:
                self.server.listing_gate.wait(timeout=30)
            return self.send_json(200, self.running() if parts.path == "/api/ps" else {"version": self.server.version})
        handler = POST_ROUTES.get(parts.path)
        if self.command != "POST" or handler is None:
            return self.send_error_json(404, f"no route {self.command} {parts.path}", openai)
        if not isinstance(body, dict):
            return self.send_error_json(400, "the body must be a JSON object", openai)
        model = body.get("model", body.get("name") if parts.path == "/api/show" else None)  # Ollama takes both
        if not isinstance(model, str) or not self.server.serves(model):
            message = f"model {model!r} not found on {self.server.server_id}"
            return self.send_error_json(404, message, openai, code="model_not_found")
        handler(self, body, model)

    # -- listings and one-shot answers ---------------------------------------------------

    def list_models(self, openai: bool) -> dict[str, Any]:
        if openai:
            models = self.server.models
            data = [{"id": m, "object": "model", "created": 0, "owned_by": self.server.server_id} for m in models]
            return {"object": "list", "data": data}
        entries = [
            {"name": m, "model": m, "modified_at": now(), "size": 0, "digest": digest(m), "details": {}}
            for m in self.server.models
        ]
        return {"models": entries}

    def running(self) -> dict[str, Any]:
        """Ollama's /api/ps: the models loaded in memory."""
        until = "2099-01-01T00:00:00Z"
        entries = [
            {
                "name": m,
                "model": m,
                "size": self.server.vram.get(m, 1),
                "digest": digest(m),
                "details": {},
                "expires_at": until,
                "size_vram": self.server.vram.get(m, 1),
            }
            for m in self.server.loaded
        ]
        return {"models": entries}

    def openai_other(self, body: dict[str, Any], model: str) -> None:
        """Responses, images, audio, rerank, score, moderations: which path and model arrived, and the fields."""
        path = self.path.split("?", 1)[0]
        self.send_json(200, {"object": "fake.answer", "path": path, "model": model, "fields": sorted(body)})

    def ollama_show(self, body: dict[str, Any], model: str) -> None:
        details = {"family": model.split(":", 1)[0], "parameter_size": "8B", "quantization_level": "Q4_0"}
        self.send_json(200, {"modelfile": f"FROM {model}\n", "details": details, "model_info": {}, "model": model})

    def ollama_embed(self, body: dict[str, Any], model: str) -> None:
        inputs = body.get("input", "")
        texts = inputs if isinstance(inputs, list) else [inputs]
        self.send_json(200, {"model": model, "embeddings": [embedding(str(text)) for text in texts]})

    def ollama_embeddings(self, body: dict[str, Any], model: str) -> None:
        self.send_json(200, {"model": model, "embedding": embedding(str(body.get("prompt", "")))})

    def openai_embeddings(self, body: dict[str, Any], model: str) -> None:
        inputs = body.get("input", "")
        texts = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": embedding(str(t))} for i, t in enumerate(texts)]
        self.send_json(200, {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": len(texts)}})

    # -- generation, streamed or not -----------------------------------------------------

    def ollama_generate(self, body: dict[str, Any], model: str) -> None:
        chat = self.path.split("?", 1)[0] == "/api/chat"
        self.cache_hits = self.server.prefill.run(model, body)

        def piece(text: str, done: bool) -> dict[str, Any]:
            content = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            extra = {"done_reason": "stop", "eval_count": self.server.chunks} if done else {}
            return {"model": model, "created_at": now(), **content, "done": done, **extra}

        if body.get("stream") is False:  # Ollama streams unless told not to
            return self.send_json(200, piece("".join(self.tokens(model)), done=True))

        def lines() -> Iterator[str]:
            for token in self.tokens(model):
                yield json.dumps(piece(token, False)) + "\n"
            yield json.dumps(piece("", True)) + "\n"

        self.stream("application/x-ndjson", lines())

    def openai_generate(self, body: dict[str, Any], model: str) -> None:
        chat = self.path.split("?", 1)[0] == "/v1/chat/completions"
        kind = "chat.completion" if chat else "text_completion"
        self.cache_hits = self.server.prefill.run(model, body)
        ident = f"cmpl-{self.server.server_id}-{time.monotonic_ns()}"

        def choice(text: str, finish: str | None, streamed: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish}
            key = "delta" if streamed else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

        def document(text: str, finish: str | None, streamed: bool) -> dict[str, Any]:
            object_name = kind + ".chunk" if streamed and chat else kind
            choices = [choice(text, finish, streamed)]
            return {"id": ident, "object": object_name, "created": int(time.time()), "model": model, "choices": choices}

        if body.get("stream") is not True:  # OpenAI streams only when asked
            return self.send_json(200, document("".join(self.tokens(model)), "stop", streamed=False))

        def events() -> Iterator[str]:
            for token in self.tokens(model):
                yield f"data: {json.dumps(document(token, None, True))}\n\n"
            yield f"data: {json.dumps(document('', 'stop', True))}\n\ndata: [DONE]\n\n"

        self.stream("text/event-stream", events())

    def tokens(self, model: str) -> Iterator[str]:
        for i in range(self.server.chunks):
            yield f"[{self.server.server_id} {model} {i}] "

    def stream(self, content_type: str, pieces: Iterator[str]) -> None:
        """Send each piece as its own HTTP chunk, flushed, `chunk_delay` apart; count a client that left."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Served-By", self.server.server_id)
        if self.cache_hits is not None:
            self.send_header(CACHE_HEADER, str(self.cache_hits))
        self.end_headers()
        try:
            for index, piece in enumerate(pieces):
                if index and self.server.chunk_delay:
                    time.sleep(self.server.chunk_delay)
                self.write_chunk(piece.encode())
                if index == 0 and self.server.gate is not None:
                    self.server.gate.wait(timeout=30)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except STREAM_ABORTED:
            self.server.count("aborted_streams", 1)
            self.close_connection = True

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # -- replies -------------------------------------------------------------------------

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps({**payload, "server_id": self.server.server_id}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Served-By", self.server.server_id)
        if self.cache_hits is not None:
            self.send_header(CACHE_HEADER, str(self.cache_hits))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str, openai: bool, code: str | None = None) -> None:
        if openai:
            error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
            return self.send_json(status, {"error": error})
        self.send_json(status, {"error": message})


# Answered with the path and model that arrived, and the fields of the JSON body or form.
OTHER_OPENAI_POSTS = (
    "/v1/responses",
    "/v1/images/generations",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/rerank",
    "/v1/score",
    "/v1/moderations",
)
POST_ROUTES = {
    "/api/generate": LLMHandler.ollama_generate,
    "/api/chat": LLMHandler.ollama_generate,
    "/api/embed": LLMHandler.ollama_embed,
    "/api/embeddings": LLMHandler.ollama_embeddings,
    "/api/show": LLMHandler.ollama_show,
    "/v1/chat/completions": LLMHandler.openai_generate,
    "/v1/completions": LLMHandler.openai_generate,
    "/v1/embeddings": LLMHandler.openai_embeddings,
    **dict.fromkeys(OTHER_OPENAI_POSTS, LLMHandler.openai_other),
}


def form_fields(raw: bytes, content_type: str) -> dict[str, Any] | None:
    """A multipart/form-data body's fields, a file's as its name and size; None when it is not one."""
    message = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: %s\r\n\r\n%s" % (content_type.encode(), raw))
    if not message.is_multipart():
        return None
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        data = part.get_payload(decode=True)
        data = data if isinstance(data, bytes) else b""
        filename = part.get_filename()
        name = part.get_param("name", header="content-disposition")
        fields[str(name)] = {"filename": filename, "size": len(data)} if filename else data.decode()
    return fields


def model_key(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def embedding(text: str) -> list[float]:
    """A deterministic unit-free vector of the text: the same text always gives the same one."""
    raw = hashlib.sha256(text.encode()).digest()
    return [round(byte / 255, 4) for byte in raw[:EMBEDDING_SIZE]]


def parse_model_map(raw: str) -> dict[str, str]:
    """`virtual=actual,...` as a dict."""
    pairs = [item.split("=", 1) for item in raw.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError("expected virtual=actual,virtual=actual")
    return {virtual.strip(): actual.strip() for virtual, actual in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-id", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--models", default="llama3:8b", help="comma-separated model names it serves")
    parser.add_argument("--model-map", type=parse_model_map, default={}, help="virtual=actual,... to register")
    parser.add_argument("--no-register-models", action="store_true", help="register no models: let discovery find them")
    parser.add_argument("--loaded", help="comma-separated models GET /api/ps says are in memory (default: all)")
    parser.add_argument("--chunks", type=int, default=5, help="tokens in each answer")
    parser.add_argument("--chunk-delay", type=float, default=0.2, help="seconds between streamed tokens")
    parser.add_argument(
        "--cold-ms-per-block", type=float, default=0.0, help="ms a generation waits per prompt block not in its cache"
    )
    parser.add_argument("--prefill-slots", type=int, default=0, help="prefills at once, the rest queue (0: no limit)")
    parser.add_argument("--cache-blocks", type=int, default=10_000, help="prompt blocks its simulated cache keeps")
    parser.add_argument("--cache-block-chars", type=int, default=256, help="characters in a block of the cache")
    parser.add_argument("--register-to", metavar="GATEWAY_URL")
    args = parser.parse_args()
    require_secret(parser, args.register_to)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    cache = {"cold_ms_per_block": args.cold_ms_per_block, "prefill_slots": args.prefill_slots}
    cache |= {"cache_blocks": args.cache_blocks, "cache_block_chars": args.cache_block_chars}
    loaded = None if args.loaded is None else [m.strip() for m in args.loaded.split(",") if m.strip()]
    server = FakeLLMServer(
        args.server_id, models, args.host, args.port, args.chunks, args.chunk_delay, loaded=loaded, **cache
    )
    print(f"fake LLM server {args.server_id} on http://{args.host}:{server.port} with {', '.join(models)}", flush=True)
    body: dict[str, Any] = {"server_id": args.server_id, "ip": args.host, "port": server.port}
    if not args.no_register_models:
        body["models"] = models
    if args.model_map:
        body["model_map"] = args.model_map
    register_and_serve(server, args.register_to, body)


if __name__ == "__main__":
    main()
