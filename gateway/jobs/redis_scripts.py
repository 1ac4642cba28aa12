"""The Redis job store's state changes, each one Lua script: atomic for every process that shares Redis.

Its reads are in redis_reads.py; both run after PREAMBLE (redis_preamble.py: the arguments every
script takes, the keys under the prefix, the helpers they share). Refusals come back as error
replies whose first word names the JobError: NOTFOUND, STALE, CONFLICT, FULL.
"""

from __future__ import annotations

# ARGV[3..]: id, priority, task type, has model, model, method, target, headers, body, has callback,
# callback URL, size, max bytes, has key, key, fingerprint, key TTL (s).
SUBMIT = r"""
local id, priority, task_type = ARGV[3], tonumber(ARGV[4]), ARGV[5]
local model = ARGV[6] == '1' and ARGV[7] or nil
local callback_url = ARGV[12] == '1' and ARGV[13] or nil
local size, max_bytes = tonumber(ARGV[14]), ARGV[15]
local key = ARGV[16] == '1' and (P .. 'idem:' .. ARGV[17]) or nil
local fingerprint, key_ttl = ARGV[18], tonumber(ARGV[19])
if key then
  local kept = redis.call('GET', key)
  if kept then
    local kept_id, expires, kept_fingerprint = string.match(kept, '^(%S+) (%S+) (.*)$')
    if tonumber(expires) > NOW then
      if kept_fingerprint ~= fingerprint then
        return redis.error_reply('CONFLICT this Idempotency-Key was used for a different request')
      end
      local job = load(kept_id)
      if job then
        local at = false
        if job.status == 'queued' then at = place(job) end
        return {0, at, reply(kept_id)}
      end
    end
  end
end
local stored = tonumber(redis.call('GET', P .. 'bytes') or '0')
if stored + size > tonumber(max_bytes) then
  return redis.error_reply(
    'FULL the job store is full (' .. max_bytes .. ' bytes): try again when jobs have finished')
end
local seq = redis.call('INCR', P .. 'seq')
local fields = {'job_id', id, 'status', 'queued', 'priority', priority, 'seq', seq, 'task_type', task_type,
                'method', ARGV[8], 'target', ARGV[9], 'headers', ARGV[10], 'body', ARGV[11], 'attempts', 0,
                'created_at', num(NOW), 'size', size, 'callback_attempts', 0}
if model then fields[#fields + 1] = 'model'; fields[#fields + 1] = model end
if callback_url then fields[#fields + 1] = 'callback_url'; fields[#fields + 1] = callback_url end
redis.call('HSET', jkey(id), unpack(fields))
if key then
  redis.call('SET', key, id .. ' ' .. num(NOW + key_ttl) .. ' ' .. fingerprint,
             'PX', math.max(1, math.floor(key_ttl * 1000)))
end
redis.call('INCRBY', P .. 'bytes', size)
redis.call('ZADD', P .. 'status:queued', seq, id)
redis.call('ZADD', P .. 'all', seq, id)
local job = {priority = priority, seq = seq, task_type = task_type, model = model}
enqueue(id, job)
local at = redis.call('ZCOUNT', P .. 'queue', '-inf', '(' .. num((priority + 1) * SCALE))
return {1, seq, num(NOW), at}
"""

# ARGV[3..]: holder, dispatch, lease seconds, limit, max bytes ('' for none), then three counted
# lists (task types, models, ids to skip), then `limit` lease tokens.
CLAIM_MANY = r"""
local holder, dispatch, lease_seconds = ARGV[3], ARGV[4], tonumber(ARGV[5])
local limit, max_bytes = tonumber(ARGV[6]), tonumber(ARGV[7])
local at = 8
local function list()
  local n, out = tonumber(ARGV[at]), {}
  for k = 1, n do out[k] = ARGV[at + k] end
  at = at + n + 1
  return out
end
local types, models, skipped = list(), list(), list()
local skip = {}
for _, id in ipairs(skipped) do skip[id] = true end
local sources = {}
for _, t in ipairs(types) do sources[#sources + 1] = P .. 'queue:type:' .. t end
for _, m in ipairs(models) do sources[#sources + 1] = P .. 'queue:model:' .. m end
if #sources == 0 then sources[1] = P .. 'queue' end
-- The first `limit` of the union that are not skipped are each within the first limit + #skip of their own index.
local want, seen, candidates = limit + #skipped, {}, {}
for _, source in ipairs(sources) do
  local found = redis.call('ZRANGE', source, 0, want - 1, 'WITHSCORES')
  for k = 1, #found, 2 do
    local id = found[k]
    if not seen[id] and not skip[id] then
      seen[id] = true
      candidates[#candidates + 1] = {id, tonumber(found[k + 1])}
    end
  end
end
table.sort(candidates, function(a, b) return a[2] < b[2] end)
local claimed, total = {}, 0
for _, candidate in ipairs(candidates) do
  if #claimed >= limit then break end
  local id = candidate[1]
  local job = load(id)
  total = total + tonumber(job.size)
  if #claimed > 0 and max_bytes and total > max_bytes then break end
  claim(id, job, holder, dispatch, lease_seconds, ARGV[at + #claimed])
  claimed[#claimed + 1] = reply(id)
end
return claimed
"""

