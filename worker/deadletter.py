"""Dead letters an operator can work with: list, show, requeue, purge.

A dead letter is an entry in ``{ns}:dead`` (job id → time of death), the full message in
``{ns}:dead:{id}`` and the job's status record (reason, last error, attempts, recipients).
All three live ``status.ttl``, and at most ``status.max_dead_letters`` dead letters are
kept: the script that writes one trims the oldest past the cap (``TRIM_DEAD_LUA``),
counted in ``{ns}:counters`` (``dead_letters_trimmed``). That cap counts letters; the
size cap of one letter's kept message is ``kept_payload``'s. Webhook deliveries that
ran out of attempts are kept the same way under ids ``webhook:NAME:EVENT_ID``
(``worker.events.letters``). ``sweep`` drops index entries whose time has passed, so
nothing depends on Dramatiq's random maintenance passes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import redis
from redis.typing import EncodableT

from common.keys import (
    WAKE_LUA,
    counters_key,
    dead_index_key,
    dead_payload_key,
    history_key,
    queue_key,
    queue_messages_key,
    status_key,
    wake_channel,
    wake_gate_key,
)
from producers.job import parse_job
from settings import JobValidationError, Limits, MailworkerError
from settings.durations import parse_duration
from worker.broker.keys import q_name
from worker.events import letters
from worker.events.model import parse_dead_id
from worker.records import dead_event
from worker.status import (
    ErrorRecord,
    RecordFields,
    StatusRecord,
    StatusStore,
    now_iso,
)

__all__ = [
    "DROPPED",
    "REASONS",
    "DeadLetters",
    "RequeueRefusedError",
    "content_size",
    "elide",
    "kept_payload",
    "since_moment",
]

RAW_LIMIT = 64 * 1024  # undecodable messages are kept raw up to this many bytes
# Why a job can be dead (README, Dead letters): the values of a dead letter's ``reason``.
REASONS = (
    "validation",
    "expired",
    "max_age",
    "redelivery_limit",
    "permanent",
    "retries_exhausted",
    "poison",
    "unknown_actor",
    "unhandled",
    "webhook",  # a webhook delivery that ran out of attempts (worker.events.letters)
)
# A dead letter keeps the whole message when the job could be sent under the limits and
# its payload is at most limits.max_message_bytes and this much more (envelope, JSON).
SLACK = 1024 * 1024
TEXT_KEPT = 64 * 1024  # characters of text and html kept of a message over the cap
DROPPED = "content_dropped"  # the key that marks a dead letter kept without its content
_DECODE_BLOCK = 256 * 1024  # base64 characters decoded at a time to size and hash

# KEYS: queue list, queue hash, dead index, dead payload, status hash, wake gate, history
# ARGV: redis message id, payload, job id, status fields (JSON), wake channel, queue,
#       history entry, ttl
# The history entry goes in before the message is queued: a worker that takes it at
# once writes its attempt after `requeued`, never before.
_REQUEUE = (
    WAKE_LUA
    + """
