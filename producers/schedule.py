"""Scheduled jobs: list them, and cancel one before it is released to its queue.

The scheduled set (``{ns}:scheduled``, message id → due time in ms) and its messages
(``scheduled_messages_key``) hold jobs with a ``send_at`` and broker retries that wait
long. Workers release due entries onto their queues (``worker.broker.schedule``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from redis.typing import EncodableT

from common.broker import broker_error
from common.keys import (
    BATCH_ACTOR_NAME,
    events_key,
    history_key,
    idempotency_key,
    scheduled_key,
    scheduled_messages_key,
    status_key,
)
from settings import EventsSettings

__all__ = ["Cancelled", "Scheduled", "ScheduledPage", "cancel", "list_page"]

# KEYS: scheduled set, scheduled hash, status hash, history list, events stream, the
#       job's idempotency claim (`{ns}:idem:`, never written, for none)
# ARGV: job id, now (ISO 8601), status ttl, history entry (JSON), then the event:
#       type ("" for none), id, data (JSON), the stream's max length; the bulk actor
# Returns {outcome, state before, jobs}: `cancelled`; `absent` when the job is not in
# the set (released already, cancelled, or unknown), with its record's state ('' none);
# `bulk` when the entry is a bulk message's retry (its id is no job's: cancelling it
# would drop its jobs unrecorded), left as it is, with how many jobs it carries.
# The release script also takes its entries out of the set in one step, so of a
# cancel and a release racing for a job exactly one wins. A cancelled job's claim is
# released when it is still this job's, so its key can be used for a new job.
_CANCEL = """
local before = redis.call('HGET', KEYS[3], 'state') or ''
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {'absent', before, 0} end
local payload = redis.call('HGET', KEYS[2], ARGV[1])
if payload then
  local ok, message = pcall(cjson.decode, payload)
  if ok and type(message) == 'table' and message.actor_name == ARGV[9] then
    local jobs = 0
    if type(message.kwargs) == 'table' and type(message.kwargs.jobs) == 'table' then
      jobs = #message.kwargs.jobs
    end
    return {'bulk', before, jobs}
  end
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], 'id', ARGV[1], 'state', 'cancelled', 'reason', 'cancelled',
           'updated_at', ARGV[2], 'next_attempt_at', '')
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('RPUSH', KEYS[4], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[3])
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'type', ARGV[5],
             'id', ARGV[6], 'job_id', ARGV[1], 'at', ARGV[2], 'data', ARGV[7])
