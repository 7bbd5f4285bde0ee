"""The Lua scripts of webhook deliveries: each move of a delivery is one of them."""

from __future__ import annotations

from common.keys import TRIM_DEAD_LUA

__all__ = ["CLAIM_DUE", "DEAD", "DONE", "RECORD", "REQUEUE", "RETRY"]

# record(status key, history key, fields JSON ('' none), ttl, history entries...):
# the status record of a webhook dead letter, written as a job's would be.
RECORD = """
local function record(status, history, fields, ttl, entries)
  if fields ~= '' then
    local flat = {}
    for k, v in pairs(cjson.decode(fields)) do
      flat[#flat + 1] = k
      flat[#flat + 1] = v
    end
    redis.call('HSET', status, unpack(flat))
    redis.call('EXPIRE', status, ttl)
  end
  if #entries > 0 then
    redis.call('RPUSH', history, unpack(entries))
    redis.call('EXPIRE', history, ttl)
  end
end
"""

# KEYS: stream, retry, deliveries, status, history
# ARGV: group, stream id ('' from the schedule), id, delivery, due, ttl, fields, entries...
# A first attempt's entry leaves the stream's pending list; a retried one must still be
# scheduled (else another process finished it).
RETRY = (
    RECORD
    + """
if ARGV[2] ~= '' then
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
elseif redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 then
  return 0
end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[3])
record(KEYS[4], KEYS[5], ARGV[7], ARGV[6], {unpack(ARGV, 8)})
return 1
"""
)

# KEYS: stream, retry, deliveries, status, history, dead index, dead payload
# ARGV: group, stream id, id, dead id, payload, now (ms), ttl, dead letters' cap,
#       fields, entries...
# Returns 0 when another process moved it, else {1, the ids of dead letters trimmed}.
DEAD = (
    RECORD
    + TRIM_DEAD_LUA
    + """
if ARGV[2] ~= '' then
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
elseif redis.call('HDEL', KEYS[3], ARGV[3]) == 0 then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[3])
local now, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('SET', KEYS[7], ARGV[5], 'EX', ttl)
redis.call('ZADD', KEYS[6], now, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - ttl * 1000)
local trimmed = trim_dead(string.sub(KEYS[6], 1, -6), ARGV[8])
record(KEYS[4], KEYS[5], ARGV[9], ttl, {unpack(ARGV, 10)})
return {1, unpack(trimmed)}
"""
)

# KEYS: retry, deliveries, status, history. ARGV: id, ttl, fields, entries...
DONE = (
    RECORD
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
record(KEYS[3], KEYS[4], ARGV[3], ARGV[2], {unpack(ARGV, 4)})
return 1
"""
)

# KEYS: retry, deliveries. ARGV: now (ms), claimed until (ms), count.
# Due deliveries, each moved on to "claimed until" (its lease); stale ids are dropped.
CLAIM_DUE = """
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  local delivery = redis.call('HGET', KEYS[2], id)
  if delivery then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    out[#out + 1] = delivery
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""

# KEYS: dead index, dead payload, status, history, retry, deliveries
# ARGV: dead id, event id, delivery, now (ms), ttl, fields, entries...
REQUEUE = (
    RECORD
    + """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[6], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[2])
record(KEYS[3], KEYS[4], ARGV[6], ARGV[5], {unpack(ARGV, 7)})
return 1
"""
)