if redis.call('ZSCORE', KEYS[3], ARGV[3]) == false then return 0 end
redis.call('RPUSH', KEYS[7], ARGV[7])
redis.call('EXPIRE', KEYS[7], ARGV[8])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[4])
local fields = cjson.decode(ARGV[4])
for k, v in pairs(fields) do redis.call('HSET', KEYS[5], k, v) end
redis.call('EXPIRE', KEYS[5], ARGV[8])
wake(KEYS[6], ARGV[5], ARGV[6])
return 1
"""
)


def since_moment(value: str, now: float | None = None) -> float:
    """A ``--since`` filter as a Unix time: a duration back from now (``2h``, ``7d``) or
    an ISO time (UTC when it names no offset).

    Raises:
        ValueError: neither.
    """
    try:
        return (time.time() if now is None else now) - parse_duration(value)
    except ValueError:
        pass
    moment = datetime.fromisoformat(value)  # ValueError: neither
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def kept_payload(message: dict[str, Any], limits: Limits) -> bytes:
    """A single-job message as its dead letter keeps it.

    It is kept whole when requeue could send it again. A job larger than
    ``limits.max_message_bytes`` (or a payload larger than that and 1 MiB) keeps the
    envelope and the job's fields. Each attachment is then kept as its name, type, size
    and sha256, text and html are cut to 64 Ki characters, and ``DROPPED`` says what was
    dropped. Such a dead letter cannot be requeued.
    """
    job = (message.get("kwargs") or {}).get("job")
    cap = limits.max_message_bytes
    if not isinstance(job, dict) or content_size(job) <= cap:
        payload = orjson.dumps(message)
        if len(payload) <= cap + SLACK:
            return payload
        del payload
    kept = dict(message)
    kept["kwargs"] = {"job": _without_content(job)}
    kept[DROPPED] = (
        f"the message was larger than limits.max_message_bytes ({cap}): kept without "
        f"attachment content (name, type, size and sha256 only) and with text and html "
        f"cut to {TEXT_KEPT} characters"
    )
    payload = orjson.dumps(kept)
    if len(payload) > cap + SLACK:  # a job of another giant field: the envelope alone
        kept["kwargs"] = {"job": None}
        payload = orjson.dumps(kept)
    return payload


def content_size(job: dict[str, Any]) -> int:
    """A close upper bound of the size the worker's limit is checked against.

    That size is ``estimated_size``. The bound comes from the job as it travels, without
    decoding anything.
    """
    raw = sum(len(job[k]) for k in ("text", "html") if isinstance(job.get(k), str))
    attachments = job.get("attachments")
    for item in attachments if isinstance(attachments, list) else []:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            raw += max(0, len(content) * 3 // 4 - 2)
    return raw * 4 // 3


def _without_content(job: Any) -> Any:
    if not isinstance(job, dict):
        return job
    out = dict(job)
    for key in ("text", "html"):
        if isinstance(out.get(key), str) and len(out[key]) > TEXT_KEPT:
            out[key] = out[key][:TEXT_KEPT]
    if isinstance(out.get("attachments"), list):
        out["attachments"] = [_attachment_metadata(a) for a in out["attachments"]]
    return out


def _attachment_metadata(item: Any) -> Any:
    """An attachment's name, type, size and sha256, decoded a block at a time."""
    if not isinstance(item, dict):
        return None
    shown = {
        "filename": item.get("filename"),
        "content_type": item.get("content_type"),
        "content": "dropped",
    }
    content, digest, size = item.get("content"), hashlib.sha256(), 0
    if not isinstance(content, str):
        return shown | {"content": "not base64"}
    try:
        for start in range(0, len(content), _DECODE_BLOCK):
            block = binascii.a2b_base64(
                content[start : start + _DECODE_BLOCK], strict_mode=True
            )
            digest.update(block)
            size += len(block)
    except (binascii.Error, ValueError):
        return shown | {"content": "not base64"}
    return shown | {"size": size, "sha256": digest.hexdigest()}


class RequeueRefusedError(MailworkerError):
    """The dead letter cannot be sent again as it is. The message says why."""


@dataclass(frozen=True, slots=True)
class Filters:
    """What ``dead list`` and ``--all`` select."""

    since: float | None = None  # epoch seconds
    reason: str | None = None
    service: str | None = None

    def match(self, record: StatusRecord, dead_at: float) -> bool:
        """True when the dead letter passes every filter given."""
        if self.since is not None and dead_at < self.since:
            return False
        if self.reason is not None and record.get("reason") != self.reason:
            return False
        if self.service is not None:
            error = record["error"]
            services = {error["service"] if error else None, record["service"]} | {
                s.get("service") for s in record["skipped"]
            }
            if self.service not in services:
                return False
        return True


