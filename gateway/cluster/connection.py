"""One Redis for every gateway process: the client, the key names, and whether Redis answers.

Every call that must reach Redis goes through `Redis.call`, so that a refused or timed-out
connection becomes one exception (`RedisUnavailable`, answered as a 503 with Retry-After),
one log line when Redis goes and one when it comes back, and the `gateway_redis_up` gauge.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a lost or refused connection looks like to redis-py; a script or command error is not one.
DOWN_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
RETRY_AFTER = "2"  # seconds a client waits before trying a change again while Redis is down


class RedisUnavailable(RuntimeError):
    """Redis did not answer; nothing was changed. The client may try again."""

    retry_after = RETRY_AFTER


class Redis:
    """The gateway's Redis: a pooled client, a key prefix, and whether the last call got through."""

    def __init__(self, url: str, prefix: str = "gpu-gateway:", timeout: float = 1.0) -> None:
        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=15,  # a pooled connection idle that long is pinged before use
            retry_on_timeout=False,
        )
        self.where = _where(url)  # host:port/db, no password: for log lines
        self.up = True
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.listeners: list[Callable[[bool], None]] = []  # told True when Redis comes back, False when it goes

    def key(self, name: str) -> str:
        """The full key for `name`, under this fleet's prefix."""
        return self.prefix + name

    def call(self, what: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `func(*args, **kwargs)`; RedisUnavailable, naming `what`, when Redis does not answer."""
        try:
            result = func(*args, **kwargs)
        except DOWN_ERRORS as exc:
            self.went_down(exc)
            raise RedisUnavailable(f"Redis at {self.where} did not answer ({what}): {_reason(exc)}") from exc
        if not self.up:
            self.came_back()
        return result

    def went_down(self, exc: BaseException) -> None:
        """Note that Redis did not answer; logs once per outage."""
        with self._lock:
            if not self.up:
                return
            self.up, self.down_since = False, time.monotonic()
        log.error(
            "Redis at %s is unreachable (%s): routing on the last snapshot; changes answer 503",
            self.where,
            _reason(exc),
        )
        for listener in list(self.listeners):
            listener(False)

    def came_back(self) -> None:
        """Note that Redis answers again; logs once."""
        with self._lock:
            if self.up:
                return
            down_for = time.monotonic() - (self.down_since or time.monotonic())
            self.up, self.down_since = True, None
        log.warning("Redis at %s answers again after %.1fs; catching up", self.where, down_for)
        for listener in list(self.listeners):
            listener(True)

    def ping(self) -> bool:
        """True when Redis answers a PING now."""
        try:
            self.call("ping", self.client.ping)
        except RedisUnavailable:
            return False
        return True

    def close(self) -> None:
        """Close the pooled connections."""
        self.client.close()


def _where(url: str) -> str:
    from urllib.parse import urlsplit

    parsed = urlsplit(url)
    if parsed.scheme == "unix":
        return parsed.path
    return f"{parsed.hostname}:{parsed.port or 6379}{parsed.path or '/0'}"


def _reason(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0] or type(exc).__name__
