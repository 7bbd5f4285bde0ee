"""Enqueue notifications.

One Lua script writes the Dramatiq wire format, the idempotency claim and the ``queued``
status record together.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis

from common.broker import broker_error, connect, connect_settings, replication
from common.envelope import envelope
from common.keys import (
    ACTOR_NAME,
    BATCH_SIZE,
    QUEUES,
    WAKE_LUA,
    queue_key,
    queue_messages_key,
    scheduled_key,
    scheduled_messages_key,
    status_key,
    wake_channel,
    wake_gate_key,
)
from producers.actions import Closed, close_actions
from producers.batch import (
    BATCH_SCRIPT,
    batch_call,
    claim_key,
    payload_digest,
    queued_record,
)
from producers.events import Event, ack_events, read_events
from producers.job import Notification
from producers.schedule import Cancelled, ScheduledPage, cancel, list_page
from settings import (
    BrokerNotReplicatedError,
    ConfigError,
    EventsSettings,
    JobValidationError,
    Limits,
    Settings,
    public_url,
)
from settings.models import NAMESPACE

__all__ = ["Producer", "wire_message"]

# KEYS: queue list, queue hash, status hash, idempotency key ("" for none), wake gate,
#       scheduled set, scheduled hash
# ARGV: redis message id, payload, job id, status fields (JSON), status ttl, idem ttl,
#       payload hash, wake channel, queue name, due time in ms ("" to queue it now)
_ENQUEUE = (
    WAKE_LUA
    + """
if string.sub(KEYS[4], -6) ~= ':idem:' then
  local claim = ARGV[3] .. ' ' .. ARGV[7]
  if redis.call('SET', KEYS[4], claim, 'NX', 'EX', ARGV[6]) == false then
    local held = redis.call('GET', KEYS[4])
    if held then
      local sep = string.find(held, ' ', 1, true)
      local id, digest = string.sub(held, 1, sep - 1), string.sub(held, sep + 1)
      if digest == ARGV[7] then return {'existing', id} end
      return {'conflict', id}
    end
    redis.call('SET', KEYS[4], claim, 'EX', ARGV[6])
  end
