"""The Redis job store's reads, each one Lua script: one round trip, and one consistent view of the jobs.

They run after redis_preamble.PREAMBLE, as the changes do: ARGV[1] the key prefix, ARGV[2] the time.
"""

from __future__ import annotations

# ARGV[3]: limit. The leases past their expiry, with their tokens: {id, token, id, token, ...}.
EXPIRED_LEASES = r"""
local ids = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', num(NOW), 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', jkey(id), 'lease_token') or ''
end
return out
"""

# ARGV[3..]: status ('' for all), limit.
RECENT = r"""
local index = ARGV[3] == '' and (P .. 'all') or (P .. 'status:' .. ARGV[3])
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', index, 0, tonumber(ARGV[4]) - 1)) do
  local job = reply(id)
  if #job > 0 then out[#out + 1] = job end
end
return out
"""

# ARGV[3..]: the statuses. Returns each one's count, then the queued per priority 0-9, the oldest
# queued job's created_at (or false) and the bytes stored.
COUNTS = r"""
local out = {}
for k = 3, #ARGV do out[#out + 1] = redis.call('ZCARD', P .. 'status:' .. ARGV[k]) end
for priority = 0, 9 do
  out[#out + 1] = redis.call('ZCOUNT', P .. 'queue', num(priority * SCALE), '(' .. num((priority + 1) * SCALE))
end
local oldest = redis.call('ZRANGE', P .. 'status:queued', 0, 0)
out[#out + 1] = oldest[1] and redis.call('HGET', jkey(oldest[1]), 'created_at') or false
out[#out + 1] = redis.call('GET', P .. 'bytes') or '0'
return out
"""

# ARGV[3]: limit. {id, model or false, headers, ...} of the next queued jobs.
QUEUE_HEADS = r"""
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'queue', 0, tonumber(ARGV[3]) - 1)) do
  local fields = redis.call('HMGET', jkey(id), 'model', 'headers')
  out[#out + 1] = id
  out[#out + 1] = fields[1]
  out[#out + 1] = fields[2]
end
return out
"""

# ARGV[3]: dispatch. {holder, id, started_at, seq, ...} of the running jobs of that kind.
HOLDERS = r"""
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'leases', 0, -1)) do
  local f = redis.call('HMGET', jkey(id), 'status', 'dispatch', 'server_id', 'started_at', 'seq')
  if f[1] == 'running' and f[2] == ARGV[3] then
    out[#out + 1] = f[3]
    out[#out + 1] = id
    out[#out + 1] = f[4]
    out[#out + 1] = f[5]
  end
end
return out
"""

READS = {
    "expired_leases": EXPIRED_LEASES,
    "recent": RECENT,
    "counts": COUNTS,
    "queue_heads": QUEUE_HEADS,
    "holders": HOLDERS,
}
