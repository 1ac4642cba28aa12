"""The Lua that every job script runs first: its two arguments, the clock, and the helpers the scripts share.

The changes (redis_scripts.py) and the reads (redis_reads.py) each run after PREAMBLE. Every
script takes the jobs' key prefix as ARGV[1] and the time as ARGV[2] (empty: Redis's own clock,
one clock for every host; a number: the store's test clock). The keys under the prefix:

    job:<id>            a hash: the job's fields, as the SQLite table's columns (absent = NULL)
    queue               queued ids, scored priority * 2^48 + seq: the next job first
    queue:type:<t>      the same, of one task type; queue:model:<m> of one model (a worker's ask)
    status:<s>          the ids of one status, scored by seq (counts, listings, the queue's age)
    all                 every id, scored by seq (the newest first, of all statuses)
    leases              running ids, scored by their lease's expiry
    finished            finished ids, scored by when they finished (the result TTL)
    callbacks           ids whose callback is due, scored by when
    seq, bytes          the last sequence number; the bytes stored, for JOB_STORE_MAX_BYTES
    idem:<key>          "<job id> <expires at> <fingerprint>", SET with a PX of IDEMPOTENCY_TTL
"""

from __future__ import annotations

PREAMBLE = r"""
local P = ARGV[1]
local NOW
if ARGV[2] == '' then
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  NOW = tonumber(ARGV[2])
end
local SCALE = 281474976710656
local FINISHED = {succeeded = true, failed = true, cancelled = true, expired = true}

local function num(x) return string.format('%.17g', x) end
local function jkey(id) return P .. 'job:' .. id end

local function load(id)
  local flat = redis.call('HGETALL', jkey(id))
  if #flat == 0 then return nil end
  local job = {}
  for i = 1, #flat, 2 do job[flat[i]] = flat[i + 1] end
  return job
end

local function reply(id) return redis.call('HGETALL', jkey(id)) end

local function queue_score(job) return num(tonumber(job.priority) * SCALE + tonumber(job.seq)) end

local function place(job)
  return redis.call('ZCOUNT', P .. 'queue', '-inf', '(' .. queue_score(job)) + 1
end

local function enqueue(id, job)
  local score = queue_score(job)
  redis.call('ZADD', P .. 'queue', score, id)
  redis.call('ZADD', P .. 'queue:type:' .. job.task_type, score, id)
  if job.model then redis.call('ZADD', P .. 'queue:model:' .. job.model, score, id) end
end

local function dequeue(id, job)
  redis.call('ZREM', P .. 'queue', id)
  redis.call('ZREM', P .. 'queue:type:' .. job.task_type, id)
  if job.model then redis.call('ZREM', P .. 'queue:model:' .. job.model, id) end
end

local function move(id, job, status)
  redis.call('ZREM', P .. 'status:' .. job.status, id)
  redis.call('ZADD', P .. 'status:' .. status, job.seq, id)
  redis.call('HSET', jkey(id), 'status', status)
  job.status = status
end

local function held(id, token)
  local job = load(id)
  if not job then return nil, redis.error_reply('NOTFOUND no job ' .. id) end
  if not job.lease_token or job.lease_token ~= token then
    return nil, redis.error_reply(
      'STALE job ' .. id .. ' is not leased with this token: its lease expired or moved on')
  end
  if job.status ~= 'running' and job.status ~= 'cancelled' then
    return nil, redis.error_reply('STALE job ' .. id .. ' is ' .. job.status .. ': its lease is over')
  end
  return job
end

local function callback_due(id, job)
  if job.callback_url then
    redis.call('HSET', jkey(id), 'callback_state', 'pending', 'callback_due_at', num(NOW))
    redis.call('ZADD', P .. 'callbacks', num(NOW), id)
  else
    redis.call('HDEL', jkey(id), 'callback_state', 'callback_due_at')
  end
end

local function claim(id, job, holder, dispatch, lease_seconds, token)
  dequeue(id, job)
  move(id, job, 'running')
  local expires = num(NOW + lease_seconds)
  redis.call('HSET', jkey(id), 'server_id', holder, 'dispatch', dispatch, 'lease_token', token,
             'lease_expires_at', expires, 'started_at', num(NOW))
  redis.call('HINCRBY', jkey(id), 'attempts', 1)
  redis.call('HDEL', jkey(id), 'error')
  redis.call('ZADD', P .. 'leases', expires, id)
end

local function finish(id, job, status, err, has_result, rstatus, rheaders, rbody)
  if has_result then
    local delta = #rheaders + #rbody
    redis.call('HSET', jkey(id), 'result_status', rstatus, 'result_headers', rheaders, 'result_body', rbody)
    redis.call('HINCRBY', jkey(id), 'size', delta)
    redis.call('INCRBY', P .. 'bytes', delta)
  end
  move(id, job, status)
  if err then redis.call('HSET', jkey(id), 'error', err) else redis.call('HDEL', jkey(id), 'error') end
  redis.call('HSET', jkey(id), 'finished_at', num(NOW))
  redis.call('HDEL', jkey(id), 'lease_expires_at')
  redis.call('ZREM', P .. 'leases', id)
  callback_due(id, job)
  redis.call('ZADD', P .. 'finished', num(NOW), id)
end
"""
