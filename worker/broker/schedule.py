"""The scheduled set: long delays wait in Redis, and due entries go onto their queues.

Jobs with a ``send_at`` (written by producers) and messages put back with a delay
longer than ``SCHEDULE_AFTER_MS`` (broker retries, waits for a budget, jobs of a bulk
message put back) wait in ``{ns}:scheduled`` (message id → due time, ms) with their
encoded message in ``{ns}:scheduled.msgs``, never in a worker's memory. Any worker
releases due entries: one script moves a bounded batch onto their Dramatiq queues the
way an enqueue writes them (hash, then list), and takes each out of the set in the same
step, so a release can neither lose nor duplicate a job, and of two workers (or a
release and a cancel) racing for an entry exactly one gets it. Every script declares
its keys.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis
from dramatiq.message import Message
from redis.typing import EncodableT

from common.keys import (
    QUEUES,
    WAKE_LUA,
    scheduled_key,
    scheduled_messages_key,
    status_key,
    wake_channel,
    wake_gate_key,
)
from worker.broker.keys import (
    acks_key,
    heartbeats_key,
    q_name,
    queue_key,
    queue_messages_key,
)
from worker.broker.scripts import ThreadLocalScript
from worker.clock import iso_millis

__all__ = ["RELEASE_BATCH", "SCHEDULE_AFTER_MS", "Schedule"]

# A delay longer than this waits in the scheduled set. A shorter one is a Dramatiq
# delayed message, held by a worker for at most this long.
SCHEDULE_AFTER_MS = 5_000
# Entries one release script moves: a few milliseconds of Redis' time.
RELEASE_BATCH = 1_000

# KEYS: scheduled set, scheduled hash, and for an ack: heartbeats, the ack set, the
#       queue's hash
# ARGV: entry count, then per entry: message id, due (ms), payload; then for an ack:
#       broker id, redis message id, now (ms)
# Returns how many entries it put in the set.
# Scheduling with the ack is Dramatiq's ack (dispatch.lua "ack") in the same step: a
# retry is never both in the set and still unacknowledged, nor in neither. The ack
# comes first: a message no longer in the ack set was put back on its queue already
# (a reaper took it from a worker it believed dead), so that copy runs again and the
# retry is not scheduled: the job is never there twice.
_SCHEDULE = """
local n = tonumber(ARGV[1])
if KEYS[3] then
  local a = 2 + 3 * n
  redis.call('ZADD', KEYS[3], ARGV[a + 2], ARGV[a])
  if redis.call('SREM', KEYS[4], ARGV[a + 1]) == 0 then return 0 end
  redis.call('HDEL', KEYS[5], ARGV[a + 1])
end
for i = 0, n - 1 do
  local b = 2 + 3 * i
  redis.call('ZADD', KEYS[1], ARGV[b + 1], ARGV[b])
  redis.call('HSET', KEYS[2], ARGV[b], ARGV[b + 2])
end
return n
"""

# KEYS: scheduled set, scheduled hash, then per queue of QUEUES: list, hash, wake gate;
#       then per message id: its job's status record
# ARGV: now (ms), now (ISO 8601), wake channel, the three queue names (high, normal,
#       bulk), then the message ids
# An entry is released when it is still in the set and due. A payload that is not a
# message of one of our queues goes to the normal queue, whose consumer keeps it as a
# poison dead letter: nothing is dropped. A `scheduled` record becomes `queued`.
_RELEASE = (
    WAKE_LUA
    + """
local now = tonumber(ARGV[1])
local slots, names = {}, {}
for q = 0, 2 do
  slots[ARGV[4 + q]] = 3 + 3 * q
  names[3 + 3 * q] = ARGV[4 + q]
end
local released, woken = 0, {}
for i = 7, #ARGV do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) <= now then
    redis.call('ZREM', KEYS[1], id)
    local payload = redis.call('HGET', KEYS[2], id)
    redis.call('HDEL', KEYS[2], id)
    if payload then
      local ok, message = pcall(cjson.decode, payload)
      local queue, rid
      if ok and type(message) == 'table' then
        queue = message.queue_name
        if type(message.options) == 'table' then rid = message.options.redis_message_id end
      end
      local k = slots[queue] or slots[ARGV[5]]
      if type(rid) ~= 'string' or rid == '' then rid = id .. '.' .. ARGV[1] end
      redis.call('HSET', KEYS[k + 1], rid, payload)
      redis.call('RPUSH', KEYS[k], rid)
      woken[k] = true
      local status = KEYS[i + 5]
      if redis.call('HGET', status, 'state') == 'scheduled' then
        redis.call('HSET', status, 'state', 'queued', 'updated_at', ARGV[2])
      end
      released = released + 1
    end
  end