def elide(payload: bytes) -> dict[str, Any]:
    """The stored message for display.

    Attachments are shown as name, type, size and sha256, in each job of a bulk message
    too. Whatever shape a hostile producer gave it is shown.
    """
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return {"undecodable": True}
    if not isinstance(message, dict):
        return {"message": message}
    if "raw_base64" in message:
        return {k: v for k, v in message.items() if k != "raw_base64"} | {
            "raw_bytes": len(base64.b64decode(message["raw_base64"]))
        }
    kwargs = message.get("kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    shown = {
        "queue": message.get("queue_name"),
        "actor": message.get("actor_name"),
        "job": _elide_job(kwargs.get("job", {})),
    }
    if DROPPED in message:
        shown[DROPPED] = message[DROPPED]
    jobs = kwargs.get("jobs")
    if isinstance(jobs, list):
        shown["jobs"] = [
            {**item, "job": _elide_job(item.get("job"))}
            if isinstance(item, dict)
            else item
            for item in jobs
        ]
    return shown


def _elide_job(job: Any) -> Any:
    if not isinstance(job, dict) or not isinstance(job.get("attachments"), list):
        return job
    attachments = []
    for item in job["attachments"]:
        if not isinstance(item, dict) or item.get("content") == "dropped":
            attachments.append(item)  # kept as metadata alone (``kept_payload``)
            continue
        shown = {
            "filename": item.get("filename"),
            "content_type": item.get("content_type"),
        }
        try:
            content = base64.b64decode(item.get("content", ""), validate=True)
        except (ValueError, TypeError):
            shown["content"] = "not base64"
        else:
            shown.update(size=len(content), sha256=hashlib.sha256(content).hexdigest())
        attachments.append(shown)
    return {**job, "attachments": attachments}


