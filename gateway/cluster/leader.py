"""The leader lease: one gateway process in the cluster runs the health sweep, and writes its results.

The lease is one key, set with `SET NX PX` to a fencing token (a number from a counter that only
grows), and renewed by its holder every third of its time to live. A process that dies stops
renewing, and another takes the key once it expires: within `ttl` plus one try. Writes made as
the leader carry the token, and Redis refuses them once the key holds another (fleet/redis_store.py),
so a leader that was paused past its lease cannot overwrite its successor's results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

from gateway.cluster.connection import Redis, RedisUnavailable

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderLease:
    """Takes and renews the leader key in the background; `token` is set while this process leads."""

    def __init__(self, redis: Redis, ttl: float, name: str = "leader") -> None:
        self.redis = redis
        self.ttl = max(ttl, 1.0)
        self.key = redis.key(name)
        self.holder_key = redis.key(f"{name}:holder")
        self._fence_key = redis.key(f"{name}:fence")
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self._token = ""
        self._valid_until = 0.0  # monotonic: past it, this process no longer counts itself leader
        self._renew = redis.client.register_script(_RENEW)
        self._release = redis.client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        """The fencing token while this process holds the lease, else ''."""
        return self._token if time.monotonic() < self._valid_until else ""

    @property
    def is_leader(self) -> bool:
        """True while this process holds the lease (by its own clock, with a margin)."""
        return bool(self.token)

    def try_lead(self) -> bool:
        """Renew the lease if held, or take it if free; True while this process leads."""
        ttl_ms = int(self.ttl * 1000)
        started = time.monotonic()
        try:
            if self._token and self.redis.call(
                "renew the leader lease", self._renew, [self.key, self.holder_key], [self._token, ttl_ms]
            ):
                self._valid_until = started + 0.8 * self.ttl
                return True
            if self._token:
                log.warning("this gateway (%s) lost the leader lease; another runs the health sweep", self.identity)
                self._token, self._valid_until = "", 0.0
            token = str(self.redis.call("take the leader lease", self.redis.client.incr, self._fence_key))
            if self.redis.call("take the leader lease", self.redis.client.set, self.key, token, nx=True, px=ttl_ms):
                self._token, self._valid_until = token, started + 0.8 * self.ttl
                self.redis.call("name the leader", self.redis.client.set, self.holder_key, self.identity, px=ttl_ms)
                log.info("this gateway (%s) leads the health sweep (fencing token %s)", self.identity, token)
                return True
        except RedisUnavailable:
            pass  # Redis logged it once; while it is down the lease runs out and nobody sweeps
        return self.is_leader

    def holder(self) -> str | None:
        """Which process leads now (host:pid), as Redis says; None when none does or Redis is down."""
        try:
            raw = self.redis.call("read the leader's name", self.redis.client.get, self.holder_key)
        except RedisUnavailable:
            return None
        return raw.decode() if isinstance(raw, bytes) else None

    def start(self) -> None:
        """Try to lead now, then keep trying (or renewing) every third of the lease's time to live."""
        if self._thread is not None:
            return
        self.try_lead()
        self._thread = threading.Thread(target=self._run, name="leader-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self.try_lead()

    def stop(self) -> None:
        """Stop renewing and give the lease up, so that another process takes it at once."""
        self._stop.set()
        token, self._token, self._valid_until = self._token, "", 0.0
        if token:
            with contextlib.suppress(RedisUnavailable):
                self.redis.call("give up the leader lease", self._release, [self.key], [token])