end
for k in pairs(woken) do wake(KEYS[k + 2], ARGV[3], names[k]) end
return released
"""
)

_QUEUES = (QUEUES["high"], QUEUES["normal"], QUEUES["bulk"])


class Schedule:
    """The scheduled set of one namespace, as workers use it.

    Args:
        client: Redis (the broker's).
        namespace: the key namespace.
    """

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self._client = client
        self._ns = namespace
        self._set = scheduled_key(namespace)
        self._messages = scheduled_messages_key(namespace)
        # Both are safe to run twice: the same entry again, a release of what is gone.
        # A scheduled retry goes with its acknowledgement: it waits for [broker]
        # wait_replicas as an ack does. A release does not: one a failover loses leaves
        # its entries in the set, released again; a fetch of them waits, and covers it.
        self._schedule = ThreadLocalScript(client, _SCHEDULE, wait=True)
        self._release = ThreadLocalScript(client, _RELEASE)
        self._queue_keys: list[str] = []
        for queue in _QUEUES:
            self._queue_keys += [
                queue_key(namespace, queue),
                queue_messages_key(namespace, queue),
                wake_gate_key(namespace, queue),
            ]

    @staticmethod
    def takes(delay_ms: int | None) -> bool:
        """Whether a message delayed by ``delay_ms`` waits in the scheduled set."""
        return delay_ms is not None and delay_ms > SCHEDULE_AFTER_MS

    @staticmethod
    def entry(message: Message[Any], due_ms: int) -> tuple[Message[Any], int]:
        """``message`` as it waits: for its own queue, a fresh redis message id."""
        options = {
            k: v for k, v in message.options.items() if k not in ("eta", "traceback")
        }
        options["redis_message_id"] = str(uuid.uuid4())
        copy = message.copy(queue_name=q_name(message.queue_name))
        return Message(**{**copy.asdict(), "options": options}), due_ms

    def add(
        self,
        entries: Sequence[tuple[Message[Any], int]],
        *,
        ack: tuple[str, str, str] | None = None,
    ) -> int:
        """Put ``entries`` (message, due ms) in the set; with ``ack``, acknowledge too.

        ``ack`` is (queue, broker id, redis message id) of the message being
        acknowledged. It is all one script, one round trip. When that message is no
        longer unacknowledged (a reaper put it back on its queue), nothing is added.

        Returns:
            How many entries were added: ``len(entries)``, or 0 for such an ack.
        """
        keys: list[EncodableT] = [self._set, self._messages]
        args: list[EncodableT] = [len(entries)]
        for message, due_ms in entries:
            args += [message.message_id, due_ms, message.encode()]
        if ack is not None:
            queue, broker_id, redis_id = ack
            keys += [
                heartbeats_key(self._ns),
                acks_key(self._ns, broker_id, queue),
                queue_messages_key(self._ns, queue),
            ]
            args += [broker_id, redis_id, int(time.time() * 1000)]
        return int(self._schedule.run(keys, args))

    def due(self, now_ms: int, limit: int = RELEASE_BATCH) -> list[str]:
        """The message ids due by ``now_ms``, soonest first: one read, nothing moved."""
        found = self._client.zrangebyscore(
            self._set, "-inf", now_ms, start=0, num=limit
        )
        return [m.decode() if isinstance(m, bytes) else str(m) for m in found]

    def release(self, ids: Sequence[str], now_ms: int) -> int:
        """Move those of ``ids`` still in the set and due onto their queues.

        Returns:
            How many this call released (the others were released or cancelled by
            someone else, or are not due).
        """
        if not ids:
            return 0
        keys: list[EncodableT] = [self._set, self._messages, *self._queue_keys]
        keys += [status_key(self._ns, i) for i in ids]
        args: list[EncodableT] = [
            now_ms,
            iso_millis(),
            wake_channel(self._ns),
            *_QUEUES,
            *ids,
        ]
        return int(self._release.run(keys, args))

    def release_due(self) -> int:
        """Release everything due now, a batch at a time; return how many were ours."""
        total = 0
        while True:
            now_ms = int(time.time() * 1000)
            ids = self.due(now_ms)
            if ids:
                total += self.release(ids, now_ms)
            if len(ids) < RELEASE_BATCH:
                return total
