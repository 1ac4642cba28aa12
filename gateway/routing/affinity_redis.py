"""Which server owns which task, in Redis (REDIS_URL), so that every gateway process sends a task's requests to it."""

from __future__ import annotations

import logging

from gateway.cluster.connection import Redis, RedisUnavailable
from gateway.routing.affinity import MAX_TASK_ID_LENGTH

log = logging.getLogger(__name__)

# KEYS[1]: tasks:<task_id>; ARGV: the server id, the TTL in ms. An expired key reads as absent.
RECORD = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class RedisTaskAffinity:
    """TaskAffinity's records as keys `tasks:<task_id>` holding the owner's id, each expiring after the TTL."""

    def __init__(self, redis: Redis, ttl: float = 86400.0) -> None:
        self.redis = redis
        self.ttl = ttl
        self._ttl_ms = max(1, int(ttl * 1000))
        self._record = redis.client.register_script(RECORD)
        self._lookups_failing = False  # logged once per outage: lookups answer "no owner" meanwhile

    def key(self, task_id: str) -> str:
        """The key that holds `task_id`'s owner."""
        return self.redis.key(f"tasks:{task_id}")

    def record(self, task_id: str, server_id: str) -> bool:
        """Remember that `server_id` owns `task_id`; False if another server owns it already.

        RedisUnavailable when Redis does not answer: nothing was recorded, and the caller decides
        (the proxy still sends the reply, and logs that the task's later requests may go astray).
        """
        if len(task_id) > MAX_TASK_ID_LENGTH:
            return False
        return bool(
            self.redis.call("record a task's owner", self._record, [self.key(task_id)], [server_id, self._ttl_ms])
        )

    def owner(self, task_id: str) -> str | None:
        """The server that owns `task_id`, or None if unknown, expired, or Redis does not answer."""
        if len(task_id) > MAX_TASK_ID_LENGTH:
            return None
        try:
            value = self.redis.call("look up a task's owner", self.redis.client.get, self.key(task_id))
        except RedisUnavailable as exc:
            self._lookup_failed(exc)
            return None
        self._lookups_failing = False
        return None if value is None else _text(value)

    def first_owned(self, candidates: list[str]) -> tuple[str, str] | None:
        """The first candidate that is a known task, with its owner, in one MGET; none asked for no candidates.

        Another process may have recorded the task, so unlike the SQLite store there is no local
        set to skip the lookup with: requests that name no task (no candidates) skip it instead.
        """
        names = [c for c in candidates if len(c) <= MAX_TASK_ID_LENGTH]
        if not names:
            return None
        try:
            values = self.redis.call("look up tasks' owners", self.redis.client.mget, [self.key(n) for n in names])
        except RedisUnavailable as exc:
            self._lookup_failed(exc)
            return None
        self._lookups_failing = False
        for name, value in zip(names, values, strict=True):
            if value is not None:
                return name, _text(value)
        return None

    def purge_expired(self) -> int:
        """Nothing to do: Redis drops expired keys itself."""
        return 0

    def close(self) -> None:
        """Nothing to close: the app owns the Redis connection."""

    def _lookup_failed(self, exc: RedisUnavailable) -> None:
        if not self._lookups_failing:
            self._lookups_failing = True
            log.warning("task owners cannot be looked up (%s): task requests are routed as new ones", exc)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