# ARGV[3..]: dispatch, lease seconds, then id, holder and lease token for each job. A job that is
# no longer queued answers false (nil to the caller), in its place.
CLAIM_JOBS = r"""
local dispatch, lease_seconds = ARGV[3], tonumber(ARGV[4])
local claimed = {}
for at = 5, #ARGV, 3 do
  local id = ARGV[at]
  local job = load(id)
  if job and job.status == 'queued' then
    claim(id, job, ARGV[at + 1], dispatch, lease_seconds, ARGV[at + 2])
    claimed[#claimed + 1] = reply(id)
  else
    claimed[#claimed + 1] = false
  end
end
return claimed
"""

# ARGV[3..]: id, lease token, lease seconds.
HEARTBEAT = r"""
local id = ARGV[3]
local job, refused = held(id, ARGV[4])
if not job then return refused end
if job.status == 'running' then
  local expires = num(NOW + tonumber(ARGV[5]))
  redis.call('HSET', jkey(id), 'lease_expires_at', expires)
  redis.call('ZADD', P .. 'leases', expires, id)
end
return reply(id)
"""

# ARGV[3..]: id, lease token, status, has error, error, has result, result status, headers, body.
FINISH = r"""
local id = ARGV[3]
local job, refused = held(id, ARGV[4])
if not job then return refused end
if job.status ~= 'running' then return reply(id) end
local err = ARGV[6] == '1' and ARGV[7] or nil
finish(id, job, ARGV[5], err, ARGV[8] == '1', ARGV[9], ARGV[10], ARGV[11])
return reply(id)
"""

# ARGV[3..]: id, lease token, error, max attempts, counted ('1': the attempt counts), has result,
# result status, headers, body, expiring ('1': only if this token's lease is past; false otherwise).
REQUEUE = r"""
local id, token, err, max_attempts = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local counted = ARGV[7] == '1'
local job
if ARGV[12] == '1' then
  job = load(id)
  if not job or job.status ~= 'running' or job.lease_token ~= token or not job.lease_expires_at
     or tonumber(job.lease_expires_at) > NOW then
    return false
  end
else
  local refused
  job, refused = held(id, token)
  if not job then return refused end
  if job.status ~= 'running' then return reply(id) end
end
if counted and tonumber(job.attempts) >= max_attempts then
  finish(id, job, 'failed', err .. ' (after ' .. job.attempts .. ' attempts)', ARGV[8] == '1',
         ARGV[9], ARGV[10], ARGV[11])
  return reply(id)
end
move(id, job, 'queued')
redis.call('HSET', jkey(id), 'error', err)
redis.call('HDEL', jkey(id), 'server_id', 'dispatch', 'lease_token', 'lease_expires_at')
if not counted then redis.call('HINCRBY', jkey(id), 'attempts', -1) end
redis.call('ZREM', P .. 'leases', id)
enqueue(id, job)
return reply(id)
"""

# ARGV[3]: id. Returns {before, after}.
CANCEL = r"""
local id = ARGV[3]
local job = load(id)
if not job then return redis.error_reply('NOTFOUND no job ' .. id) end
local before = reply(id)
if not FINISHED[job.status] then
  if job.status == 'queued' then dequeue(id, job) end
  finish(id, job, 'cancelled', job.error, false)  -- the error of an attempt before, if any, is kept
end
return {before, reply(id)}
"""

