"""The fleet in Redis (REDIS_URL), shared by every gateway process and host.

One hash holds each server's record as JSON, one its revision, a sorted set the registration
order, and a counter the fleet's version. Every write is one Lua script that checks the record's
revision first (compare and set): a process whose copy is out of date is refused, catches up,
and tries again, so two processes never undo each other's change. Each write bumps the version
and publishes it, and every process reloads when the version it sees moves (fleet/follow.py).
A revision is the version the record was written at, so it never repeats, even after a removal.

Keys, under REDIS_PREFIX: fleet:servers, fleet:revs, fleet:order, fleet:seq, fleet:version,
fleet:readings, fleet:sweep, fleet:ejections, and the channel fleet:changed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any, NamedTuple

from gateway.cluster.connection import Redis
from gateway.fleet.resources import GPU, Reading

log = logging.getLogger(__name__)

# Kept by each process for itself: the time a server last took one of its requests.
LOCAL_FIELDS = ("last_used_time",)

_PUT = """
local id, expected = ARGV[1], tonumber(ARGV[2])
if ARGV[4] ~= '' and redis.call('GET', KEYS[6]) ~= ARGV[4] then return {-2, 0} end
local rev = tonumber(redis.call('HGET', KEYS[2], id) or '0')
if rev ~= expected then return {-1, rev} end
local version = redis.call('INCR', KEYS[4])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('HDEL', KEYS[7], id)
else
  redis.call('HSET', KEYS[1], id, ARGV[3])
  redis.call('HSET', KEYS[2], id, version)
  if rev == 0 then redis.call('ZADD', KEYS[3], 'NX', redis.call('INCR', KEYS[5]), id) end
end
redis.call('PUBLISH', KEYS[8], version)
return {version, version}
"""

_READINGS = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then return -2 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[4], version)
return version
"""

# An outlier ejection, seen by every process: ARGV[2] is its JSON, or '' when it ends.
_EJECT = """
if ARGV[2] == '' then
  if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[3], version)
return version
"""


class Conflict(RuntimeError):
    """Another process changed the record since this one read it; catch up and try again."""


class Fenced(RuntimeError):
    """This process no longer holds the leader lease its write names; the write was refused."""


class Snapshot(NamedTuple):
    """The fleet as Redis holds it at one version: each record's id, revision and JSON, in registration order.

    The JSON is parsed by `entry()` only for records whose revision the reader lacks: a sweep's
    readings move the version every interval, and most records are unchanged.
    """

    version: int
    records: list[tuple[str, int, bytes]]
    readings: dict[str, Reading]
    sweep: dict[str, Any]
    ejections: dict[str, tuple[float, int]]  # server id -> (ends, as a Unix time; ejections so far)


