"""Allocations in Redis (REDIS_URL): every gateway process places, moves and routes the same keys.

Each change is one Lua script, so a server's count is checked and changed at once for every
process. The keys under the prefix's `alloc:`:

    keys             a hash: allocation key -> its JSON (Allocation.to_dict)
    on:<server>      a set: the keys a server holds (its SCARD is checked against max_allocations)
    counts           a hash: server -> keys it holds
    groups:<group>   a hash: server -> keys of the group it holds (affinity, isolation)
    history:<key>    a list, newest first, capped at HISTORY_LIMIT; a released key's expires in a week
    moving:<key>     the claim of a move in progress, with an expiry
"""

from __future__ import annotations

import json
import os
from typing import Any

from gateway.allocations.records import HISTORY_LIMIT, RELEASED_HISTORY_SECONDS, Allocation, Move
from gateway.allocations.store import full
from gateway.cluster.connection import Redis

PREAMBLE = r"""
local P = ARGV[1]
local function counted(server, group, by)
  if redis.call('HINCRBY', P .. 'counts', server, by) <= 0 then redis.call('HDEL', P .. 'counts', server) end
  if type(group) == 'string' and group ~= '' then
    local g = P .. 'groups:' .. group
    if redis.call('HINCRBY', g, server, by) <= 0 then redis.call('HDEL', g, server) end
  end
end
local function remember(key, entry)
  local h = P .. 'history:' .. key
  redis.call('LPUSH', h, entry)
  redis.call('LTRIM', h, 0, tonumber(ARGV[2]) - 1)
end
"""

# ARGV: prefix, history limit, key, server, capacity, record, entry, group ('' for none).
# {1, record} placed; {0, existing} allocated already; {-1} the server is full.
PLACE = (
    PREAMBLE
    + r"""
local key, server, cap = ARGV[3], ARGV[4], tonumber(ARGV[5])
local existing = redis.call('HGET', P .. 'keys', key)
if existing then return {0, existing} end
if cap > 0 and redis.call('SCARD', P .. 'on:' .. server) >= cap then return {-1} end
redis.call('HSET', P .. 'keys', key, ARGV[6])
redis.call('SADD', P .. 'on:' .. server, key)
counted(server, ARGV[8], 1)
redis.call('PERSIST', P .. 'history:' .. key)
remember(key, ARGV[7])
return {1, ARGV[6]}
"""
)

# ARGV: prefix, history limit, key, from, to, capacity, the new record, entry.
# {1, record} moved; {0} gone or elsewhere now; {-1} the target is full.
MOVE = (
    PREAMBLE
    + r"""
local key, from, to, cap = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local existing = redis.call('HGET', P .. 'keys', key)
if not existing then return {0} end
local current = cjson.decode(existing)
if current.server_id ~= from then return {0} end
if cap > 0 and redis.call('SCARD', P .. 'on:' .. to) >= cap then return {-1} end
redis.call('HSET', P .. 'keys', key, ARGV[7])
redis.call('SMOVE', P .. 'on:' .. from, P .. 'on:' .. to, key)
counted(from, current.group, -1)
counted(to, current.group, 1)
remember(key, ARGV[8])
return {1, ARGV[7]}
"""
)

# ARGV: prefix, history limit, key, seconds a released key's history is kept. The record, or false.
RELEASE = (
    PREAMBLE
    + r"""
local key = ARGV[3]
local existing = redis.call('HGET', P .. 'keys', key)
if not existing then return false end
local current = cjson.decode(existing)
redis.call('HDEL', P .. 'keys', key)
redis.call('SREM', P .. 'on:' .. current.server_id, key)
counted(current.server_id, current.group, -1)
redis.call('EXPIRE', P .. 'history:' .. key, ARGV[4])
return existing
"""
)

# ARGV: prefix, history limit, key, entry, seconds. A history entry alone; a key without an allocation's expires.
RECORD = (
    PREAMBLE
    + r"""
remember(ARGV[3], ARGV[4])
if redis.call('HEXISTS', P .. 'keys', ARGV[3]) == 0 then redis.call('EXPIRE', P .. 'history:' .. ARGV[3], ARGV[5]) end
return 1
"""
)

# ARGV: prefix, history limit, key, server, record, group, entries oldest first... 1 adopted, 0 there already.
ADOPT = (
    PREAMBLE
    + r"""
local key, server = ARGV[3], ARGV[4]
if redis.call('HEXISTS', P .. 'keys', key) == 1 then return 0 end
redis.call('HSET', P .. 'keys', key, ARGV[5])
redis.call('SADD', P .. 'on:' .. server, key)
counted(server, ARGV[6], 1)
redis.call('DEL', P .. 'history:' .. key)
for i = 7, #ARGV do remember(key, ARGV[i]) end
return 1
"""
)

UNCLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisAllocationStore:
    """The allocation store's interface (store.AllocationStore) on a shared Redis."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.prefix = redis.key("alloc:")
        client = redis.client
        self._place, self._move = client.register_script(PLACE), client.register_script(MOVE)
        self._release, self._record = client.register_script(RELEASE), client.register_script(RECORD)
        self._adopt, self._unclaim = client.register_script(ADOPT), client.register_script(UNCLAIM)

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _call(self, what: str, script: Any, *args: Any) -> Any:
        return self.redis.call(what, script, args=[self.prefix, HISTORY_LIMIT, *args])

    # -- reading -------------------------------------------------------------------------------

    def get(self, key: str) -> Allocation | None:
        """The key's allocation, or None."""
        raw = self.redis.call("read an allocation", self.redis.client.hget, self._key("keys"), key)
        return None if raw is None else _allocation(raw)

    def allocations(self, server_id: str | None = None, limit: int = 1000) -> list[Allocation]:
        """The allocations (of one server), oldest first, at most `limit` (negative: all)."""
        client = self.redis.client
        raws: list[Any]
        if server_id is None:
            raws = self.redis.call("list the allocations", client.hvals, self._key("keys"))
        else:
            keys = sorted(self.redis.call("list a server's keys", client.smembers, self._key(f"on:{server_id}")))
            raws = self.redis.call("read the allocations", client.hmget, self._key("keys"), keys) if keys else []
        found = sorted((_allocation(raw) for raw in raws if raw is not None), key=lambda a: (a.created_at, a.key))
        return found if limit < 0 else found[:limit]

    def total(self, server_id: str | None = None) -> int:
        """How many keys are allocated (to one server)."""
        client = self.redis.client
        if server_id is None:
            return int(self.redis.call("count the allocations", client.hlen, self._key("keys")))
        return int(self.redis.call("count a server's keys", client.scard, self._key(f"on:{server_id}")))

    def counts(self) -> dict[str, int]:
        """Server id -> keys it holds, for every server holding one."""
        return _counts(self.redis.call("count the allocations", self.redis.client.hgetall, self._key("counts")))

    def group_counts(self, group: str) -> dict[str, int]:
        """Server id -> keys of `group` it holds."""
        raw = self.redis.call("count a group's keys", self.redis.client.hgetall, self._key(f"groups:{group}"))
        return _counts(raw)

    def history(self, key: str, limit: int = HISTORY_LIMIT) -> list[Move]:
        """The key's last `limit` history entries, oldest first."""
        raws = self.redis.call(
            "read a key's history", self.redis.client.lrange, self._key(f"history:{key}"), 0, limit - 1
        )
        return [Move.from_dict(json.loads(raw)) for raw in reversed(raws)]

    # -- changing ------------------------------------------------------------------------------

    def place(self, allocation: Allocation, capacity: int, entry: Move) -> tuple[Allocation, bool]:
        """Allocate a new key, unless it has an allocation (returned with False); NoRoom at `capacity`."""
        a = allocation
        done = self._call(
            "place a key",
            self._place,
            a.key,
            a.server_id,
            capacity,
            _json(a.to_dict()),
            _json(entry.to_dict()),
            a.group or "",
        )
        if int(done[0]) < 0:
            raise full(a.server_id, capacity)
        return _allocation(done[1]), int(done[0]) == 1

    def move(self, key: str, from_id: str, to_id: str, capacity: int, entry: Move) -> Allocation | None:
        """Move a key still on `from_id` to `to_id`; None when it is gone or elsewhere; NoRoom at `capacity`."""
        current = self.get(key)
        if current is None or current.server_id != from_id:
            return None
        record = _json({**current.to_dict(), "server_id": to_id, "updated_at": entry.created_at})
        done = self._call("move a key", self._move, key, from_id, to_id, capacity, record, _json(entry.to_dict()))
        if int(done[0]) < 0:
            raise full(to_id, capacity)
        return _allocation(done[1]) if int(done[0]) == 1 else None

    def release(self, key: str) -> Allocation | None:
        """Delete the key's allocation and return it; None when it had none. Its history stays a week."""
        raw = self._call("release a key", self._release, key, RELEASED_HISTORY_SECONDS)
        return None if raw is None else _allocation(raw)

    def record(self, entry: Move) -> None:
        """Add a history entry that changed nothing (a refused move)."""
        self._call("record a move", self._record, entry.key, _json(entry.to_dict()), RELEASED_HISTORY_SECONDS)

    def adopt(self, allocation: Allocation, history: list[Move]) -> bool:
        """Take an allocation as it is, with its history (the migration); False when Redis has the key already."""
        a = allocation
        entries = [_json(entry.to_dict()) for entry in history[-HISTORY_LIMIT:]]
        return bool(
            self._call(
                "copy an allocation", self._adopt, a.key, a.server_id, _json(a.to_dict()), a.group or "", *entries
            )
        )

    def claim(self, key: str, seconds: float) -> str | None:
        """A token for moving `key` (for at most `seconds`) in any process, or None while another move holds it."""
        token = os.urandom(8).hex()
        px = max(1, int(seconds * 1000))
        taken = self.redis.call(
            "claim a move", self.redis.client.set, self._key(f"moving:{key}"), token, nx=True, px=px
        )
        return token if taken else None

    def unclaim(self, key: str, token: str) -> None:
        """End the move that `token` claimed."""
        self.redis.call("end a move", self._unclaim, keys=[self._key(f"moving:{key}")], args=[token])

    def close(self) -> None:
        """Nothing to close: the app owns the Redis connection."""


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _allocation(raw: bytes | str) -> Allocation:
    return Allocation.from_dict(json.loads(raw))


def _counts(raw: dict[Any, Any]) -> dict[str, int]:
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items() if int(v) > 0}
