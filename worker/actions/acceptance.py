"""The one script that writes an action's outcome: the key's state, its event, its record.

Replies (``replies.ActionReplies``) and links (``web``) both accept through it. It checks
the key's state and expiry again: of two answers racing for one key (two replies, a
reply and a link, two POSTs), exactly one is accepted, the other refused ``used``. The
key's new state and the ``action.*`` event are one step, with the inbound record of a
reply when there is one (DESIGN §9).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
import redis
from redis.typing import EncodableT

from common.keys import action_key, events_key, inbound_index_key, inbound_key
from settings import EventsSettings
from worker.actions.verdict import Verdict
from worker.broker.scripts import ThreadLocalScript

__all__ = ["Acceptance", "Answer", "InboundEntry", "Written"]

Written = Literal["accepted", "refused", "duplicate"]

# KEYS: the inbound record (a name never written when there is none), the inbound
#       index, the action key (likewise), the events stream
# ARGV: has a record ("1"/""), message key, ttl, now (ms), 2n, n field/value pairs; has
#       an action key ("1"/""), verdict, reason; the stream's max length, emit accepted
#       ("1"/"0"), emit refused, event id, job id, at, accepted data, refused data
#       without its "}"; then the key's new fields: action, actor, comment, message id,
#       via.
_WRITE = """
local record, index, key, stream = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local has_record, mkey, ttl, now = ARGV[1] == '1', ARGV[2], ARGV[3], tonumber(ARGV[4])
if has_record and redis.call('EXISTS', record) == 1 then return {'duplicate', ''} end
local n = tonumber(ARGV[5])
local i = 6 + n
local has_key, verdict, reason = ARGV[i] == '1', ARGV[i + 1], ARGV[i + 2]
if verdict == 'accepted' then
  local state = false
  if has_key then state = redis.call('HGET', key, 'state') end
  if not state then verdict, reason = 'refused', 'unknown_key'
  elseif state == 'used' or state == 'closed' then verdict, reason = 'refused', state
  elseif tonumber(redis.call('HGET', key, 'expires_at') or '0') <= now then
    verdict, reason = 'refused', 'expired'
  end
end
local maxlen, at = ARGV[i + 3], ARGV[i + 8]
if verdict == 'accepted' then
  redis.call('HSET', key, 'state', 'used', 'action', ARGV[i + 11], 'actor', ARGV[i + 12],
             'comment', ARGV[i + 13], 'message_id', ARGV[i + 14], 'used_at', at,
             'via', ARGV[i + 15])
  if ARGV[i + 4] == '1' then
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'type', 'action.accepted',
               'id', ARGV[i + 6], 'job_id', ARGV[i + 7], 'at', at, 'data', ARGV[i + 9])
  end
elseif ARGV[i + 5] == '1' then
  local data = ARGV[i + 10] .. ',"reason":"' .. reason .. '"}'
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'type', 'action.refused',
             'id', ARGV[i + 6], 'job_id', ARGV[i + 7], 'at', at, 'data', data)
end
if has_record then
  redis.call('HSET', record, unpack(ARGV, 6, 5 + n))
  redis.call('HSET', record, 'outcome', verdict, 'reason', reason)
  redis.call('EXPIRE', record, ttl)
  redis.call('ZADD', index, now, mkey)
end
return {verdict, reason}
"""


@dataclass(frozen=True, slots=True)
class InboundEntry:
    """A reply's inbound record, written with its outcome (``mailworker inbound list``).

    Attributes:
        key: the message's record key (its Message-ID, else a digest).
        fields: the record's fields; the script adds ``outcome`` and ``reason``.
    """

    key: str
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer to a key, as decided, to be written.

    Attributes:
        key: the action key ("" when the answer names none that is well formed).
        verdict: what the rules decided (the script may still refuse it).
        job_id: the key's job ("" when unknown).
        actor: who acted: the reply's sender, or the key's recipient for a link.
        context: the job's ``action_context``.
        via: the inbound source's name, or ``link``.
        message_id: the reply's Message-ID (None for a link).
        received_at: when it came (ISO 8601).
    """

    key: str
    verdict: Verdict
    job_id: str
    actor: str
    context: dict[str, Any]
    via: str
    message_id: str | None
    received_at: str


class Acceptance:
    """Writes answers to action keys with the one script.

    Args:
        client: the broker's Redis.
        namespace: the workers' namespace.
        events: which event types go on the stream, and its length.
        ttl: how long an inbound record is kept (``status.ttl``), in seconds.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str,
        events: EventsSettings,
        ttl: float,
    ) -> None:
        self._ns = namespace
        self._events = events
        self._ttl = int(ttl)
        # A reply's write is safe to repeat (its inbound record says "done"); an answer
        # without one is not (a second run would be refused `used`), so its lost reply
        # is raised instead.
        self._once = ThreadLocalScript(client, _WRITE, wait=True)
        self._bare = ThreadLocalScript(client, _WRITE, idempotent=False, wait=True)

    def write(
        self, answer: Answer, inbound: InboundEntry | None = None
    ) -> tuple[Written, str]:
        """Write ``answer`` (and ``inbound``): the outcome and reason it got.

        The outcome is ``accepted``, ``refused``, or ``duplicate`` when ``inbound``'s
        record was written meanwhile (nothing else was written then).

        Raises:
            redis.RedisError: Redis did not answer; nothing or everything was written.
        """
        script = self._bare if inbound is None else self._once
        none = f"{self._ns}:none"  # in the namespace's slot, never written
        keys = [
            inbound_key(self._ns, inbound.key) if inbound is not None else none,
            inbound_index_key(self._ns),
            action_key(self._ns, answer.key) if answer.key else none,
            events_key(self._ns),
        ]
        outcome, reason = script.run(keys, self._args(answer, inbound))
        return cast(Written, outcome.decode()), reason.decode()

    def _args(self, answer: Answer, inbound: InboundEntry | None) -> list[EncodableT]:
        verdict = answer.verdict
        common = {
            "actor": answer.actor,
            "context": answer.context,
            "received_at": answer.received_at,
            "message_id": answer.message_id,
            "via": answer.via,
        }
        accepted = {"action": verdict.action, "comment": verdict.comment, **common}
        refused = {"action": verdict.action or None, **common}
        types = self._events.types
        fields = inbound.fields if inbound is not None else {}
        return [
            "1" if inbound is not None else "",
            inbound.key if inbound is not None else "",
            self._ttl,
            int(time.time() * 1000),
            len(fields) * 2,
            *[item for pair in fields.items() for item in pair],
            "1" if answer.key else "",
            verdict.outcome,
            verdict.reason,
            self._events.max_len,
            "1" if "action.accepted" in types else "0",
            "1" if "action.refused" in types else "0",
            uuid.uuid4().hex,
            answer.job_id,
            answer.received_at,
            orjson.dumps(accepted),
            orjson.dumps(refused)[:-1],
            verdict.action,
            answer.actor,
            verdict.comment,
            answer.message_id or "",
            answer.via,
        ]