class RedisFleetStore:
    """Reads the fleet from Redis in one transaction and writes one record at a time, compared and set."""

    def __init__(self, redis: Redis, fence_key: str | None = None) -> None:
        self.redis = redis
        self.where = f"redis {redis.where} ({redis.prefix}fleet:*)"
        self.channel = redis.key("fleet:changed")
        names = ("servers", "revs", "order", "version", "seq")
        self._keys = [redis.key(f"fleet:{name}") for name in names]
        self.version_key = self._keys[3]
        self._fence_key = fence_key or redis.key("leader")
        self._readings_key = redis.key("fleet:readings")
        self._sweep_key = redis.key("fleet:sweep")
        self._ejections_key = redis.key("fleet:ejections")
        self._eject = redis.client.register_script(_EJECT)
        self._put = redis.client.register_script(_PUT)
        self._put_readings = redis.client.register_script(_READINGS)

    def version(self) -> int:
        """The fleet's version in Redis now."""
        return int(self.redis.call("read the fleet's version", self.redis.client.get, self.version_key) or 0)

    def snapshot(self) -> Snapshot:
        """Everything, as of one version (MULTI/EXEC); entries that are not JSON objects are skipped, logged."""
        servers_key, revs_key, order_key, version_key, _ = self._keys
        pipe = self.redis.client.pipeline(transaction=True)
        pipe.hgetall(servers_key)
        pipe.hgetall(revs_key)
        pipe.zrange(order_key, 0, -1)
        pipe.get(version_key)
        pipe.hgetall(self._readings_key)
        pipe.get(self._sweep_key)
        pipe.hgetall(self._ejections_key)
        raw, raw_revs, ids, raw_version, raw_readings, raw_sweep, raw_ejections = self.redis.call(
            "load the fleet", pipe.execute
        )
        revs = {key.decode(): int(value) for key, value in raw_revs.items()}
        records = [(i.decode(), revs.get(i.decode(), 0), raw[i]) for i in ids if i in raw]
        readings = {}
        for key, value in raw_readings.items():
            reading = _reading_from(value)
            if reading is not None:
                readings[key.decode()] = reading
        sweep = json.loads(raw_sweep) if raw_sweep else {}
        ejections = {}
        for key, value in raw_ejections.items():
            try:
                ends, count = json.loads(value)
                ejections[key.decode()] = (float(ends), int(count))
            except (ValueError, TypeError):
                log.warning("an ejection in %s is not one this gateway reads; left out", self.where)
        sweep = sweep if isinstance(sweep, dict) else {}
        return Snapshot(int(raw_version or 0), records, readings, sweep, ejections)

    def put_ejection(self, server_id: str, ends: float | None, ejections: int = 0) -> None:
        """Share an outlier ejection that ends at `ends` (a Unix time); None ends it for every process."""
        text = "" if ends is None else json.dumps([ends, ejections])
        keys = [self._ejections_key, self.version_key, self.channel]
        self.redis.call(f"share the ejection of {server_id}", self._eject, keys=keys, args=[server_id, text])

    def entry(self, server_id: str, text: bytes) -> dict[str, Any] | None:
        """A record's JSON as an object; None (logged) when it is not one."""
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or entry.get("server_id") != server_id:
            log.error("fleet record %r in %s is not a JSON object of that server; left out", server_id, self.where)
            return None
        return entry

    def put(self, server_id: str, entry: dict[str, Any] | None, expected_rev: int, fence: str = "") -> int:
        """Write (or, with None, remove) one record if its revision is still `expected_rev` (0: absent).

        Returns the record's new revision, which is the fleet's new version. Raises Conflict when
        another process changed it first, Fenced when `fence` is no longer the leader's token.
        """
        text = "" if entry is None else json.dumps(_shared(entry), ensure_ascii=False, separators=(",", ":"))
        keys = [*self._keys, self._fence_key, self._readings_key, self.channel]
        result, rev = self.redis.call(
            f"save server {server_id}", self._put, keys=keys, args=[server_id, expected_rev, text, fence]
        )
        if result == -1:
            raise Conflict(f"server {server_id} was changed by another gateway (revision {rev})")
        if result == -2:
            raise Fenced("the leader lease passed to another gateway")
        return int(rev)

    def put_readings(self, readings: dict[str, Reading], sweep: dict[str, Any], fence: str = "") -> int | None:
        """The leader's monitor readings and the last sweep's time, for every process; None when fenced off."""
        args: list[str] = [fence]
        for server_id, reading in readings.items():
            args += [server_id, _reading_text(reading)]
        pipe = self.redis.client.pipeline(transaction=True)
        pipe.set(self._sweep_key, json.dumps(sweep))
        keys = [self._readings_key, self.version_key, self._fence_key, self.channel]
        self._put_readings(keys=keys, args=args, client=pipe)
        _, version = self.redis.call("save the readings", pipe.execute)
        return None if version == -2 else int(version)


def _shared(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key not in LOCAL_FIELDS}


def _reading_text(reading: Reading) -> str:
    """A reading with its age as a wall-clock time: each process keeps `received` on its own monotonic clock."""
    data = asdict(reading)
    data["at"] = time.time() - (time.monotonic() - data.pop("received"))
    return json.dumps(data, separators=(",", ":"))


def _reading_from(text: bytes) -> Reading | None:
    try:
        data = json.loads(text)
        at = float(data.pop("at"))
        gpus = tuple(GPU(**gpu) for gpu in data.pop("gpus", ()))
        return Reading(received=time.monotonic() - max(0.0, time.time() - at), gpus=gpus, **data)
    except (ValueError, TypeError, KeyError, AttributeError):
        log.warning("a monitor reading in Redis is not one this gateway reads; left out")
        return None
