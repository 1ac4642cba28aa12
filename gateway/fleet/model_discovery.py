"""Finding the models of servers that registered none (Ollama's /api/tags, OpenAI's /v1/models), and what
Ollama servers have loaded (/api/ps)."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

import urllib3

log = logging.getLogger(__name__)

MODES = ("auto", "ollama", "openai", "off")
MAX_LISTING_BYTES = 1024 * 1024
MAX_MODELS = 1000
MAX_NAME_LENGTH = 200
READ_CHUNK = 64 * 1024
# Identity only: a compressed listing could inflate far past the size cap before it is checked.
REQUEST_HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}
READS_OLLAMA = ("auto", "ollama")  # the modes that ask servers with models what they have in memory
T = TypeVar("T")
Loaded = list[tuple[str, int]]  # (model name, size_vram) of each model in a server's memory


@dataclass(frozen=True)
class DiscoveryTarget:
    """One server to ask: its id, and its base URL when the sweep began."""

    server_id: str
    url: str


class ModelDiscoverer:
    """Asks many servers at once which models they serve, each request bounded in time and size."""

    def __init__(self, mode: str, timeout: float = 5.0, concurrency: int = 64) -> None:
        if mode not in MODES:
            raise ValueError(f"model discovery mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.timeout = timeout
        self._pool = urllib3.PoolManager(num_pools=max(concurrency, 16), maxsize=1, retries=False)
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="model-discovery")

    def submit(self, targets: list[DiscoveryTarget]) -> list[tuple[DiscoveryTarget, Future[list[str] | None]]]:
        """Start asking every target (none when the mode is `off`); collect the answers with `collect`."""
        if self.mode == "off":
            return []
        try:
            return [(target, self._executor.submit(self.discover, target)) for target in targets]
        except RuntimeError:  # shut down: the gateway is stopping
            return []

    def collect(
        self, pending: list[tuple[DiscoveryTarget, Future[list[str] | None]]]
    ) -> list[tuple[str, str, list[str]]]:
        """The usable answers that arrived within the deadline, as (server_id, url, model names)."""
        requests_each = 2 if self.mode == "auto" else 1  # auto may ask twice, each within the timeout
        wait([future for _, future in pending], timeout=(requests_each + 1) * self.timeout)
        found = []
        for target, future in pending:
            names = future.result() if future.done() and not future.exception() else None
            if names is not None:
                found.append((target.server_id, target.url, names))
        return found

    def discover(self, target: DiscoveryTarget) -> list[str] | None:
        """The model names one server serves ([] when it serves none), or None when it gave no usable answer."""
        if self.mode == "openai":
            return self.ask(target, "/v1/models", openai_names)
        tags = self.ask(target, "/api/tags", ollama_names)
        if self.mode == "ollama" or tags:
            return tags
        listed = self.ask(target, "/v1/models", openai_names)
        return listed if listed is not None else tags

    def submit_loaded(self, targets: list[DiscoveryTarget]) -> list[tuple[DiscoveryTarget, Future[Loaded | None]]]:
        """Start asking each target what it has in memory (GET /api/ps) when the mode reads Ollama; else none."""
        if self.mode not in READS_OLLAMA:
            return []
        try:
            # Quiet: a box that speaks only OpenAI's API answers 404 at every sweep, and that is no news.
            ask = functools.partial(self.ask, path="/api/ps", names_of=ollama_loaded, level=logging.DEBUG)
            return [(target, self._executor.submit(ask, target)) for target in targets]
        except RuntimeError:  # shut down: the gateway is stopping
            return []

    def collect_loaded(
        self, pending: list[tuple[DiscoveryTarget, Future[Loaded | None]]]
    ) -> list[tuple[str, str, Loaded | None]]:
        """The targets whose question ended by the deadline, as (server_id, url, loaded); None: no usable answer.

        One still waiting for a thread, or still asking, is left out: what it has loaded stays as known.
        """
        wait([future for _, future in pending], timeout=2 * self.timeout)
        return [
            (target.server_id, target.url, None if future.exception() else future.result())
            for target, future in pending
            if future.done() and not future.cancelled()
        ]

    def ask(
        self, target: DiscoveryTarget, path: str, names_of: Callable[[Any], T | None], level: int = logging.INFO
    ) -> T | None:
        """GET one listing and read it with `names_of`; None (logged at `level`) when that fails."""
        body = self.fetch(target, path, level)
        if body is None:
            return None
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            log.log(level, "models of %s: %s%s is not JSON: %s", target.server_id, target.url, path, exc)
            return None
        names = names_of(document)
        if names is None:
            log.log(level, "models of %s: %s%s does not list models", target.server_id, target.url, path)
        return names

    def fetch(self, target: DiscoveryTarget, path: str, level: int = logging.INFO) -> bytes | None:
        """The body of a 200 answer to GET url+path, read whole within the timeout and size cap, or None."""
        deadline = time.monotonic() + self.timeout
        body = None
        try:
            response = self._pool.request(
                "GET",
                target.url + path,
                headers=REQUEST_HEADERS,
                timeout=urllib3.Timeout(total=self.timeout),
                redirect=False,
                preload_content=False,
                decode_content=False,
            )
            try:
                if response.status != 200:
                    log.log(
                        level,
                        "models of %s: %s%s answered HTTP %s",
                        target.server_id,
                        target.url,
                        path,
                        response.status,
                    )
                    return None
                body = read_bounded(response, deadline)
            finally:
                if body is not None:
                    response.release_conn()
                else:  # only a connection read to its end may be reused
                    response.close()
        except urllib3.exceptions.HTTPError as exc:
            log.log(level, "models of %s: %s%s unreachable: %s", target.server_id, target.url, path, exc)
            return None
        except TimeoutError:
            log.log(level, "models of %s: %s%s took over %gs", target.server_id, target.url, path, self.timeout)
            return None
        except OverflowError:
            log.log(level, "models of %s: %s%s is over %d bytes", target.server_id, target.url, path, MAX_LISTING_BYTES)
            return None
        return body

    def close(self) -> None:
        """Stop the worker threads and close pooled connections."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._pool.clear()


