"""Scripts declare the keys they touch (KEYS), as Redis asks of every script.

Each script here runs on the real Redis through its own code path, with every
``redis.call`` checked: a key name the script built itself, not given in KEYS, fails
the call. The status write still builds its per-job names from the namespace
(docs/scaling.md lists it); its minute counts must be declared.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from common.keys import action_key, events_key, minute_counts_key
from settings import EventsSettings
from worker import status
from worker.actions import acceptance
from worker.actions.acceptance import Acceptance, Answer, InboundEntry
from worker.actions.verdict import Verdict
from worker.broker import heartbeats
from worker.broker.heartbeats import beat, host_key, hosts_key
from worker.status import StatusStore

# Every key a checked call names (its first argument) must be in KEYS, when it
# matches the Lua pattern given ('' for every key).
_CHECK = """
local declared__ = {}
for _, k in ipairs(KEYS) do declared__[k] = true end
local function checked__(command, key, ...)
  if type(key) == 'string' and string.find(key, PATTERN__) and not declared__[key] then
    error('undeclared key ' .. key)
  end
  return redis.call(command, key, ...)
end
"""


def declared_only(script: str, pattern: str = "") -> str:
    """``script`` with every ``redis.call`` checked for undeclared keys."""
    prelude = _CHECK.replace("PATTERN__", repr(pattern))
    return prelude + script.replace("redis.call(", "checked__(")


def test_the_check_catches_a_name_built_inside_a_script(redis_client, namespace):
    """The check itself: a key built in the script fails, a declared one passes."""
    built = declared_only("return redis.call('INCR', ARGV[1] .. ':n')")
    with pytest.raises(redis.ResponseError, match="undeclared key"):
        redis_client.eval(built, 0, namespace)
    given = declared_only("return redis.call('INCR', KEYS[1])")
    assert redis_client.eval(given, 1, f"{namespace}:n") == 1


def test_the_heartbeat_declares_its_host_record_and_the_hosts(
    monkeypatch, redis_client, namespace
):
    """A beat writes the heartbeats, its host's record and the index of hosts, each
    declared."""
    monkeypatch.setattr(heartbeats, "_BEAT", declared_only(heartbeats._BEAT))
    beat(redis_client, namespace, "host-1", "broker-1", timeout=15)
    assert redis_client.zscore(hosts_key(namespace), "host-1")
    assert redis_client.hexists(host_key(namespace, "host-1"), "broker-1")


def test_the_acceptance_declares_the_record_index_key_and_stream(
    monkeypatch, redis_client, namespace
):
    """An accepted reply (key, inbound record, index, event) and a refused answer
    naming no key both run with every key declared."""
    monkeypatch.setattr(acceptance, "_WRITE", declared_only(acceptance._WRITE))
    writer = Acceptance(
        redis_client, namespace=namespace, events=EventsSettings(), ttl=60
    )
    key = "k" + uuid.uuid4().hex[:20]
    expires = int(time.time() * 1000) + 60_000
    redis_client.hset(
        action_key(namespace, key), mapping={"state": "open", "expires_at": expires}
    )

    def answer(on: str, verdict: Verdict) -> Answer:
        return Answer(
            key=on,
            verdict=verdict,
            job_id="job-1",
            actor="ann@example.org",
            context={},
            via="replies",
            message_id="<m@example.org>",
            received_at="2026-12-02T12:00:00.000+00:00",
        )

    inbound = InboundEntry("<m@example.org>", {"from": "ann@example.org"})
    accepted = answer(key, Verdict("accepted", action="approve", comment="ok"))
    assert writer.write(accepted, inbound) == ("accepted", "")
    assert redis_client.hget(action_key(namespace, key), "state") == b"used"
    refused = writer.write(answer("", Verdict("accepted", action="approve")))
    assert refused == ("refused", "unknown_key")
    events = [e[b"type"] for _, e in redis_client.xrange(events_key(namespace))]
    assert events == [b"action.accepted", b"action.refused"]


def test_the_status_write_declares_its_minute_counts(
    monkeypatch, redis_client, namespace
):
    """A record turning `sent` counts in its minute's hash, declared as a key."""
    monkeypatch.setattr(status, "_WRITE", declared_only(status._WRITE, ":minute:"))
    store = StatusStore(redis_client, namespace=namespace, ttl=60)
    before = time.time() // 60
    store.write("job-1", {"state": "sent"}, event={"event": "sent"})
    minutes = {int(before), int(time.time() // 60)}
    counted = [
        redis_client.hget(minute_counts_key(namespace, m), "sent") for m in minutes
    ]
    assert sum(int(c or 0) for c in counted) == 1