end
if ARGV[10] ~= '' then
  redis.call('ZADD', KEYS[6], ARGV[10], ARGV[3])
  redis.call('HSET', KEYS[7], ARGV[3], ARGV[2])
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('RPUSH', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[3], unpack(pairs_of(cjson.decode(ARGV[4]))))
redis.call('EXPIRE', KEYS[3], ARGV[5])
if ARGV[10] == '' then wake(KEYS[5], ARGV[8], ARGV[9]) end
return {'enqueued', ARGV[3]}
"""
)
_CHUNK = 500


def wire_message(
    job_id: str, queue: str, job: dict[str, Any], *, timestamp_ms: int | None = None
) -> tuple[str, bytes]:
    """Return (redis message id, payload) of the Dramatiq message for one job.

    ``timestamp_ms`` is a scheduled job's due time: ``retry.max_age`` counts from it.
    """
    redis_message_id = str(uuid.uuid4())
    message = envelope(
        job_id,
        queue,
        ACTOR_NAME,
        {"job": job},
        options={"redis_message_id": redis_message_id},
        timestamp_ms=timestamp_ms,
    )
    return redis_message_id, orjson.dumps(message)


class Producer:
    """Enqueues notifications on one broker.

    It is thread-safe. Build one per process.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "mailworker",
        limits: Limits | None = None,
        status_ttl: float = 7 * 86400,
        idempotency_ttl: float = 86400,
        broker_label: str = "redis",
        email_actions: bool = False,
        events: EventsSettings | None = None,
    ) -> None:
        self._client = client
        self._events = events or EventsSettings()
        self._email_actions = email_actions
        self._namespace = namespace
        self._limits = limits or Limits()
        self._status_ttl = int(status_ttl)
        self._idempotency_ttl = max(1, int(idempotency_ttl))
        self._label = broker_label
        self._script = client.register_script(_ENQUEUE)
        self._batch = client.register_script(BATCH_SCRIPT)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, broker_url: str | None = None
    ) -> Producer:
        """Build a producer from the configuration (only broker and limits are used).

        Args:
            settings: e.g. ``settings.load_settings(Path("/etc/mailworker.toml"))``.
            broker_url: overrides ``settings.broker_url``.
        """
        url = broker_url or settings.broker_url.get_secret_value()
        return cls(
            connect_settings(settings, url),
            namespace=settings.namespace,
            limits=settings.limits,
            status_ttl=settings.status.ttl,
            idempotency_ttl=settings.status.idempotency_ttl,
            broker_label=public_url(url),
            email_actions=settings.email_actions.enabled,
            events=settings.events,
        )

    @classmethod
    def from_url(
        cls,
        broker_url: str,
        *,
        namespace: str = "mailworker",
        limits: Limits | None = None,
        status_ttl: float = 7 * 86400,
        idempotency_ttl: float = 86400,
        ca_bundle: Path | None = None,
        email_actions: bool = False,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> Producer:
        """Build a producer for one broker, without reading any configuration.

        Args:
            broker_url: ``redis://[user:password@]host:port/db``, ``rediss://…``, a
                Sentinel or Cluster URL (README, "Redis high availability"), the
                workers' ``broker_url``.
            namespace: the workers' ``namespace``.
            limits: the workers' ``[limits]`` (default: the defaults).
            status_ttl: the workers' ``status.ttl``, in seconds.
            idempotency_ttl: the workers' ``status.idempotency_ttl``, in seconds.
            ca_bundle: extra trust for ``rediss://`` (and ``rediss+sentinel://``,
                ``rediss+cluster://``).
            email_actions: the workers' ``email_actions.enabled``: whether jobs may
                carry ``actions``.
            wait_replicas: the workers' ``[broker] wait_replicas``: an enqueue returns
                once that many replicas have it.
            wait_timeout: the workers' ``[broker] wait_timeout``, in seconds.

        Raises:
            ConfigError: ``namespace`` is not a valid namespace, or ``broker_url`` is
                not a broker URL (the error names it, never its password).
        """
        if not NAMESPACE.match(namespace):
            raise ConfigError("namespace", f"{namespace!r} is not a valid namespace")
        return cls(
            connect(
                broker_url,
                ca_bundle=ca_bundle,
                namespace=namespace,
                replicas=wait_replicas,
                replica_timeout=wait_timeout,
            ),
            namespace=namespace,
            limits=limits,
            status_ttl=status_ttl,
            idempotency_ttl=idempotency_ttl,
            broker_label=public_url(broker_url),
            email_actions=email_actions,
        )

    def read_events(
        self,
        group: str,
        consumer: str,
        *,
        count: int = 100,
        block_ms: int = 0,
        pending: bool = False,
    ) -> list[Event]:
        """Outcome events for ``consumer`` of ``group`` (``producers.events``)."""
        return read_events(
            self._client,
            self._namespace,
            group,
            consumer,
            count=count,
            block_ms=block_ms,
            pending=pending,
            label=self._label,
        )

    def ack_events(self, group: str, stream_ids: list[str]) -> int:
        """Acknowledge events ``group`` has handled (``producers.events``)."""
        return ack_events(
            self._client, self._namespace, group, stream_ids, label=self._label
        )

    def close_actions(self, job_id: str) -> Closed:
        """Close every e-mail action key of ``job_id`` (``producers.close_actions``)."""
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        return close_actions(
            self._client, self._namespace, job_id, now_ms=now_ms, label=self._label
        )

    def cancel_scheduled(self, job_id: str) -> Cancelled:
        """Cancel a job waiting in the scheduled set (``producers.cancel_scheduled``)."""
        return cancel(
            self._client,
            self._namespace,
            job_id,
            status_ttl=self._status_ttl,
            events=self._events,
            label=self._label,
        )

    def list_scheduled(
        self,
        *,
        limit: int = 50,
        offset: int = 0,
        due_after: datetime | None = None,
        due_before: datetime | None = None,
    ) -> ScheduledPage:
        """A page of the scheduled set, soonest first (``producers.list_scheduled``)."""
        return list_page(
            self._client,
            self._namespace,
            limit=limit,
            offset=offset,
            due_after=due_after,
            due_before=due_before,
            label=self._label,
        )

    def enqueue(self, notification: Notification) -> str:
        """Validate and enqueue one notification.

        Args:
            notification: the job.

        Returns:
            The job id (the same one again for a repeated ``idempotency_key``).

        Raises:
            JobValidationError: the job breaks ``[limits]`` or reuses an idempotency key
                with another payload.
            BrokerUnavailableError: Redis cannot be reached. Nothing was enqueued.
            BrokerNotReplicatedError: (a ``BrokerUnavailableError``) with ``[broker]
                wait_replicas``, too few replicas confirmed the enqueue in time.
        """
        return self.enqueue_many([notification])[0]

    def enqueue_many(
        self, notifications: Iterable[Notification], *, bulk: bool = True
    ) -> list[str]:
        """Validate every notification, then enqueue them in few round trips.

        Args:
            notifications: the jobs.
            bulk: carry up to ``BATCH_SIZE`` jobs per broker message. This is the fast
                path, and each job still has its own id, status record, marker, retries
                and dead letter. False enqueues one broker message per job, as
                ``enqueue`` does; so does a call with any job that has ``send_at``.

        Returns:
            The job ids, in order.

        Raises:
            JobValidationError: one is invalid (``field`` starts with its index). None
                was enqueued. For a conflicting idempotency key the ones before it were.
            BrokerUnavailableError: Redis cannot be reached (``BrokerNotReplicatedError``
                when too few replicas confirmed it, as for ``enqueue``).
        """
        jobs = list(notifications)
        for index, job in enumerate(jobs):
            try:
                self.check(job)
            except JobValidationError as exc:
                if len(jobs) == 1:
                    raise
                raise JobValidationError(f"[{index}].{exc.field}", exc.reason) from None
        # A scheduled job is a broker message of its own, cancellable alone.
        if bulk and len(jobs) > 1 and not any(job.send_at for job in jobs):
            return self._enqueue_bulk(jobs)
        ids: list[str] = []
        for start in range(0, len(jobs), _CHUNK):
            ids.extend(self._enqueue_chunk(jobs[start : start + _CHUNK], start))
        return ids

    def check(self, job: Notification) -> None:
        """Refuse a notification this producer would not enqueue, without enqueueing.

        What ``enqueue`` checks first: ``[limits]``, ``not_after``, and ``actions``
        only where e-mail actions are on (the HTTP API checks each item of a batch so).

        Raises:
            JobValidationError: the field at fault and why.
        """
        job.check_limits(self._limits)
        if job.actions and not self._email_actions:
            raise JobValidationError(
                "actions",
                "e-mail actions are off: set [email_actions] enabled = true (with a "
                "reply_address an [[inbound]] source receives) where the workers and "
                "this producer read their configuration",
            )

    def _enqueue_bulk(self, jobs: list[Notification]) -> list[str]:
        ids: list[str | None] = [None] * len(jobs)
        by_priority: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            by_priority.setdefault(job.priority, []).append(index)
        batches = [
            indexes[start : start + BATCH_SIZE]
            for indexes in by_priority.values()
            for start in range(0, len(indexes), BATCH_SIZE)
        ]
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        per_trip = max(1, _CHUNK // BATCH_SIZE)
        for start in range(0, len(batches), per_trip):
            group = batches[start : start + per_trip]
            replies = self._run_batches(
                [[jobs[i] for i in batch] for batch in group], now
            )
            for batch, reply in zip(group, replies, strict=True):
                if reply[0] == b"conflict":
                    index = batch[int(reply[1]) - 1]
                    raise JobValidationError(
                        f"[{index}].idempotency_key",
                        f"already used for job {reply[2].decode()} with another payload",
                    )
                for position, index in enumerate(batch):
                    ids[index] = reply[2 * position + 1].decode()
        return [i for i in ids if i is not None]

    def _run_batches(self, groups: list[list[Notification]], now: str) -> list[Any]:
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for group in groups:
                    keys, args = batch_call(
                        self._namespace,
                        group,
                        status_ttl=self._status_ttl,
                        idempotency_ttl=self._idempotency_ttl,
                        now=now,
                    )
                    self._batch(keys=keys, args=args, client=pipe)
                replies, acked = self._execute(pipe)
        except redis.RedisError as exc:
            raise broker_error(self._label, exc) from None
        self._check_replicated(acked, sum(len(g) for g in groups))
        return replies

    def _execute(self, pipe: Any) -> tuple[list[Any], int | None]:
        """Run ``pipe``; with ``wait_replicas``, ``WAIT`` last on its connection.

        Returns:
            The replies, and how many replicas have them (None when not asked).
        """
        replicas, timeout_ms = replication(self._client)
        if replicas:
            pipe.execute_command("WAIT", replicas, timeout_ms)
        replies = list(pipe.execute())
        if not replicas:
            return replies, None
        return replies[:-1], int(replies[-1])

    def _check_replicated(self, acked: int | None, count: int) -> None:
        replicas, timeout_ms = replication(self._client)
        if acked is None or acked >= replicas:
            return
        raise BrokerNotReplicatedError(
            f"broker {self._label}: the primary took {count} job(s), but only {acked} "
            f"of the {replicas} replica(s) [broker] wait_replicas asks for confirmed "
            f"them within wait_timeout ({timeout_ms} ms): they may still be delivered, "
            "or be lost if the primary fails now. Enqueueing them again with the same "
            "idempotency_key is safe"
        )

    def _enqueue_chunk(self, jobs: Sequence[Notification], offset: int) -> list[str]:
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        try:
            if len(jobs) == 1 and not replication(self._client)[0]:
                # One EVALSHA: a pipeline would ask SCRIPT EXISTS first, a round trip more.
                replies, acked = [self._queue_call(self._client, jobs[0], now)], None
            else:
                with self._client.pipeline(transaction=False) as pipe:
                    for job in jobs:
                        self._queue_call(pipe, job, now)
                    replies, acked = self._execute(pipe)
        except redis.RedisError as exc:
            raise broker_error(self._label, exc) from None
        self._check_replicated(acked, len(jobs))
        ids = []
        for index, (state, job_id) in enumerate(replies):
            if state == b"conflict":
                raise JobValidationError(
                    f"[{offset + index}].idempotency_key"
                    if len(jobs) > 1
                    else "idempotency_key",
                    f"already used for job {job_id.decode()} with another payload",
                )
            ids.append(job_id.decode())
        return ids

    def _queue_call(self, pipe: Any, job: Notification, now: str) -> Any:
        wire = job.to_wire()
        job_id = str(uuid.uuid4())
        queue = QUEUES[job.priority]
        due_ms = int(job.send_at.timestamp() * 1000) if job.send_at else None
        redis_message_id, payload = wire_message(
            job_id, queue, wire, timestamp_ms=due_ms
        )
        digest = payload_digest(wire)
        fields = queued_record(job_id, queue, now, job)
        ttl = self._status_ttl
        if job.send_at is not None:
            # The record outlives the wait: it is kept status.ttl after the send time.
            fields.update(state="scheduled", send_at=_iso(job.send_at))
            ahead = job.send_at - datetime.now(UTC)
            ttl += max(0, int(ahead.total_seconds()) + 1)
        idem = claim_key(self._namespace, job)
        keys = [
            queue_key(self._namespace, queue),
            queue_messages_key(self._namespace, queue),
            status_key(self._namespace, job_id),
            idem,
            wake_gate_key(self._namespace, queue),
            scheduled_key(self._namespace),
            scheduled_messages_key(self._namespace),
        ]
        args: list[str | bytes | int] = [
            redis_message_id,
            payload,
            job_id,
            orjson.dumps(fields),
            ttl,
            self._idempotency_ttl,
            digest,
            wake_channel(self._namespace),
            queue,
            "" if due_ms is None else due_ms,
        ]
        return self._script(keys=keys, args=args, client=pipe)


def _iso(moment: datetime) -> str:
    """``moment`` in UTC as the status records write times (milliseconds)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")
