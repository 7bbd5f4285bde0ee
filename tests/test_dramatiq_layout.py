"""The Dramatiq internals ``worker/broker/`` mirrors are still the installed Dramatiq's.

The key layout is checked twice: against what Dramatiq's own broker writes in Redis,
and against the text of its ``dispatch.lua``. The code we copied is checked by a hash
of its source, so that a Dramatiq upgrade turns a silent break into a red test.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from pathlib import Path

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer

from common.keys import queue_key, queue_messages_key
from worker.broker.heartbeats import beat
from worker.broker.keys import LUA, acks_key, delayed, dq_name, heartbeats_key, q_name

DISPATCH = Path(dramatiq.__file__).parent / "brokers" / "redis" / "dispatch.lua"

# sha256 of ``inspect.getsource(_RedisConsumer.__next__)`` in the Dramatiq we pinned.
# ``SafeConsumer._take`` is a modified copy: when this changes, compare the two again,
# then record the new hash.
NEXT_SOURCE_SHA256 = "b8245bc4ab8044d67d72216baca5e5be0d07fccce15c443a5887b6397c9906e1"


def _lua_text() -> str:
    return " ".join(DISPATCH.read_text().split())


def test_dramatiqs_own_broker_writes_the_keys_we_name(redis_client, namespace):
    """A message fetched by Dramatiq's own broker sits under the keys ``worker.broker.keys``
    names: the queue hash, the ack set of the fetching worker, the heartbeat set."""
    broker = RedisBroker(client=redis_client, namespace=namespace)
    try:
        broker.declare_queue("mail")

        @dramatiq.actor(broker=broker, queue_name="mail")
        def noop() -> None:
            """Never runs: the test only enqueues and fetches."""

        message = noop.send()
        redis_id = message.options["redis_message_id"]
        assert redis_client.lrange(queue_key(namespace, "mail"), 0, -1) == [
            redis_id.encode()
        ]
        assert redis_client.hexists(queue_messages_key(namespace, "mail"), redis_id)
        consumer = broker.consume("mail", prefetch=1, timeout=100)
        try:
            fetched = next(consumer)
            deadline = time.monotonic() + 5
            while fetched is None and time.monotonic() < deadline:
                fetched = next(consumer)
            assert fetched is not None
            acks = acks_key(namespace, broker.broker_id, "mail")
            assert redis_client.smembers(acks) == {redis_id.encode()}
            score = redis_client.zscore(heartbeats_key(namespace), broker.broker_id)
            assert score is not None
            consumer.ack(fetched)
            assert not redis_client.sismember(acks, redis_id)
            assert not redis_client.hexists(
                queue_messages_key(namespace, "mail"), redis_id
            )
        finally:
            consumer.close()
    finally:
        broker.close()


def test_dispatch_lua_spells_the_keys_and_the_ack_we_mirror():
    """dispatch.lua still names acks, heartbeats, queues and message hashes as our Lua
    prelude does, and still acknowledges as ``dramatiq_ack`` does."""
    lua = _lua_text()
    for pattern in (
        'local acks = namespace .. ":__acks__." .. worker_id',
        'local queue_acks = acks .. "." .. queue_name',
        'local heartbeats = namespace .. ":__heartbeats__"',
        'local queue_full_name = namespace .. ":" .. queue_name',
        'local queue_messages = queue_full_name .. ".msgs"',
        'if redis.call("srem", queue_acks, message_id) > 0 then',
    ):
        assert pattern in lua, f"dispatch.lua no longer has: {pattern}"
    prelude = " ".join(LUA.split())
    for ours in (
        "ns .. ':__acks__.' .. broker .. '.' .. queue",
        "ns .. ':__heartbeats__'",
        "ns .. ':' .. queue .. '.msgs'",
        "redis.call('SREM', acks_key(ns, broker, queue), rid) > 0",
        "redis.call('HDEL', messages_key(ns, queue), rid)",
    ):
        assert ours in prelude


def test_the_delay_queue_names_are_dramatiqs():
    """Delay queues end in ``.DQ``, as ``dramatiq.common`` names them."""
    assert dq_name("mail") == "mail.DQ"
    assert q_name("mail.DQ") == "mail"
    assert delayed("mail.DQ")
    assert not delayed("mail")


def test_our_heartbeat_is_one_dramatiqs_maintenance_reads(redis_client, namespace):
    """``beat`` writes this process into the heartbeat set Dramatiq's dispatch.lua reads."""
    beat(redis_client, namespace, "host-1", "broker-1", timeout=15)
    assert redis_client.zscore(heartbeats_key(namespace), "broker-1") is not None


def test_the_consumer_we_copied_is_unchanged():
    """``_RedisConsumer.__next__`` is the one ``SafeConsumer._take`` was copied from, and
    the private attributes the consumer uses still exist."""
    source = inspect.getsource(_RedisConsumer.__next__)
    digest = hashlib.sha256(source.encode()).hexdigest()
    assert digest == NEXT_SOURCE_SHA256, (
        "Dramatiq's _RedisConsumer.__next__ changed: compare it with "
        "SafeConsumer._take, then record the new hash"
    )
    init = inspect.getsource(_RedisConsumer.__init__)
    for name in ("message_cache", "queued_message_ids", "misses", "prefetch"):
        assert f"self.{name}" in init, name
    assert isinstance(
        inspect.getattr_static(_RedisConsumer, "outstanding_message_count"), property
    )


@pytest.mark.parametrize("name", ["scripts", "broker_id", "namespace", "client"])
def test_the_broker_attributes_we_use_exist(redis_client, name):
    """``MailBroker`` reads these attributes of Dramatiq's ``RedisBroker``."""
    broker = RedisBroker(client=redis_client, namespace="mwtest-attrs")
    try:
        assert hasattr(broker, name)
        assert "dispatch" in broker.scripts
    finally:
        broker.close()