# ARGV[3]: id.
RETRY = r"""
local id = ARGV[3]
local job = load(id)
if not job then return redis.error_reply('NOTFOUND no job ' .. id) end
if job.status ~= 'failed' and job.status ~= 'expired' and job.status ~= 'cancelled' then
  return redis.error_reply(
    'STALE job ' .. id .. ' is ' .. job.status .. ': only a failed, expired or cancelled job is retried')
end
redis.call('ZREM', P .. 'status:' .. job.status, id)
job.seq = redis.call('INCR', P .. 'seq')
job.status = 'queued'
redis.call('ZADD', P .. 'status:queued', job.seq, id)
redis.call('ZADD', P .. 'all', job.seq, id)
redis.call('HSET', jkey(id), 'status', 'queued', 'attempts', 0, 'seq', job.seq, 'created_at', num(NOW),
           'callback_attempts', 0)
redis.call('HDEL', jkey(id), 'error', 'server_id', 'dispatch', 'lease_token', 'lease_expires_at', 'started_at',
           'finished_at', 'callback_state', 'callback_due_at')
redis.call('ZREM', P .. 'finished', id)
redis.call('ZREM', P .. 'callbacks', id)
enqueue(id, job)
return reply(id)
"""

# ARGV[3..]: limit, seconds the caller holds each one before another process may take it again.
CALLBACKS_DUE = r"""
local due = redis.call('ZRANGEBYSCORE', P .. 'callbacks', '-inf', num(NOW), 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(due) do
  local job = load(id)
  if job and job.callback_state == 'pending' then
    local again = num(NOW + tonumber(ARGV[4]))
    redis.call('HSET', jkey(id), 'callback_due_at', again)
    redis.call('ZADD', P .. 'callbacks', again, id)
    out[#out + 1] = reply(id)
  else
    redis.call('ZREM', P .. 'callbacks', id)
  end
end
return out
"""

# ARGV[3..]: id, has error, error, backoff, max attempts, the longest wait. Returns {state, wait}.
CALLBACK_TRIED = r"""
local id = ARGV[3]
local job = load(id)
local tried = (job and tonumber(job.callback_attempts) or 0) + 1
local wait = math.min(tonumber(ARGV[8]), tonumber(ARGV[6]) * 4 ^ (tried - 1))
local state = 'pending'
if ARGV[4] == '0' then state = 'delivered' elseif tried >= tonumber(ARGV[7]) then state = 'failed' end
if job then
  redis.call('HSET', jkey(id), 'callback_state', state, 'callback_attempts', tried)
  if ARGV[4] == '1' then
    redis.call('HSET', jkey(id), 'callback_error', ARGV[5])
  else
    redis.call('HDEL', jkey(id), 'callback_error')
  end
  if state == 'pending' then
    redis.call('HSET', jkey(id), 'callback_due_at', num(NOW + wait))
    redis.call('ZADD', P .. 'callbacks', num(NOW + wait), id)
  else
    redis.call('HDEL', jkey(id), 'callback_due_at')
    redis.call('ZREM', P .. 'callbacks', id)
  end
end
return {state, num(wait)}
"""

# ARGV[3..]: queue TTL, result TTL, batch. Returns {expired, deleted}; a full batch: call again.
PURGE = r"""
local batch = tonumber(ARGV[5])
local expired, deleted = 0, 0
local oldest = redis.call('ZRANGE', P .. 'status:queued', 0, batch - 1)
for _, id in ipairs(oldest) do
  local job = load(id)
  if not job then
    redis.call('ZREM', P .. 'status:queued', id)
  elseif tonumber(job.created_at) > NOW - tonumber(ARGV[3]) then
    break
  else
    dequeue(id, job)
    move(id, job, 'expired')
    redis.call('HSET', jkey(id), 'finished_at', num(NOW), 'error', 'no server took it within JOB_QUEUE_TTL')
    callback_due(id, job)
    redis.call('ZADD', P .. 'finished', num(NOW), id)
    expired = expired + 1
  end
end
local old = redis.call('ZRANGEBYSCORE', P .. 'finished', '-inf', num(NOW - tonumber(ARGV[4])), 'LIMIT', 0, batch)
for _, id in ipairs(old) do
  local job = load(id)
  if job then
    redis.call('ZREM', P .. 'status:' .. job.status, id)
    redis.call('ZREM', P .. 'all', id)
    redis.call('ZREM', P .. 'callbacks', id)
    redis.call('DECRBY', P .. 'bytes', tonumber(job.size))
    redis.call('DEL', jkey(id))
  end
  redis.call('ZREM', P .. 'finished', id)
  deleted = deleted + 1
end
return {expired, deleted}
"""

CHANGES = {
    "submit": SUBMIT,
    "claim_many": CLAIM_MANY,
    "claim_jobs": CLAIM_JOBS,
    "heartbeat": HEARTBEAT,
    "finish": FINISH,
    "requeue": REQUEUE,
    "cancel": CANCEL,
    "retry": RETRY,
    "callbacks_due": CALLBACKS_DUE,
    "callback_tried": CALLBACK_TRIED,
    "purge": PURGE,
}
