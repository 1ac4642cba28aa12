"""What the gateway reads from an LLM request's body to route it: the model it names, and how to rename it.

A JSON body is parsed whole (it is bounded by the body limit already). A multipart/form-data
body (an audio transcription, say) is only scanned, by werkzeug's multipart parser, as far as
its `model` field, and is otherwise forwarded byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Epilogue, Event, Field, File, MultipartDecoder, NeedData

MULTIPART = "multipart/form-data"
OLLAMA_STREAMS_BY_DEFAULT = frozenset({"/api/generate", "/api/chat"})  # Ollama's rule: unless "stream": false
NAME_ALSO_NAMES_MODEL = frozenset({"/api/show"})  # older Ollama clients send {"name": ...}, as Ollama accepts
MAX_BOUNDARY = 70  # RFC 2046 5.1.1
MAX_MODEL_BYTES = 1024  # a form's model field longer than this is refused, not read on
MAX_FORM_PARTS = 1000  # parts read looking for the model: each costs a header parse
FORM_CHUNK = 64 * 1024  # fed to the parser a piece at a time, so its buffer (and each cut of it) stays small


class BadRequest(ValueError):
    """The request cannot be routed; the message names the problem (and `param` the field)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ModelRequest:
    """The model a body names, whether the client asked for a stream, and the body with another model."""

    model: str
    stream: bool
    renamed: Callable[[str], bytes]  # the body as sent, but naming the server's own name for the model
    user: str | None = None  # OpenAI's `user`: one conversation, kept on one server
    payload: dict[str, Any] | None = field(default=None, repr=False)  # the parsed JSON object; None for a form


def parse_body(raw: bytes, path: str, content_type: str) -> ModelRequest:
    """What routing needs from a body: a form's under /v1/, else a JSON object's; BadRequest naming what is wrong."""
    if path.startswith("/v1/") and parse_options_header(content_type)[0].lower() == MULTIPART:
        return parse_form(raw, content_type)
    return parse_json(raw, path)


def parse_json(raw: bytes, path: str) -> ModelRequest:
    """A JSON object's `model` (or `name`, for an older /api/show), and its `stream`."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than json parses
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(payload).__name__}")
    field = "name" if "model" not in payload and "name" in payload and path in NAME_ALSO_NAMES_MODEL else "model"
    model = payload.get(field)
    if model is None:
        raise BadRequest("the request body must name a 'model'", param="model")
    if not isinstance(model, str):
        raise BadRequest(f"'{field}' must be a string, not {type(model).__name__}", param=field)
    if not model:
        raise BadRequest(f"'{field}' must not be empty", param=field)
    stream = payload.get("stream")
    openai = path.startswith("/v1/")
    streams = stream is True if openai or path not in OLLAMA_STREAMS_BY_DEFAULT else stream is not False
    user = payload.get("user") if openai else None

    def renamed(actual: str) -> bytes:
        document = {**payload, field: actual}
        try:
            return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the client's JSON) has no UTF-8
            return json.dumps(document, separators=(",", ":")).encode()  # so it stays escaped, as sent

    return ModelRequest(model, streams, renamed, user if isinstance(user, str) and user else None, payload)


def parse_form(raw: bytes, content_type: str) -> ModelRequest:
    """A multipart/form-data body's `model` field; renaming replaces that field's value and nothing else."""
    boundary = parse_options_header(content_type)[1].get("boundary", "")
    if not 0 < len(boundary) <= MAX_BOUNDARY or not boundary.isascii():
        raise BadRequest(f"a {MULTIPART} body needs a boundary of 1 to {MAX_BOUNDARY} ASCII characters")
    start, end = model_field(raw, boundary.encode())
    try:
        model = raw[start:end].decode()
    except UnicodeDecodeError:
        raise BadRequest("'model' must be UTF-8 text", param="model") from None
    if not model:
        raise BadRequest("'model' must not be empty", param="model")

    def renamed(actual: str) -> bytes:
        return raw[:start] + actual.encode() + raw[end:]

    return ModelRequest(model, False, renamed)  # a form's `stream` is not looked for: it may come after a file


def model_field(raw: bytes, boundary: bytes) -> tuple[int, int]:
    """Where the value of the form's first `model` field lies in `raw`."""
    decoder = MultipartDecoder(boundary)
    parts = 0
    for event, consumed in form_events(decoder, raw):
        if isinstance(event, Epilogue):
            break
        if not isinstance(event, (Field, File)):
            continue
        parts += 1
        if event.name != "model":
            if parts >= MAX_FORM_PARTS:
                raise BadRequest(f"the form has no 'model' field among its first {MAX_FORM_PARTS} parts", "model")
            continue
        if isinstance(event, File):
            raise BadRequest("'model' must be a form field, not a file", param="model")
        # The parser stops just past the headers' last line break; the value follows the blank line's.
        start = consumed + (2 if raw.startswith(b"\r\n", consumed) else 1)
        # It ends at the next delimiter, found by the parser's own pattern in the whole body: fed in
        # chunks, werkzeug 3.1 hands on a delimiter's CR as data when a chunk ends inside the delimiter.
        limit = start + MAX_MODEL_BYTES + len(boundary) + 8
        delimiter = decoder.boundary_re.search(raw, start, limit)
        if delimiter is None and limit >= len(raw):
            raise BadRequest(f"the {MULTIPART} body is malformed: its 'model' field has no boundary after it")
        if delimiter is None or delimiter.start() - start > MAX_MODEL_BYTES:
            raise BadRequest(f"'model' is over {MAX_MODEL_BYTES} bytes", param="model")
        return start, delimiter.start()
    raise BadRequest("the form must have a 'model' field", param="model")


def form_events(decoder: MultipartDecoder, raw: bytes) -> Iterator[tuple[Event, int]]:
    """The decoder's parse of `raw`, fed a chunk at a time: each event, and how many bytes it had consumed by then."""
    fed = 0
    try:
        while True:
            event = decoder.next_event()
            if isinstance(event, NeedData):
                chunk = raw[fed : fed + FORM_CHUNK]
                decoder.receive_data(chunk or None)  # None: the body has ended, so a part left open is an error
                fed += len(chunk)
                continue
            yield event, fed - len(decoder.buffer)
    except ValueError as exc:  # werkzeug's "cannot parse beyond ...", a part with no Content-Disposition, ...
        raise BadRequest(f"the {MULTIPART} body is malformed: {exc}") from None
