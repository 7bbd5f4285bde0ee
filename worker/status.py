"""Status records and the delivery marker, each write one Redis round trip."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
import structlog
from redis.typing import EncodableT

from common.keys import (
    MINUTE_COUNTS_TTL,
    QUEUES,
    TRIM_DEAD_LUA,
    history_key,
    minute_counts_key,
    queue_messages_key,
    scheduled_key,
    status_key,
)
from settings import EventsSettings, StatusSettings
from settings.models import EventType
from worker.broker.attached import PackedWrite
from worker.broker.envelope import JobRef, message_id_of
from worker.broker.keys import LUA, dq_name
from worker.broker.scripts import ThreadLocalScript
from worker.clock import iso_millis
from worker.records import (
    Counts,
    ErrorRecord,
    RecipientRecord,
    RecordFields,
    SkipRecord,
    StatusRecord,
)

__all__ = [
    "Counts",
    "DeadTrims",
    "ErrorRecord",
    "JobStart",
    "RecipientRecord",
    "RecordFields",
    "SkipRecord",
    "StatusRecord",
    "StatusStore",
    "now_iso",
]

log = structlog.get_logger("mailworker.status")

_JSON_FIELDS = ("error", "recipients", "counts", "skipped", "metadata")
_INT_FIELDS = ("attempts",)

# Writes many records and, optionally, acknowledges the broker message they came in.
# Key names are derived from the namespace as in common/keys.py (status_key & co.).
# KEYS: this minute's counts (``minute_counts_key`` of ARGV's now)
# ARGV: namespace, ttl, now (ms), events' max length, dead letters' cap (0: none),
#       record count, then per record:
#       job id, history entry ("" none), dead payload ("" none), guard ("1": skipped
#       when the job is `sent`), its ttl ("" the store's: a record written long before
#       its job runs is kept longer), event type ("" none), event id, event time,
#       event data,
#       n, n field/value arguments, m, m accepted recipients to add to the marker; then,
#       for an ack: queue, broker id, message id.
# An outcome's event is added to the events stream with its record, or not at all.
# A record that turns `sent`, `retrying` or `dead` counts in that minute's hash
# (``common.keys.minute_counts_key``), which the console's chart reads.
# The ack is Dramatiq's own (dispatch.lua "ack"), so it lands in the same round trip.
# A dead letter past the cap trims the oldest in the same step (TRIM_DEAD_LUA); the
# reply is the ids of those that went.
_WRITE = (
    LUA
    + f"local MINUTE_TTL = {MINUTE_COUNTS_TTL}\n"
    + TRIM_DEAD_LUA
    + """
