"""Bulk enqueue: many jobs in one broker message.

Each job keeps its own job id, status record and idempotency claim. One Lua script per
message writes them all (atomic).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from common.keys import (
    BATCH_ACTOR_NAME,
    QUEUES,
    WAKE_LUA,
    idempotency_key,
    queue_key,
    queue_messages_key,
    status_key,
    wake_channel,
    wake_gate_key,
)
from producers.job import Notification

__all__ = ["BATCH_SCRIPT", "batch_call", "claim_key", "payload_digest", "queued_record"]

# KEYS: queue list, queue hash, wake gate, then per job: status hash, idempotency key
#       ("" for none)
# ARGV: redis message id, payload prefix, payload suffix, status ttl, idem ttl, wake
#       channel, queue name, then per job: job id, payload fragment, payload digest,
#       status fields (JSON)
# Returns {state, id, state, id, ...} (state enqueued | existing), or {"conflict", index, id}
# with nothing written when a key is reused with another payload.
BATCH_SCRIPT = (
    WAKE_LUA
    + """
local n = (#KEYS - 3) / 2
local states, ids, parts, seen = {}, {}, {}, {}
for i = 1, n do
  local idem, base = KEYS[3 + 2 * i], 7 + (i - 1) * 4
  local id, digest = ARGV[base + 1], ARGV[base + 3]
  if string.sub(idem, -6) ~= ':idem:' then
    local held = seen[idem] or redis.call('GET', idem)
    if held then
      local sep = string.find(held, ' ', 1, true)
      local held_id, held_digest = string.sub(held, 1, sep - 1), string.sub(held, sep + 1)
      if held_digest ~= digest then return {'conflict', i, held_id} end
      states[i], ids[i] = 'existing', held_id
    else
      seen[idem] = id .. ' ' .. digest
    end
  end
  if not states[i] then
    states[i], ids[i] = 'enqueued', id
    parts[#parts + 1] = ARGV[base + 2]
  end
end
local out = {}
for i = 1, n do
  if states[i] == 'enqueued' then
    local base = 7 + (i - 1) * 4
    local idem, status = KEYS[3 + 2 * i], KEYS[2 + 2 * i]
    if string.sub(idem, -6) ~= ':idem:' then
      redis.call('SET', idem, ARGV[base + 1] .. ' ' .. ARGV[base + 3], 'EX', ARGV[5])
    end
    redis.call('HSET', status, unpack(pairs_of(cjson.decode(ARGV[base + 4]))))
    redis.call('EXPIRE', status, ARGV[4])
  end
  out[#out + 1] = states[i]
  out[#out + 1] = ids[i]
end
if #parts > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. table.concat(parts, ',') .. ARGV[3])
  redis.call('RPUSH', KEYS[1], ARGV[1])
  wake(KEYS[3], ARGV[6], ARGV[7])
end
return out
"""
)


def queued_record(
    job_id: str, queue: str, now: str, job: Notification
) -> dict[str, Any]:
    """The status record a producer writes for a job it enqueues."""
    return {
        "id": job_id,
        "state": "queued",
        "attempts": 0,
        "queue": queue,
        "created_at": now,
        "updated_at": now,
        "metadata": orjson.dumps(job.metadata).decode(),
    }


def claim_key(namespace: str, job: Notification) -> str:
    """The job's idempotency claim key; ``{ns}:idem:`` (never written) when it has no
    ``idempotency_key``.

    A key under the namespace even then: on Redis Cluster every key a script declares
    must be in the namespace's slot (an empty name is in slot 0).
    """
    return (
        idempotency_key(namespace, job.idempotency_key)
        if job.idempotency_key
        else f"{namespace}:idem:"
    )


def payload_digest(wire: dict[str, Any]) -> str:
    """What an idempotency claim compares: the job's canonical JSON, hashed."""
    return hashlib.sha256(orjson.dumps(wire, option=orjson.OPT_SORT_KEYS)).hexdigest()


def batch_call(
    namespace: str,
    jobs: Sequence[Notification],
    *,
    status_ttl: int,
    idempotency_ttl: int,
    now: str,
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of one bulk message for ``jobs`` (all of one priority)."""
    queue = QUEUES[jobs[0].priority]
    redis_id, message_id = str(uuid.uuid4()), str(uuid.uuid4())
    prefix = (
        f'{{"queue_name":"{queue}","actor_name":"{BATCH_ACTOR_NAME}","args":[],'
        f'"kwargs":{{"jobs":['
    )
    suffix = (
        f']}},"options":{{"redis_message_id":"{redis_id}"}},"message_id":"{message_id}",'
        f'"message_timestamp":{int(time.time() * 1000)}}}'
    )
    keys = [
        queue_key(namespace, queue),
        queue_messages_key(namespace, queue),
        wake_gate_key(namespace, queue),
    ]
    args: list[Any] = [
        redis_id,
        prefix,
        suffix,
        status_ttl,
        idempotency_ttl,
        wake_channel(namespace),
        queue,
    ]
    for job in jobs:
        job_id = str(uuid.uuid4())
        wire = job.to_wire()
        fields = queued_record(job_id, queue, now, job)
        idem = claim_key(namespace, job)
        keys += [status_key(namespace, job_id), idem]
        args += [
            job_id,
            orjson.dumps({"id": job_id, "job": wire}),
            payload_digest(wire),
            orjson.dumps(fields),
        ]
    return keys, args
