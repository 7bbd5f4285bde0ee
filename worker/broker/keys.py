"""Dramatiq's Redis key layout, named once for Python and for our Lua scripts.

Dramatiq writes these keys in ``dramatiq/brokers/redis/dispatch.lua``. We read and
write some of them ourselves (acknowledging with a status write, taking back a dead
worker's messages). ``tests/test_dramatiq_layout.py`` reads the installed Dramatiq and
fails when the layout mirrored here changes.
"""

from __future__ import annotations

from dramatiq.common import dq_name, q_name

from common.keys import queue_key, queue_messages_key

__all__ = [
    "LUA",
    "acks_key",
    "delayed",
    "dq_name",
    "heartbeats_key",
    "q_name",
    "queue_key",
    "queue_messages_key",
]


def acks_key(namespace: str, broker_id: str, queue: str) -> str:
    """The set of message ids a worker process fetched from ``queue`` and has not acked."""
    return f"{namespace}:__acks__.{broker_id}.{queue}"


def heartbeats_key(namespace: str) -> str:
    """The sorted set of broker id → last heartbeat (ms) of every worker process."""
    return f"{namespace}:__heartbeats__"


def delayed(queue: str) -> bool:
    """Whether ``queue`` is a delay queue (retries and waits not yet due)."""
    return dq_name(queue) == queue


# The same names for Lua. A script that needs them starts with this prelude.
LUA = """
local function queue_key(ns, queue) return ns .. ':' .. queue end
local function messages_key(ns, queue) return ns .. ':' .. queue .. '.msgs' end
local function acks_key(ns, broker, queue) return ns .. ':__acks__.' .. broker .. '.' .. queue end
local function heartbeats_key(ns) return ns .. ':__heartbeats__' end
-- Dramatiq's ack (dispatch.lua "ack"): the message leaves the ack set, then its hash.
local function dramatiq_ack(ns, broker, queue, rid)
  if redis.call('SREM', acks_key(ns, broker, queue), rid) > 0 then
    redis.call('HDEL', messages_key(ns, queue), rid)
  end
end
"""
