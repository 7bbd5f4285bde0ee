"""Inbound records and the bounce's effects, written together in one Redis transaction.

A message's record is keyed by its Message-ID (else a digest of it). The record, the
job's recipient and history, the ``delivery.bounced`` event and the suppression entry
are one ``MULTI``: all of them or none. A record that exists already means the message
was handled before: nothing is written again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

import orjson
import redis
from redis.typing import EncodableT

from common.keys import (
    events_key,
    history_key,
    inbound_index_key,
    inbound_key,
    status_key,
    suppressed_key,
)
from settings import EventsSettings
from worker.broker.scripts import ThreadLocalScript
from worker.clock import iso_millis
from worker.inbound.model import Handled, InboundUnavailableError
from worker.inbound.suppression import entry, normal
from worker.records import RecipientRecord, counts

__all__ = ["InboundRecord", "InboundStore", "JobView", "Plan"]


class InboundRecord(TypedDict):
    """One line of ``mailworker inbound list``."""

    received_at: str
    source: str
    message_id: str | None
    kind: str
    outcome: str
    reason: str
    job_id: str | None


@dataclass(frozen=True, slots=True)
class JobView:
    """What the bounce handling reads of a job: its recipients and who sent it."""

    recipients: list[RecipientRecord]
    service: str | None


@dataclass(slots=True)
class Plan:
    """What handling a message writes, besides its own record."""

    handled: Handled
    recipients: list[RecipientRecord] | None = None  # the job's, updated
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # delivery.bounced data
    suppress: list[tuple[str, str]] = field(default_factory=list)  # (address, reason)


class InboundStore:
    """Reads jobs for the handler and writes what a message did, once.

    Args:
        client: a Redis client (bytes replies).
        namespace: the key prefix shared with producers.
        ttl: seconds an inbound record is kept (``[status] ttl``).
        events: which event types go on the stream, and its length.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str,
        ttl: float,
        events: EventsSettings | None = None,
    ) -> None:
        self._client = client
        self._ns = namespace
        self._ttl = int(ttl)
        self._events = events or EventsSettings()
        self._read = ThreadLocalScript(client, _READ)
        self._write = ThreadLocalScript(client, _WRITE, wait=True)

    def job(self, job_id: str) -> JobView | None:
        """The job's recipients and service, or None when it is unknown or expired.

        Raises:
            InboundUnavailableError: Redis did not answer.
        """
        try:
            fields = self._client.hmget(status_key(self._ns, job_id), _JOB_FIELDS)
        except redis.RedisError as exc:
            raise InboundUnavailableError(f"cannot read job: {exc}") from None
        return _job_view(fields)

    def previous(self, key: str) -> Handled | None:
        """The outcome recorded for a message key, or None when it is new.

        Raises:
            InboundUnavailableError: Redis did not answer.
        """
        try:
            raw = self._client.hgetall(inbound_key(self._ns, key))
        except redis.RedisError as exc:
            raise InboundUnavailableError(f"cannot read record: {exc}") from None
        return _handled(key, raw) if raw else None

    def record(
        self,
        key: str,
        source: str,
        job_id: str | None,
        plan_for: Callable[[JobView | None], Plan],
    ) -> Handled:
        """Work out the plan for message ``key`` against job ``job_id`` as it is now; write it once.

        One script reads the message's record and the job; ``plan_for`` decides on
        what it read; one script writes the plan only if the message is still new and
        the job's recipients unchanged. Else it reads and decides again (a worker's
        write, another bounce came between), so a decision is always made on what is
        written.

        Raises:
            InboundUnavailableError: nothing was written; the source must try again.
        """
        try:
            for _ in range(_ATTEMPTS):
                flat, fields = self._read(
                    inbound_key(self._ns, key),
                    status_key(self._ns, job_id) if job_id is not None else "",
                    *_JOB_FIELDS,
                )
                if flat:
                    previous = dict(zip(flat[::2], flat[1::2], strict=True))
                    return _handled(key, previous, duplicate=True)
                fields = fields or None
                plan = plan_for(_job_view(fields) if fields else None)
                seen = (fields[1] or b"") if fields else b""
                if self._write(*self._args(source, plan, seen)) == b"written":
                    return plan.handled
                # "changed", or "duplicate" (another process recorded it meanwhile)
        except redis.RedisError as exc:
            raise InboundUnavailableError(f"cannot record: {exc}") from None
        raise InboundUnavailableError(f"job {job_id} kept changing; try again")

    def _args(self, source: str, plan: Plan, seen: bytes) -> list[EncodableT]:
        """The write script's ARGV (see ``_WRITE``)."""
        handled, now = plan.handled, iso_millis()
        job_id = handled.job_id or ""
        record = {
            "received_at": now,
            "source": source,
            "message_id": handled.message_id or "",
            "kind": handled.kind,
            "outcome": handled.outcome,
            "reason": handled.reason,
            "job_id": job_id,
            "key": handled.key,
            "details": orjson.dumps(handled.details).decode(),
        }
        args: list[EncodableT] = [
            inbound_key(self._ns, handled.key),
            inbound_index_key(self._ns),
            handled.key,
            self._ttl,
            int(time.time() * 1000),
            len(record) * 2,
            *[item for pair in record.items() for item in pair],
            status_key(self._ns, job_id) if job_id else "",
            seen,
        ]
        if plan.recipients is not None and job_id:
            args += [
                orjson.dumps(plan.recipients),
                orjson.dumps(counts(plan.recipients)),
                now,
            ]
        else:
            args += ["", "", ""]
        args += [history_key(self._ns, job_id), len(plan.history)]
        args += [orjson.dumps(entry_) for entry_ in plan.history]
        bounced = plan.events if "delivery.bounced" in self._events.types else []
        args += [events_key(self._ns), self._events.max_len, len(bounced)]
        for data in bounced:
            args += [uuid.uuid4().hex, job_id, now, orjson.dumps(data)]
        args += [suppressed_key(self._ns), len(plan.suppress)]
        for address, reason in plan.suppress:
            args += [
                normal(address),
                orjson.dumps(entry(address, reason, job_id or None)),
            ]
        return args

    def recent(self, *, since_ms: int = 0, limit: int = 1000) -> list[InboundRecord]:
        """Recent inbound records, newest first.

        Raises:
            InboundUnavailableError: Redis did not answer.
        """
        try:
            keys: list[bytes] = self._client.zrevrangebyscore(  # type: ignore[assignment]
                inbound_index_key(self._ns), "+inf", since_ms, start=0, num=limit
            )
            with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(inbound_key(self._ns, key.decode()))
                rows = pipe.execute()
        except redis.RedisError as exc:
            raise InboundUnavailableError(f"cannot read records: {exc}") from None
        out: list[InboundRecord] = []
        for raw in rows:
            if not raw:
                continue  # expired between the index and the record
            data = {k.decode(): v.decode() for k, v in raw.items()}
            out.append(
                {
                    "received_at": data.get("received_at", ""),
                    "source": data.get("source", ""),
                    "message_id": data.get("message_id") or None,
                    "kind": data.get("kind", "other"),
                    "outcome": data.get("outcome", ""),
                    "reason": data.get("reason", ""),
                    "job_id": data.get("job_id") or None,
                }
            )
        return out