local ns, ttl, now, maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local cap, count = ARGV[5], tonumber(ARGV[6])
local trimmed = {}
local i = 7
local tallies = {}
for _ = 1, count do
  local id, event, dead, guard = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local keep = ARGV[i + 4]
  if keep == '' then keep = ttl end
  local etype = ARGV[i + 5]
  local e = i + 6
  local n = tonumber(ARGV[i + 9])
  local key = ns .. ':job:' .. id
  i = i + 10
  local first, last = i, i + n - 1
  i = i + n
  local m = tonumber(ARGV[i])
  i = i + 1
  -- A job that was sent never dies, nor goes back to `queued` (a bulk message Dramatiq
  -- gave up on after it, or that a stopping worker hands back).
  local old = redis.call('HGET', key, 'state')
  if guard == '' or old ~= 'sent' then
    local new = old
    for j = first, last - 1, 2 do
      if ARGV[j] == 'state' then new = ARGV[j + 1] end
    end
    redis.call('HSET', key, unpack(ARGV, first, last))
    -- The console's per-minute counts: outcomes, each counted when the state changes.
    if new ~= old and (new == 'sent' or new == 'retrying' or new == 'dead') then
      tallies[new] = (tallies[new] or 0) + 1
    end
    redis.call('EXPIRE', key, keep)
    if m > 0 then
      redis.call('SADD', key .. ':accepted', unpack(ARGV, i, i + m - 1))
      redis.call('EXPIRE', key .. ':accepted', keep)
    end
    if event ~= '' then
      redis.call('RPUSH', key .. ':history', event)
      redis.call('EXPIRE', key .. ':history', keep)
    end
    if dead ~= '' then
      redis.call('SET', ns .. ':dead:' .. id, dead, 'EX', ttl)
      redis.call('ZADD', ns .. ':dead', now, id)
      redis.call('ZREMRANGEBYSCORE', ns .. ':dead', '-inf', now - tonumber(ttl) * 1000)
      for _, gone in ipairs(trim_dead(ns, cap)) do trimmed[#trimmed + 1] = gone end
    end
    if etype ~= '' then
      redis.call('XADD', ns .. ':events', 'MAXLEN', '~', maxlen, '*', 'type', etype,
                 'id', ARGV[e], 'job_id', id, 'at', ARGV[e + 1], 'data', ARGV[e + 2])
    end
  end
  i = i + m
end
local minute = KEYS[1]
for kind, n in pairs(tallies) do
  if redis.call('HINCRBY', minute, kind, n) == n then
    redis.call('EXPIRE', minute, MINUTE_TTL)
  end
end
if ARGV[i] then
  local queue, broker, rid = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  redis.call('ZADD', heartbeats_key(ns), now, broker)
  dramatiq_ack(ns, broker, queue, rid)
end
return trimmed
"""
)

# ARGV: namespace, ttl, now, then per job: job id, attempt, queue, redis message id.
# Reads each job's earlier state and marker, then marks it `sending` (a job already
# `sent` stays so: it is done). The jobs of a bulk message share their broker message,
# whose redelivery count is read once. The last reply is the suppression list's size:
# only when it is not empty do jobs look their recipients up in it.
_BEGIN = """
local ns, ttl, now = ARGV[1], ARGV[2], ARGV[3]
local out, counts = {}, {}
for i = 4, #ARGV, 4 do
  local id, attempt, queue, rid = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = ns .. ':job:' .. id
  local old = redis.call('HMGET', key, 'state', 'attempts', 'recipients', 'created_at')
  if rid == '' then rid = '-' end
  if counts[rid] == nil then counts[rid] = redis.call('HGET', ns .. ':redeliveries', rid) end
  local accepted = redis.call('SMEMBERS', key .. ':accepted')
  if old[1] ~= 'sent' then
    redis.call('HSET', key, 'id', id, 'state', 'sending', 'attempts', attempt,
               'queue', queue, 'updated_at', now, 'reason', '', 'created_at', old[4] or now)
    redis.call('EXPIRE', key, ttl)
  end
  out[#out + 1] = {old[1], old[2], old[3], counts[rid], accepted}
end
out[#out + 1] = redis.call('HLEN', ns .. ':suppressed')
return out
"""


class DeadTrims:
    """Says which dead letters went to keep ``status.max_dead_letters``.

    One ``dead_letters_trimmed`` line at first, then at most one every ``every`` seconds
    with the count since the last (at the cap every new dead letter trims one: a line
    each would double the log of a failure storm). ``{ns}:counters`` has every one.
    """

    def __init__(self, cap: int, *, every: float = 10.0) -> None:
        self.cap = cap
        self._every = every
        self._lock = threading.Lock()
        self._unsaid = 0
        self._sample: list[str] = []
        self._said_at = -math.inf

    def note(self, ids: list[bytes]) -> None:
        """Count trimmed ``ids``; write the line when it is due."""
        now = time.monotonic()
        with self._lock:
            self._unsaid += len(ids)
            self._sample = (self._sample + [i.decode() for i in ids])[:10]
            if now - self._said_at < self._every:
                return
            count, sample = self._unsaid, self._sample
            self._unsaid, self._sample, self._said_at = 0, [], now
        log.warning(
            "dead_letters_trimmed",
            count=count,
            max_dead_letters=self.cap,
            job_ids=sample,
        )


def now_iso() -> str:
    """The current time as ISO 8601 UTC with milliseconds.

    The form is ``...T12:00:00.123+00:00``, as ``datetime.isoformat`` writes it.
    """
    return iso_millis()


class JobStart:
    """What an attempt needs to know before it sends: the marker and earlier outcomes."""

    __slots__ = (
        "accepted",
        "previous_attempts",
        "previous_state",
        "recipients",
        "redeliveries",
        "suppressing",
    )

    def __init__(
        self,
        accepted: set[str],
        recipients: list[RecipientRecord],
        *,
        previous_state: str = "",
        previous_attempts: int = 0,
        redeliveries: int = 0,
        suppressing: bool = False,
    ) -> None:
        self.accepted = accepted
        self.recipients = recipients
        self.previous_state = previous_state
        self.previous_attempts = previous_attempts
        self.redeliveries = redeliveries
        # The suppression list had entries when the job began: look its recipients up.
        self.suppressing = suppressing

    def in_doubt(self, attempt: int) -> bool:
        """True when this attempt already ran and its process died while sending.

        A server may then have accepted the message without the marker saying so.
        """
        return self.previous_state == "sending" and self.previous_attempts == attempt

    @property
    def refused(self) -> set[str]:
        """Recipients refused for good by an earlier attempt."""
        return {r["address"] for r in self.recipients if r.get("state") == "refused"}


class StatusStore:
    """Reads and writes status records, the attempt history and the delivery marker.

    Args:
        client: a Redis client (bytes replies).
        namespace: the key prefix shared with producers.
        ttl: seconds a record, its history and its marker are kept.
        events: the ``[events]`` settings (which types, the stream's length).
        max_dead_letters: at most this many dead letters, the oldest going first
            (``status.max_dead_letters``; 0: no cap).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str,
        ttl: float,
        events: EventsSettings | None = None,
        max_dead_letters: int = StatusSettings().max_dead_letters,
    ) -> None:
        self._client = client
        self._ns = namespace
        self._ttl = int(ttl)
        self._max_dead = max_dead_letters
        self._trims = DeadTrims(max_dead_letters)
        events = events or EventsSettings()
        self._event_types = frozenset(events.types)
        self._events_max_len = events.max_len
        self._lock = threading.Lock()
        self._prefetched: dict[tuple[str, str], tuple[float, JobStart]] = {}
        self._write = ThreadLocalScript(client, _WRITE, wait=True)
        self._begin = ThreadLocalScript(client, _BEGIN)

    def begin(self, job: JobRef) -> JobStart:
        """Mark the job ``sending`` and read its marker and earlier outcomes.

        Costs nothing when the consumer already did it for the whole fetched batch
        (``prefetch``). Otherwise it costs one round trip.
        """
        with self._lock:
            ready = self._prefetched.pop((job.id, job.redis_id), None)
        if ready is not None:
            return ready[1]
        return self.begin_many([job])[(job.id, job.redis_id)]

    def begin_many(self, jobs: list[JobRef]) -> dict[tuple[str, str], JobStart]:
        """``begin`` for many jobs: one round trip."""
        args: list[EncodableT] = [self._ns, self._ttl, now_iso()]
        for job in jobs:
            args.extend(job)
        *replies, suppressed = self._begin(*args)
        out = {}
        for job, reply in zip(jobs, replies, strict=True):
            state, attempts, recipients, redeliveries, accepted = reply
            out[(job.id, job.redis_id)] = JobStart(
                {a.decode() for a in accepted},
                orjson.loads(recipients) if recipients else [],
                previous_state=state.decode() if state else "",
                previous_attempts=int(attempts or 0),
                redeliveries=int(redeliveries or 0),
                suppressing=bool(suppressed),
            )
        return out

    def prefetch(self, jobs: list[JobRef]) -> None:
        """``begin`` now, in one round trip, for jobs a consumer has just fetched.

        Their ``begin`` calls then cost nothing. Entries not used within 5 minutes are
        dropped.
        """
        now = time.monotonic()
        started = self.begin_many(jobs)
        with self._lock:
            stale = [k for k, (at, _) in self._prefetched.items() if now - at > 300]
            for key in stale:
                del self._prefetched[key]
            for key, start in started.items():
                self._prefetched[key] = (now, start)

    def unbegin(self, jobs: list[JobRef]) -> None:
        """Jobs begun by a prefetch but handed back unstarted are `queued` again."""
        if jobs:
            self.write_many(self.unbegin_writes(jobs))

    def unbegin_writes(self, jobs: list[JobRef]) -> list[PackedWrite]:
        """``unbegin``'s writes, to be applied later (with a message's ack)."""
        with self._lock:
            for job in jobs:
                self._prefetched.pop((job.id, job.redis_id), None)
        return [
            self.pack(job.id, {"state": "queued", "attempts": job.attempt - 1})
            for job in jobs
        ]

    def prefetched(self, job: JobRef) -> bool:
        """Whether ``begin`` for this job and broker message is already done."""
        with self._lock:
            return (job.id, job.redis_id) in self._prefetched

    def write(
        self,
        job_id: str,
        fields: RecordFields,
        *,
        accepted: list[str] | None = None,
        event: Mapping[str, Any] | None = None,
        dead_payload: bytes | None = None,
        outcome: tuple[EventType, Mapping[str, Any]] | None = None,
    ) -> None:
        """Write one attempt's outcome in one round trip.

        It updates the record, adds to the marker, appends a history entry and, for a job
        that died, keeps its message as a dead letter.
        """
        self.write_many(
            [
                self.pack(
                    job_id,
                    fields,
                    accepted=accepted,
                    event=event,
                    dead_payload=dead_payload,
                    outcome=outcome,
                )
            ]
        )

    def pack(
        self,
        job_id: str,
        fields: RecordFields,
        *,
        accepted: list[str] | None = None,
        event: Mapping[str, Any] | None = None,
        dead_payload: bytes | None = None,
        outcome: tuple[EventType, Mapping[str, Any]] | None = None,
        keep_for: float | None = None,
    ) -> PackedWrite:
        """``write``'s arguments, ready for ``write_many`` (or to ride along with an ack).

        ``outcome`` is the event (type, data) that goes on the events stream with the
        record, unless ``[events] types`` leaves that type out. ``keep_for`` is how
        many seconds the record (its history, its marker) is kept from now, when that
        is not the store's ``ttl`` (a job scheduled far ahead).
        """
        now = now_iso()
        pairs: list[EncodableT] = ["updated_at", now]
        for name, value in fields.items():
            pairs.append(name)
            if name in _JSON_FIELDS:
                pairs.append(orjson.dumps(value))
            else:
                pairs.append("" if value is None else str(value))
        marker = accepted or ()
        guarded = dead_payload is not None or fields.get("state") == "queued"
        if outcome is not None and outcome[0] in self._event_types:
            kind, data = outcome
            stream: list[EncodableT] = [kind, uuid.uuid4().hex, now, orjson.dumps(data)]
        else:
            stream = ["", "", "", ""]
        return [
            job_id,
            orjson.dumps({"at": now, **event}) if event is not None else "",
            dead_payload if dead_payload is not None else "",
            "1" if guarded else "",
            "" if keep_for is None else max(1, int(keep_for)),
            *stream,
            len(pairs),
            *pairs,
            len(marker),
            *marker,
        ]

    def write_many(
        self, writes: list[PackedWrite], *, ack: tuple[str, str, str] | None = None
    ) -> None:
        """Apply packed writes and, with ``ack``, acknowledge that broker message.

        ``ack`` is (queue, broker id, redis message id). All of it is one script, one
        round trip.
        """
        now_ms = int(time.time() * 1000)
        args: list[EncodableT] = [
            self._ns,
            self._ttl,
            now_ms,
            self._events_max_len,
            self._max_dead,
            len(writes),
        ]
        for packed in writes:
            args.extend(packed)
        if ack is not None:
            args.extend(ack)
        # The minute of the same `now` the script counts at, declared as a key.
        minute = minute_counts_key(self._ns, now_ms // 60_000)
        trimmed = self._write.run([minute], args)
        if trimmed:
            self._trims.note(trimmed)

    def get(self, job_id: str) -> StatusRecord | None:
        """The job's status record, or None when the id is unknown or expired.

        A job still on a queue with no record (enqueued by a wire-format producer) is
        reported ``queued``.
        """
        key = status_key(self._ns, job_id)
        with self._client.pipeline(transaction=False) as pipe:
            pipe.hgetall(key)
            pipe.lrange(history_key(self._ns, job_id), 0, -1)
            raw, history = pipe.execute()
        if not raw:
            return self._queued_without_record(job_id)
        record = _decode(raw)
        record["history"] = [orjson.loads(h) for h in history]
        return record

    def get_many(
        self, job_ids: Sequence[str], *, chunk: int = 500
    ) -> list[StatusRecord | None]:
        """The records of many jobs, ``chunk`` of them a round trip; None where none is.

        Unlike ``get``, a job without a record is not looked for on the queues: this is
        for lists of jobs that have ended (the dead letters).
        """
        out: list[StatusRecord | None] = []
        for start in range(0, len(job_ids), chunk):
            part = job_ids[start : start + chunk]
            with self._client.pipeline(transaction=False) as pipe:
                for job_id in part:
                    pipe.hgetall(status_key(self._ns, job_id))
                    pipe.lrange(history_key(self._ns, job_id), 0, -1)
                replies = pipe.execute()
            for raw, history in zip(replies[::2], replies[1::2], strict=True):
                if not raw:
                    out.append(None)
                    continue
                record = _decode(raw)
                record["history"] = [orjson.loads(h) for h in history]
                out.append(record)
        return out

    def _queued_without_record(self, job_id: str) -> StatusRecord | None:
        needle = job_id.encode()
        due = self._client.zscore(scheduled_key(self._ns), job_id)
        if due is not None:  # a wire producer's scheduled job
            send_at = datetime.fromtimestamp(due / 1000, UTC)
            return _decode(
                {
                    b"id": needle,
                    b"state": b"scheduled",
                    b"send_at": send_at.isoformat(timespec="milliseconds").encode(),
                }
            )
        for queue in QUEUES.values():
            for name in (queue, dq_name(queue)):
                for _, payload in self._client.hscan_iter(
                    queue_messages_key(self._ns, name)
                ):
                    if needle in payload and message_id_of(payload) == job_id:
                        return _decode(
                            {
                                b"id": needle,
                                b"state": b"queued",
                                b"queue": queue.encode(),
                            }
                        )
        return None


def _decode(raw: Mapping[bytes, bytes]) -> StatusRecord:
    data = {k.decode(): v.decode() for k, v in raw.items()}

    def parsed(name: str, empty: Any) -> Any:
        return orjson.loads(data[name]) if data.get(name) else empty

    return {
        "id": data.get("id", ""),
        "state": data.get("state", "queued"),
        "service": data.get("service") or None,
        "attempts": int(data.get("attempts") or 0),
        "error": parsed("error", None),
        "reason": data.get("reason") or None,
        "recipients": parsed("recipients", []),
        "counts": parsed("counts", None),
        "partial": data.get("partial") == "True",
        "skipped": parsed("skipped", []),
        "message_id": data.get("message_id") or None,
        "queue": data.get("queue") or None,
        "created_at": data.get("created_at") or None,
        "updated_at": data.get("updated_at") or None,
        "next_attempt_at": data.get("next_attempt_at") or None,
        "dead_at": data.get("dead_at") or None,
        "send_at": data.get("send_at") or None,
        "metadata": parsed("metadata", {}),
    }