class DeadLetters:
    """Reads and changes the dead letters of one namespace.

    Args:
        client: a Redis client (bytes replies).
        namespace: the key prefix shared with producers.
        ttl: seconds a dead letter is kept (``status.ttl``).
        status: the status store of the records (one on ``client`` when omitted).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str,
        ttl: float,
        status: StatusStore | None = None,
    ) -> None:
        self._client = client
        self._ns = namespace
        self._ttl = int(ttl)
        self.status = status or StatusStore(client, namespace=namespace, ttl=ttl)
        self._requeue = client.register_script(_REQUEUE)

    def sweep(self) -> int:
        """Drop index entries older than ``status.ttl`` and return how many."""
        cutoff = int((time.time() - self._ttl) * 1000)
        return int(
            self._client.zremrangebyscore(dead_index_key(self._ns), "-inf", cutoff)
        )

    def trimmed(self) -> int:
        """How many dead letters went, oldest first, to keep ``status.max_dead_letters``."""
        count = self._client.hget(counters_key(self._ns), "dead_letters_trimmed")
        return int(count or 0)

    def add_poison(self, redis_id: str, raw: bytes, error: str, queue: str) -> None:
        """Keep a message that cannot be decoded (or names the wrong queue): raw, base64."""
        payload = orjson.dumps(
            {
                "raw_base64": base64.b64encode(raw[:RAW_LIMIT]).decode(),
                "truncated": len(raw) > RAW_LIMIT,
                "queue": queue,
                "error": error,
            }
        )
        record: ErrorRecord = {
            "type": "poison",
            "code": None,
            "service": None,
            "message": error,
        }
        now = now_iso()
        fields: RecordFields = {
            "id": redis_id,
            "state": "dead",
            "reason": "poison",
            "queue": queue,
            "created_at": now,
            "dead_at": now,
            "error": record,
        }
        self.status.write(
            redis_id,
            fields,
            event={"event": "dead", "reason": "poison", "error": record},
            dead_payload=payload,
            outcome=("delivery.dead", dead_event("poison", record, 0, {})),
        )

    def entries(self, filters: Filters) -> list[tuple[str, float, StatusRecord]]:
        """Dead letters matching ``filters``, oldest first: (job id, dead at, record)."""
        self.sweep()
        index = cast(
            "list[tuple[bytes, float]]",
            self._client.zrange(dead_index_key(self._ns), 0, -1, withscores=True),
        )
        ids = [raw_id.decode() for raw_id, _ in index]
        out = []
        records = self.status.get_many(ids)  # 500 a round trip, not one each
        for job_id, (_, score), record in zip(ids, index, records, strict=True):
            if record is None:
                continue  # the record expired: the dead letter goes with it
            if filters.match(record, score / 1000):
                out.append((job_id, score / 1000, record))
        return out

    def show(self, job_id: str) -> dict[str, Any] | None:
        """The record and the elided message of one dead letter, or None."""
        score = self._client.zscore(dead_index_key(self._ns), job_id)
        payload = cast(
            "bytes | None", self._client.get(dead_payload_key(self._ns, job_id))
        )
        record = self.status.get(job_id)
        if score is None or record is None:
            return None
        shown: dict[str, Any] = dict(record)
        shown["dead_at"] = record["dead_at"] or score
        if payload is None:
            shown["message"] = None
        elif parse_dead_id(job_id) is not None:
            shown["message"] = orjson.loads(payload)  # the event and the webhook's name
        else:
            shown["message"] = elide(payload)
        return shown

    def requeue(
        self,
        job_id: str,
        limits: Limits,
        *,
        webhooks: Collection[str] | None = None,
    ) -> None:
        """Send a dead letter again under the same job id, after validating it again.

        Refused and deferred recipients are reset. The delivery marker still stops a
        resend to anyone a server already accepted. A webhook delivery's dead letter
        goes back to that webhook alone, due at once, with a fresh count of attempts.

        Args:
            job_id: the dead letter's id.
            limits: what a job must fit again.
            webhooks: the enabled webhooks (a letter of another is refused); None
                does not check.

        Raises:
            RequeueRefusedError: no such dead letter, undecodable, or no longer valid.
        """
        if parse_dead_id(job_id) is not None:
            refused = letters.requeue(
                self._client, self._ns, job_id, ttl=self._ttl, webhooks=webhooks
            )
            if refused is not None:
                raise RequeueRefusedError(refused)
            return
        payload = cast(
            "bytes | None", self._client.get(dead_payload_key(self._ns, job_id))
        )
        record = self.status.get(job_id)
        if payload is None or record is None:
            raise RequeueRefusedError(f"no dead letter {job_id}")
        message = orjson.loads(payload)
        if "raw_base64" in message:
            raise RequeueRefusedError(
                f"{job_id} could not be decoded; it can only be purged"
            )
        if DROPPED in message:
            raise RequeueRefusedError(
                f"{job_id} was kept without its content ({message[DROPPED]}); "
                "it cannot be sent again: enqueue the notification anew"
            )
        try:
            notification = parse_job((message.get("kwargs") or {}).get("job"))
            notification.check_limits(limits, requeue=True)
        except JobValidationError as exc:
            raise RequeueRefusedError(f"{job_id} is invalid: {exc}") from None
        queue = q_name(str(message["queue_name"]))
        redis_id = str(uuid.uuid4())
        # max_age counts from the requeue.
        message.update(
            queue_name=queue,
            options={"redis_message_id": redis_id},
            message_timestamp=int(time.time() * 1000),
        )
        accepted = [r for r in record["recipients"] if r.get("state") == "accepted"]
        fields = {
            "state": "queued",
            "reason": "",
            "error": "",
            "next_attempt_at": "",
            "dead_at": "",
            "attempts": 0,
            "recipients": orjson.dumps(accepted).decode(),
            "updated_at": now_iso(),
        }
        keys = [
            queue_key(self._ns, queue),
            queue_messages_key(self._ns, queue),
            dead_index_key(self._ns),
            dead_payload_key(self._ns, job_id),
            status_key(self._ns, job_id),
            wake_gate_key(self._ns, queue),
            history_key(self._ns, job_id),
        ]
        args: list[EncodableT] = [
            redis_id,
            orjson.dumps(message),
            job_id,
            orjson.dumps(fields),
            wake_channel(self._ns),
            queue,
            orjson.dumps({"at": fields["updated_at"], "event": "requeued"}),
            self._ttl,
        ]
        if not self._requeue(keys=keys, args=args):
            raise RequeueRefusedError(f"no dead letter {job_id}")

    def purge(self, job_id: str) -> bool:
        """Delete one dead letter. Its status record stays until it expires."""
        with self._client.pipeline(transaction=True) as pipe:
            pipe.zrem(dead_index_key(self._ns), job_id)
            pipe.delete(dead_payload_key(self._ns, job_id))
            removed, _ = pipe.execute()
        return bool(removed)