def read_bounded(response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
    """The body, raising OverflowError past the size cap and TimeoutError past the deadline."""
    parts: list[bytes] = []
    size = 0
    while chunk := response.read1(READ_CHUNK):  # read1: returns what has come, so the deadline is checked
        size += len(chunk)
        if size > MAX_LISTING_BYTES:
            raise OverflowError
        parts.append(chunk)
        if time.monotonic() > deadline:  # a server that drips its answer byte by byte
            raise TimeoutError
    return b"".join(parts)


def ollama_names(document: Any) -> list[str] | None:
    """Names from Ollama's {"models": [{"name": ...}]} (`model` when `name` is missing)."""
    entries = document.get("models") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return None
    return valid_names(entry.get("name") or entry.get("model") for entry in entries if isinstance(entry, dict))


def ollama_loaded(document: Any) -> Loaded | None:
    """(name, size_vram) of each model in Ollama's /api/ps answer, `{"models": [...]}`; None when it is not one."""
    entries = document.get("models") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return None
    loaded: dict[str, int] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name, size = entry.get("name") or entry.get("model"), entry.get("size_vram")
        if is_model_name(name) and name not in loaded:
            loaded[name] = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else 0
            if len(loaded) == MAX_MODELS:
                break
    return list(loaded.items())


def openai_names(document: Any) -> list[str] | None:
    """Names from OpenAI's {"data": [{"id": ...}]}."""
    entries = document.get("data") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return None
    return valid_names(entry.get("id") for entry in entries if isinstance(entry, dict))


def valid_names(candidates: Any) -> list[str]:
    """The distinct names that are 1-200 printable characters without whitespace, the first 1,000."""
    names: dict[str, None] = {}
    for name in candidates:
        if is_model_name(name):
            names[name] = None
            if len(names) == MAX_MODELS:
                break
    return list(names)


def is_model_name(name: Any) -> TypeGuard[str]:
    """A string of 1-200 printable characters with no whitespace."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME_LENGTH
        and name.isprintable()
        and not any(c.isspace() for c in name)
    )