_JOB_FIELDS = ["state", "recipients", "service"]
_ATTEMPTS = 5

# ARGV: record key, job key ("" none), the job's fields. Answers the record as a flat
# list (empty when the message is new) and the job's fields (empty when no job key).
# A script over the thread's own connection, not a pipeline: it is one call per message.
_READ = """
local record = redis.call('HGETALL', ARGV[1])
if ARGV[2] == '' then return {record, {}} end
return {record, redis.call('HMGET', ARGV[2], unpack(ARGV, 3))}
"""

# ARGV: record key, index key, message key, ttl, now (ms), 2n, n field/value pairs;
# job key ("" none), the job's recipients as read; new recipients ("" unchanged),
# counts, updated_at; history key, h, h entries; events key, max length, e, e times (id,
# job id, at, data); suppression key, s, s times (address, entry).
# Writes nothing and answers "duplicate" when the message has a record, or "changed"
# when the job's recipients are not those the decision was made on.
_WRITE = """
local record, index, mkey, ttl, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if redis.call('EXISTS', record) == 1 then return 'duplicate' end
local n = tonumber(ARGV[6])
local i = 7 + n
local job, seen = ARGV[i], ARGV[i + 1]
if job ~= '' and (redis.call('HGET', job, 'recipients') or '') ~= seen then
  return 'changed'
end
redis.call('HSET', record, unpack(ARGV, 7, 6 + n))
redis.call('EXPIRE', record, ttl)
redis.call('ZADD', index, now, mkey)
redis.call('ZREMRANGEBYSCORE', index, '-inf', now - tonumber(ttl) * 1000)
local recipients, counts, updated = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
if job ~= '' and recipients ~= '' then
  redis.call('HSET', job, 'recipients', recipients, 'counts', counts, 'updated_at', updated)
end
local history, h = ARGV[i + 5], tonumber(ARGV[i + 6])
i = i + 7
if h > 0 then redis.call('RPUSH', history, unpack(ARGV, i, i + h - 1)) end
i = i + h
local events, maxlen, e = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
i = i + 3
for _ = 1, e do
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'type', 'delivery.bounced',
             'id', ARGV[i], 'job_id', ARGV[i + 1], 'at', ARGV[i + 2], 'data', ARGV[i + 3])
  i = i + 4
end
local suppressed, count = ARGV[i], tonumber(ARGV[i + 1])
i = i + 2
for _ = 1, count do
  redis.call('HSETNX', suppressed, ARGV[i], ARGV[i + 1])
  i = i + 2
end
return 'written'
"""


def _job_view(fields: list[Any]) -> JobView | None:
    state, raw, service = fields
    if state is None:
        return None
    recipients = orjson.loads(raw) if raw else []
    return JobView(recipients, service.decode() if service else None)


def _handled(key: str, raw: Mapping[Any, Any], *, duplicate: bool = False) -> Handled:
    data = {k.decode(): v.decode() for k, v in raw.items()}
    details = orjson.loads(data["details"]) if data.get("details") else {}
    return Handled(
        key=key,
        kind=data.get("kind", "other"),
        outcome=data.get("outcome", "failed"),
        reason=data.get("reason", ""),
        job_id=data.get("job_id") or None,
        message_id=data.get("message_id") or None,
        duplicate=duplicate,
        details=details,
    )
