"""max_concurrent across processes: each request's slot is a lease in Redis that expires unless renewed.

A server's slots are one sorted set, `slots:<server_id>`: a member per request in flight (a lease
id unique to its process), scored by its expiry in milliseconds on Redis's own clock (TIME), so
that hosts whose clocks differ agree on what has expired. Taking a slot is one script (drop the
expired, count, add if under the cap), releasing one is a ZREM, and a renewer pushes this
process's leases forward every ttl/3. A process that dies, or loses Redis for longer than the TTL,
holds nothing once the TTL has passed: no counter to drift (LiteLLM's DECR lost on a cancelled
request), no slot kept for an hour.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
from collections.abc import Collection

from gateway.cluster.connection import Redis, RedisUnavailable

log = logging.getLogger(__name__)

DEFAULT_TTL = 30.0  # seconds a lease outlives its last renewal: a dead process's slots are free by then
RENEW_BATCH = 500  # leases renewed per script call, so that no one call keeps Redis busy for long

# Redis's clock in ms, the same for every host. KEYS[1]: the set; ARGV: cap (0: none), ttl ms, lease id.
_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
TAKE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local cap = tonumber(ARGV[1])
if cap > 0 and redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)
# ARGV: ttl ms, then lease ids. Only leases still there are pushed on (ZADD XX): one released or
# expired meanwhile is never brought back. Returns how many were gone.
RENEW = (
    _NOW
    + """
local expiry, lost = now + tonumber(ARGV[1]), 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
  else
    lost = lost + 1
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return lost
"""
)
COUNT = _NOW + "return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')\n"


class SharedSlots:
    """The slots every gateway process holds on each server, in Redis, as leases with an expiry."""

    def __init__(self, redis: Redis, ttl: float = DEFAULT_TTL) -> None:
        self.redis = redis
        self.ttl = ttl
        self._ttl_ms = max(1, int(ttl * 1000))
        self._take = redis.client.register_script(TAKE)
        self._renew = redis.client.register_script(RENEW)
        self._count = redis.client.register_script(COUNT)
        self._lock = threading.Lock()  # over the fields below; never held over a Redis call
        self._held: dict[str, str] = {}  # this process's leases: lease id -> server id
        self._pid = -1
        self._token = ""
        self._ids = itertools.count(1)
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()

    def key(self, server_id: str) -> str:
        """The sorted set of `server_id`'s slots."""
        return self.redis.key(f"slots:{server_id}")

    def new_lease_id(self) -> str:
        """A lease id no other process or host uses: a random token, the pid, a counter."""
        with self._lock:
            self._this_process()
            return f"{self._token}:{next(self._ids)}"

    def take(self, server_id: str, cap: int | None, lease_id: str) -> bool:
        """Take a slot on `server_id` if fewer than `cap` are held (None: whatever the count); RedisUnavailable."""
        took = self.redis.call("take a slot", self._take, [self.key(server_id)], [cap or 0, self._ttl_ms, lease_id])
        if not took:
            return False
        with self._lock:
            self._this_process()
            self._held[lease_id] = server_id
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_loop, name="shared-slots-renewer", daemon=True)
                self._renewer.start()
        return True

    def release(self, server_id: str, lease_id: str) -> None:
        """Free a slot; RedisUnavailable if Redis does not answer (the slot then expires within the TTL)."""
        with self._lock:
            self._held.pop(lease_id, None)  # first: the renewer must not push it on meanwhile
        self.redis.call("release a slot", self.redis.client.zrem, self.key(server_id), lease_id)

    def renew(self) -> int:
        """Push every lease this process holds forward by the TTL, in one pipeline; how many were renewed."""
        with self._lock:
            by_server: dict[str, list[str]] = {}
            for lease_id, server_id in self._held.items():
                by_server.setdefault(server_id, []).append(lease_id)
        if not by_server:
            return 0
        pipe = self.redis.client.pipeline(transaction=False)
        calls = []
        for server_id, lease_ids in by_server.items():
            for start in range(0, len(lease_ids), RENEW_BATCH):
                batch = lease_ids[start : start + RENEW_BATCH]
                self._renew([self.key(server_id)], [self._ttl_ms, *batch], client=pipe)
                calls.append((server_id, len(batch)))
        lost_counts = self.redis.call("renew slots", pipe.execute)
        lost: dict[str, int] = {}
        for (server_id, _), count in zip(calls, lost_counts, strict=True):
            if count:
                lost[server_id] = lost.get(server_id, 0) + int(count)
        for server_id, count in lost.items():
            # Redis was away, or this process stalled, for longer than the TTL: other processes
            # may have taken those slots, so the server can briefly run above its cap.
            log.warning("%d slots on %s expired before they were renewed; they finish uncounted", count, server_id)
        return sum(size for _, size in calls) - sum(lost.values())

    def counts(self, server_ids: Collection[str]) -> dict[str, int]:
        """The unexpired slots every process holds on each server, in one pipeline; RedisUnavailable."""
        ids = list(server_ids)
        if not ids:
            return {}
        pipe = self.redis.client.pipeline(transaction=False)
        for server_id in ids:
            self._count([self.key(server_id)], client=pipe)
        return dict(zip(ids, map(int, self.redis.call("count slots", pipe.execute)), strict=True))

    def held(self) -> int:
        """Leases this process holds now."""
        with self._lock:
            return len(self._held)

    def close(self) -> None:
        """Stop renewing: what this process still holds expires within the TTL."""
        self._stop.set()
        renewer = self._renewer
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=5)

    def _this_process(self) -> None:
        """Under the lock: start afresh in a forked child (gunicorn's workers): new ids, no leases, no renewer."""
        pid = os.getpid()
        if pid != self._pid:
            self._pid, self._token = pid, f"{secrets.token_hex(4)}-{pid}"
            self._held.clear()
            self._renewer = None

    def _renew_loop(self) -> None:
        """The renewer's body: every ttl/3 until closed (a greenlet under gevent, as threading is patched)."""
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except RedisUnavailable:
                pass  # logged by the connection; the leases live on until the TTL
            except Exception:  # the job's body: a surprise is logged, and the next round still runs
                log.exception("renewing shared slots failed")
