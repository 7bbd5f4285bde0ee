"""Names on the broker shared by producers and workers: queues, the actor, Redis keys."""

from __future__ import annotations

import hashlib

__all__ = [
    "ACTOR_NAME",
    "BATCH_ACTOR_NAME",
    "BATCH_SIZE",
    "MINUTE_COUNTS_TTL",
    "QUEUES",
    "TRIM_DEAD_LUA",
    "WAKE_LUA",
    "accepted_key",
    "action_key",
    "actions_key",
    "api_rate_key",
    "counters_key",
    "dead_index_key",
    "dead_payload_key",
    "events_key",
    "history_key",
    "idempotency_key",
    "inbound_index_key",
    "inbound_key",
    "minute_counts_key",
    "queue_key",
    "queue_messages_key",
    "scheduled_key",
    "scheduled_messages_key",
    "status_key",
    "suppressed_key",
    "wake_channel",
    "wake_gate_key",
]

ACTOR_NAME = "deliver"
BATCH_ACTOR_NAME = "deliver_batch"  # many jobs in one broker message (enqueue_many)
BATCH_SIZE = 20  # small enough that a thread is soon free for a high-priority job
# priority → Dramatiq queue. Each has its own queue so a bulk send never delays `high`.
QUEUES = {"high": "mail-high", "normal": "mail", "bulk": "mail-bulk"}
# Seconds a minute's outcome counts are kept: the console charts the last hour.
MINUTE_COUNTS_TTL = 2 * 3600


def queue_key(namespace: str, queue: str) -> str:
    """The Redis list Dramatiq fetches message ids from."""
    return f"{namespace}:{queue}"


def queue_messages_key(namespace: str, queue: str) -> str:
    """The Redis hash of message id → encoded message."""
    return f"{namespace}:{queue}.msgs"


def scheduled_key(namespace: str) -> str:
    """Scheduled messages: a sorted set of message id (a job id) → due time (ms)."""
    return f"{namespace}:scheduled"


def scheduled_messages_key(namespace: str) -> str:
    """The hash of scheduled message id → encoded message, released when due."""
    return f"{namespace}:scheduled.msgs"


def status_key(namespace: str, job_id: str) -> str:
    """The status record (a hash) of one job."""
    return f"{namespace}:job:{job_id}"


def history_key(namespace: str, job_id: str) -> str:
    """The attempt history (a list of JSON entries) of one job."""
    return f"{namespace}:job:{job_id}:history"


def minute_counts_key(namespace: str, minute: int) -> str:
    """The hash of outcome (``sent``, ``retrying``, ``dead``) → count in one minute.

    ``minute`` is whole minutes since the epoch; the status script writes it.
    """
    return f"{namespace}:minute:{minute}"


def accepted_key(namespace: str, job_id: str) -> str:
    """The delivery marker: the set of recipients a server has accepted for the job."""
    return f"{namespace}:job:{job_id}:accepted"


def idempotency_key(namespace: str, key: str) -> str:
    """The claim of one idempotency key (hashed: keys are free text)."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{namespace}:idem:{digest}"


def dead_index_key(namespace: str) -> str:
    """The dead letters: a sorted set of job id → time of death (ms)."""
    return f"{namespace}:dead"


def dead_payload_key(namespace: str, job_id: str) -> str:
    """The full message of one dead letter (what requeue sends again)."""
    return f"{namespace}:dead:{job_id}"


def counters_key(namespace: str) -> str:
    """Counters that outlive what they count: a hash (``dead_letters_trimmed``)."""
    return f"{namespace}:counters"


def events_key(namespace: str) -> str:
    """The stream of outcome events engines read (docs/design.md §9)."""
    return f"{namespace}:events"


def suppressed_key(namespace: str) -> str:
    """The suppression list: a hash of lowercased address → JSON entry."""
    return f"{namespace}:suppressed"


def inbound_key(namespace: str, key: str) -> str:
    """The record of one inbound message (hashed: its key is a Message-ID or digest)."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{namespace}:inbound:message:{digest}"


def inbound_index_key(namespace: str) -> str:
    """Recent inbound messages: a sorted set of record key → time received (ms)."""
    return f"{namespace}:inbound:index"


def action_key(namespace: str, key: str) -> str:
    """One e-mail action key's record: a hash (job, recipient, actions, state)."""
    return f"{namespace}:action:{key}"


def actions_key(namespace: str, job_id: str) -> str:
    """A job's action keys: a hash of recipient address → key (docs/design.md §11)."""
    return f"{namespace}:job:{job_id}:actions"


def wake_channel(namespace: str) -> str:
    """The pub/sub channel on which producers tell idle workers that a queue has work."""
    return f"{namespace}:wake"


def wake_gate_key(namespace: str, queue: str) -> str:
    """Set for ``WAKE_GATE_MS`` after a wake-up of ``queue``: at most one per interval."""
    return f"{namespace}:wake:{queue}"


# At most one wake-up per queue every 5 ms: a worker that is woken fetches everything
# enqueued by then, and one busy enough to miss a later job polls again within ms.
WAKE_GATE_MS = 5
# Lua for the scripts that enqueue. wake(gate key, channel, queue name) wakes a queue.
# pairs_of(table) gives a record's fields as one flat list, so one HSET writes them all.
WAKE_LUA = f"""
local function wake(gate, channel, queue)
  if redis.call('SET', gate, '1', 'PX', {WAKE_GATE_MS}, 'NX') then
    redis.call('PUBLISH', channel, queue)
  end
end
local function pairs_of(fields)
  local flat = {{}}
  for k, v in pairs(fields) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  return flat
end
"""

# Lua for the scripts that write a dead letter, after its ZADD. trim_dead(namespace, cap)
# keeps at most ``cap`` dead letters (0: no cap): past it the oldest go first, index
# entry and kept message, counted in the counters hash. ZCARD is O(1) and ZPOPMIN
# O(log n) per letter that goes, so a write costs no scan. Returns the ids that went.
TRIM_DEAD_LUA = """
local function trim_dead(ns, cap)
  cap = tonumber(cap)
  if cap <= 0 then return {} end
  local index = ns .. ':dead'
  local over = redis.call('ZCARD', index) - cap
  if over <= 0 then return {} end
  local popped = redis.call('ZPOPMIN', index, over)
  local gone = {}
  for j = 1, #popped, 2 do
    gone[#gone + 1] = popped[j]
    redis.call('DEL', index .. ':' .. popped[j])
  end
  redis.call('HINCRBY', ns .. ':counters', 'dead_letters_trimmed', #gone)
  return gone
end
"""


def api_keys_key(namespace: str) -> str:
    """The API keys by name: name → the key's record (JSON, with its hash)."""
    return f"{namespace}:api:keys"


def api_key_hashes_key(namespace: str) -> str:
    """The API keys by hash: SHA-256 of the secret (hex) → the key's record (JSON)."""
    return f"{namespace}:api:key-hashes"


def api_rate_key(namespace: str, name: str) -> str:
    """One API key's token bucket (``worker.api.ratelimit``): tokens and last refill."""
    return f"{namespace}:api:rate:{name}"
