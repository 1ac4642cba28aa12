"""Questions the gateway asks every healthy box at once, for Ollama's GET /api/ps and GET /api/version.

Each box gets one GET, all at the same time, with one deadline (HEALTH_CHECK_TIMEOUT) for the
lot and 1 MiB for each answer. A box that fails, answers badly or is late is left out of the
reply; the reply names it in X-Missing-Servers, and the log says why.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import urllib3

from gateway.fleet.model_discovery import read_bounded
from gateway.fleet.server import BackendServer

log = logging.getLogger(__name__)

MISSING_HEADER = "X-Missing-Servers"
MAX_CONCURRENCY = 64  # boxes asked at once; past this many, the rest wait for a thread within the same deadline
# Connection: close, so no idle connection to a box outlives its question; these are rare, not a hot path.
REQUEST_HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity", "Connection": "close"}
VERSION_NUMBERS = re.compile(r"\d+")
HEADER_SAFE = "!#$&'()*+-./:;<=>?@[]^_`{|}~"  # a server id's characters kept as they are in a header: not ','
T = TypeVar("T")


class NoAnswer(Exception):
    """A box gave no usable answer; the message says why."""


@dataclass
class FleetAnswers(Generic[T]):
    """What the boxes said, (server id, answer) in registration order, and the ids of those that did not."""

    answers: list[tuple[str, T]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        """X-Missing-Servers naming the boxes left out, if any (an id's commas and non-ASCII percent-encoded)."""
        if not self.missing:
            return {}
        return {MISSING_HEADER: ", ".join(quote(server_id, safe=HEADER_SAFE) for server_id in self.missing)}


class FleetQuery:
    """Asks a GET of many boxes at once, each bounded in time (one shared deadline) and size."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.pool = urllib3.PoolManager(retries=False)

    def ask(self, servers: list[BackendServer], path: str, read: Callable[[Any], T]) -> FleetAnswers[T]:
        """What `read` makes of each box's JSON answer to GET `path`, of those that came by the deadline."""
        found: FleetAnswers[T] = FleetAnswers()
        if not servers:
            return found
        deadline = time.monotonic() + self.timeout
        # A pool for this question only: nothing idles between the (rare) calls, and a late box's thread
        # ends by itself within the deadline's reach, as its reads are bounded too.
        executor = ThreadPoolExecutor(max_workers=min(len(servers), MAX_CONCURRENCY), thread_name_prefix="llm-fleet")
        try:
            pending = [(server, executor.submit(self.fetch, server, path, deadline, read)) for server in servers]
            wait([future for _, future in pending], timeout=self.timeout)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
        for server, future in pending:
            reason = why_missing(future)
            if reason is None:
                found.answers.append((server.server_id, future.result()))
            else:
                found.missing.append(server.server_id)
                log.warning("server %s left out of GET %s: %s", server.server_id, path, reason)
        return found

    def fetch(self, server: BackendServer, path: str, deadline: float, read: Callable[[Any], T]) -> T:
        """What `read` makes of one box's 200 answer in JSON; NoAnswer saying why there is none."""
        try:
            response = self.pool.request(
                "GET",
                server.url + path,
                headers=REQUEST_HEADERS,
                timeout=urllib3.Timeout(total=max(0.01, deadline - time.monotonic())),
                redirect=False,
                preload_content=False,
                decode_content=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise NoAnswer(f"unreachable: {exc}") from None
        try:
            if response.status != 200:
                raise NoAnswer(f"answered HTTP {response.status}")
            body = read_bounded(response, deadline)
        except urllib3.exceptions.HTTPError as exc:
            raise NoAnswer(f"broke off its answer: {exc}") from None
        except TimeoutError:
            raise NoAnswer(f"did not answer within {self.timeout:g}s") from None
        except OverflowError:
            raise NoAnswer("its answer is over 1 MiB") from None
        finally:
            response.close()
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise NoAnswer(f"its answer is not JSON: {exc}") from None
        return read(document)


def why_missing(future: Future[Any]) -> str | None:
    """Why a box's answer is not there (late, or failed), or None when it is."""
    if not future.done():
        return "no answer by the deadline"
    if future.cancelled():  # still waiting for a thread when the deadline came
        return "not asked by the deadline"
    exc = future.exception()
    if exc is None:
        return None
    return str(exc) if isinstance(exc, NoAnswer) else f"{type(exc).__name__}: {exc}"


def loaded_models(document: Any) -> list[dict[str, Any]]:
    """The entries of an Ollama /api/ps answer, `{"models": [...]}`."""
    models = document.get("models") if isinstance(document, dict) else None
    if not isinstance(models, list):
        raise NoAnswer("its answer has no list of 'models'")
    return [entry for entry in models if isinstance(entry, dict)]


def version_of(document: Any) -> str:
    """The version in an Ollama /api/version answer, `{"version": "0.6.5"}`."""
    version = document.get("version") if isinstance(document, dict) else None
    if not isinstance(version, str) or not VERSION_NUMBERS.match(version):
        raise NoAnswer("its answer names no 'version'")
    return version


def version_key(version: str) -> tuple[tuple[int, ...], str]:
    """`0.6.10` after `0.6.5`: the dotted numbers compared as numbers, then the whole text."""
    numbers = version.split("-", 1)[0].split("+", 1)[0].split(".")
    return tuple(int(n) if n.isdigit() else 0 for n in numbers), version