end
if string.sub(KEYS[6], -6) ~= ':idem:' then
  local held = redis.call('GET', KEYS[6])
  if held and string.sub(held, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
    redis.call('DEL', KEYS[6])
  end
end
return {'cancelled', before, 1}
"""


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What ``cancel`` did.

    Attributes:
        job_id: the job.
        cancelled: True when it was taken out of the scheduled set now: it never sends.
        state: its record's state before (``scheduled``, ``retrying``; for one not
            cancelled: ``queued``, ``sending``, ``sent``, ``cancelled``..., or ``""``
            when the job has no record).
        bulk_jobs: for an id that is a bulk message's retry waiting in the set, how
            many jobs it carries: such an entry is never cancelled (0 otherwise).
    """

    job_id: str
    cancelled: bool
    state: str
    bulk_jobs: int = 0


@dataclass(frozen=True, slots=True)
class Scheduled:
    """One entry of the scheduled set.

    Attributes:
        job_id: the message id (a job id; a bulk message's id for its retry).
        due_at: when it is released to its queue (ISO 8601, UTC).
        state: its record's state (``scheduled``, ``retrying``), ``""`` without one.
        queue: the Dramatiq queue it goes to.
        subject: the job's subject (None for a bulk message or an unreadable one).
        jobs: how many jobs the message carries.
        bulk: True for a bulk message's retry: its id is the message's, not a job's,
            and it cannot be cancelled (its jobs' own records say ``retrying``).
    """

    job_id: str
    due_at: str
    state: str
    queue: str | None
    subject: str | None
    jobs: int
    bulk: bool = False


@dataclass(frozen=True, slots=True)
class ScheduledPage:
    """A page of the scheduled set, soonest first, and how many match in all."""

    entries: list[Scheduled]
    total: int


def cancel(
    client: redis.Redis,
    namespace: str,
    job_id: str,
    *,
    status_ttl: int,
    events: EventsSettings | None = None,
    label: str = "redis",
) -> Cancelled:
    """Take a scheduled job out of the scheduled set; its record says ``cancelled``.

    The ``delivery.cancelled`` event goes on the events stream in the same script
    (unless ``events.types`` leaves it out), and the job's idempotency claim is
    released: a new enqueue with its key makes a new job. A job already released to its queue (or
    sent) is not touched: ``cancelled`` is False and ``state`` says where it is. A bulk
    message's retry (several jobs under the message's id) is not touched either:
    ``bulk_jobs`` says how many jobs it carries.

    Raises:
        BrokerUnavailableError: Redis cannot be reached.
    """
    events = events or EventsSettings()
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    entry = orjson.dumps({"at": now, "event": "cancelled", "reason": "cancelled"})
    kind = "delivery.cancelled" if "delivery.cancelled" in events.types else ""
    try:
        claim = _claim_of(
            namespace, client.hget(scheduled_messages_key(namespace), job_id)
        )
    except redis.RedisError as exc:
        raise broker_error(label, exc) from None
    keys = [
        scheduled_key(namespace),
        scheduled_messages_key(namespace),
        status_key(namespace, job_id),
        history_key(namespace, job_id),
        events_key(namespace),
        claim,
    ]
    args: list[EncodableT] = [job_id, now, status_ttl, entry, kind, uuid.uuid4().hex]
    args += [orjson.dumps({"reason": "cancelled"}), events.max_len, BATCH_ACTOR_NAME]
    try:
        script = client.register_script(_CANCEL)
        outcome, before, jobs = script(keys=keys, args=args)
    except redis.RedisError as exc:
        raise broker_error(label, exc) from None
    bulk = int(jobs) if outcome == b"bulk" else 0
    return Cancelled(job_id, outcome == b"cancelled", before.decode(), bulk)


def _claim_of(namespace: str, payload: bytes | str | None) -> str:
    """The idempotency claim key of a scheduled job's message (``{ns}:idem:``: none).

    The message is written once for its id, so the key read here is the one the
    script releases, if the claim still names this job.
    """
    message: Any = None
    if payload is not None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            message = None
    found = message.get("kwargs") if isinstance(message, dict) else None
    job = found.get("job") if isinstance(found, dict) else None
    key = job.get("idempotency_key") if isinstance(job, dict) else None
    if isinstance(key, str) and key:
        return idempotency_key(namespace, key)
    return f"{namespace}:idem:"


def list_page(
    client: redis.Redis,
    namespace: str,
    *,
    limit: int = 50,
    offset: int = 0,
    due_after: datetime | None = None,
    due_before: datetime | None = None,
    label: str = "redis",
) -> ScheduledPage:
    """A page of scheduled entries, soonest first, in the due window given.

    Costs three round trips for any page size: the page, its messages, their records.

    Raises:
        BrokerUnavailableError: Redis cannot be reached.
    """
    low = f"{int(due_after.timestamp() * 1000)}" if due_after else "-inf"
    high = f"{int(due_before.timestamp() * 1000)}" if due_before else "+inf"
    key = scheduled_key(namespace)
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(key, low, high, start=offset, num=limit, withscores=True)
            pipe.zcount(key, low, high)
            page, total = pipe.execute()
        ids = [member.decode() for member, _ in page]
        with client.pipeline(transaction=False) as pipe:
            pipe.hmget(scheduled_messages_key(namespace), ids) if ids else pipe.echo("")
            for job_id in ids:
                pipe.hget(status_key(namespace, job_id), "state")
            payloads, *states = pipe.execute()
    except redis.RedisError as exc:
        raise broker_error(label, exc) from None
    entries = [
        _entry(job_id, score, payload, state)
        for (job_id, (_, score), payload, state) in zip(
            ids, page, payloads or [], states, strict=True
        )
    ]
    return ScheduledPage(entries, int(total))


def _entry(
    job_id: str, score: float, payload: bytes | None, state: bytes | None
) -> Scheduled:
    due = datetime.fromtimestamp(score / 1000, UTC).isoformat(timespec="milliseconds")
    queue: str | None = None
    subject: str | None = None
    jobs = 1
    bulk = False
    message: Any = None
    if payload is not None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            message = None
    if isinstance(message, dict):
        name = message.get("queue_name")
        queue = name if isinstance(name, str) else None
        found = message.get("kwargs")
        kwargs: dict[str, Any] = found if isinstance(found, dict) else {}
        job = kwargs.get("job")
        if isinstance(job, dict) and isinstance(job.get("subject"), str):
            subject = job["subject"]
        batch = kwargs.get("jobs")
        bulk = message.get("actor_name") == BATCH_ACTOR_NAME
        if isinstance(batch, list):
            jobs = len(batch)
    return Scheduled(
        job_id=job_id,
        due_at=due,
        state=state.decode() if state else "",
        queue=queue,
        subject=subject,
        jobs=jobs,
        bulk=bulk,
    )
