"""Crash safety on top of Dramatiq's Redis broker.

- ``Heartbeat``: a thread per worker process, independent of the worker threads, that
  marks the process alive and re-queues the unacknowledged messages of processes whose
  heartbeat stopped (``retry.redelivery_timeout``), counting each redelivery. Dramatiq
  alone does this only after 60 s plus a random maintenance pass (minutes to half an hour).
  Each beat is also recorded under the host's name (``host_key``), which is what
  ``host_beats`` and ``mailworker health`` read: a broker id does not say where it runs.
- ``ReliableRetries``: Dramatiq's retry, but the delayed copy is enqueued when the message
  is acknowledged, inside Dramatiq's ack loop: if Redis is unreachable the original is
  not acknowledged and the operation is tried again until it succeeds (Dramatiq's own
  ``Retries`` acknowledges and loses the message when that enqueue fails).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog
from dramatiq import Broker, Middleware, Retry, Worker
from dramatiq.broker import MessageProxy
from dramatiq.common import compute_backoff, dq_name

__all__ = [
    "HOST_RECORD_TTL",
    "Heartbeat",
    "HostHealth",
    "ProcessBeat",
    "ReliableRetries",
    "attach_enqueue",
    "attach_write",
    "attached_enqueues",
    "attached_writes",
    "check_host",
    "clear_writes",
    "host_beats",
    "host_key",
    "pending_retry",
    "redeliveries_key",
    "set_pending_retry",
]

_PENDING = "mailworker_retry"
_WRITES = "mailworker_writes"
_ENQUEUES = "mailworker_enqueues"

log = structlog.get_logger("mailworker.reliability")

# KEYS: none (the names are derived from the namespace, as Dramatiq's own script does).
# ARGV: namespace, now (ms), timeout (ms), own broker id, ttl (s), queue names...
_REAP = """
local ns, now, timeout, me, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local beats = ns .. ':__heartbeats__'
local counts = ns .. ':redeliveries'
local moved = 0
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', beats, '-inf', now - timeout)) do
  if worker ~= me then
    for i = 6, #ARGV do
      local queue = ARGV[i]
      local acks = ns .. ':__acks__.' .. worker .. '.' .. queue
      for _, id in ipairs(redis.call('SMEMBERS', acks)) do
        if redis.call('HEXISTS', ns .. ':' .. queue .. '.msgs', id) == 1 then
          redis.call('RPUSH', ns .. ':' .. queue, id)
          redis.call('HINCRBY', counts, id, 1)
          moved = moved + 1
        end
      end
      redis.call('DEL', acks)
    end
    redis.call('ZREM', beats, worker)
  end
end
if moved > 0 then redis.call('EXPIRE', counts, ttl) end
return moved
"""


# How long a host's record outlives the last beat of any process on it (seconds): long
# enough for people to see when a host stopped, short enough that the records of pods
# that came and went do not pile up.
HOST_RECORD_TTL = 86400

# KEYS: none (names derived from the namespace, as _REAP does).
# ARGV: namespace, host, own broker id, now (ms), pid, forget after (ms), record ttl (s)
# Dramatiq's heartbeat, then this process's line in its host's record; lines of processes
# silent for longer than "forget after" (dead ones) are dropped.
_BEAT = """
local ns, host, me, now, forget = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[6])
redis.call('ZADD', ns .. ':__heartbeats__', now, me)
local key = ns .. ':hosts:' .. host
redis.call('HSET', key, me, now .. ' ' .. ARGV[5])
local lines = redis.call('HGETALL', key)
for i = 1, #lines, 2 do
  local at = tonumber(string.match(lines[i + 1], '^%d+'))
  if at == nil or at < now - forget then redis.call('HDEL', key, lines[i]) end
end
redis.call('EXPIRE', key, ARGV[7])
return 1
"""


def host_key(namespace: str, host: str) -> str:
    """The hash of broker id → ``"{last beat, ms} {pid}"`` of the worker processes that
    run on ``host`` (its name, ``socket.gethostname()``: the pod's name on Kubernetes)."""
    return f"{namespace}:hosts:{host}"


@dataclass(frozen=True, slots=True)
class ProcessBeat:
    """The last heartbeat of one worker process on a host."""

    broker_id: str
    pid: int
    age: float  # seconds since the beat; negative if the clock went back


def host_beats(
    client: Any, namespace: str, host: str, *, now: float | None = None
) -> list[ProcessBeat]:
    """The processes that beat on ``host`` lately (dead ones are forgotten after four
    ``redelivery_timeout``), freshest first. The ages are measured with this machine's
    clock, so read them on the host itself: its workers beat with the same clock.

    Raises:
        redis.RedisError: the broker cannot be read.
    """
    now = time.time() if now is None else now
    beats = []
    for field, value in client.hgetall(host_key(namespace, host)).items():
        at, _, pid = value.decode(errors="replace").partition(" ")
        if not at.isdigit():
            continue  # not a line a heartbeat wrote
        beats.append(
            ProcessBeat(
                broker_id=field.decode(errors="replace"),
                pid=int(pid) if pid.isdigit() else 0,
                age=now - int(at) / 1000,
            )
        )
    return sorted(beats, key=lambda beat: beat.age)


@dataclass(frozen=True, slots=True)
class HostHealth:
    """What ``mailworker health`` found: the broker's answer and a host's heartbeats."""

    host: str
    latency: float  # seconds the broker took to answer a PING
    beats: list[ProcessBeat]
    max_age: float
    min_processes: int

    @property
    def alive(self) -> list[ProcessBeat]:
        """The processes that beat within ``max_age``."""
        return [beat for beat in self.beats if beat.age <= self.max_age]

    @property
    def healthy(self) -> bool:
        """At least ``min_processes`` processes on the host are alive."""
        return len(self.alive) >= self.min_processes

    def as_dict(self, *, broker: str, namespace: str) -> dict[str, Any]:
        """The findings as ``mailworker health --json`` prints them."""
        return {
            "healthy": self.healthy,
            "broker": broker,
            "broker_latency_ms": round(self.latency * 1000, 1),
            "namespace": namespace,
            "host": self.host,
            "max_age": self.max_age,
            "min_processes": self.min_processes,
            "processes": [
                {"pid": b.pid, "broker_id": b.broker_id, "age": round(b.age, 1)}
                for b in self.beats
            ],
        }

    def lines(self, *, broker: str) -> list[str]:
        """The findings for people: the broker's answer, then one line a process."""
        lines = [f"broker {broker}: answers ({self.latency * 1000:.1f} ms)"]
        for beat in self.beats:
            verdict = "alive" if beat.age <= self.max_age else "silent"
            lines.append(
                f"pid {beat.pid}: last heartbeat {beat.age:.1f}s ago, {verdict}"
            )
        return lines


def check_host(
    client: Any, namespace: str, host: str, *, max_age: float, min_processes: int
) -> HostHealth:
    """Ping the broker, then read ``host``'s heartbeats.

    Raises:
        redis.RedisError: the broker does not answer.
    """
    started = time.monotonic()
    client.ping()
    latency = time.monotonic() - started
    return HostHealth(
        host=host,
        latency=latency,
        beats=host_beats(client, namespace, host),
        max_age=max_age,
        min_processes=min_processes,
    )


def redeliveries_key(namespace: str) -> str:
    """The hash of redis message id → times it was taken back from a dead worker."""
    return f"{namespace}:redeliveries"


class Heartbeat(Middleware):
    """Marks this worker process alive and takes back the messages of dead ones.

    Args:
        timeout: seconds without a heartbeat after which a process counts as dead.
        ttl: how long redelivery counts are kept (``status.ttl``).
        host: the name its beats are recorded under (default: ``socket.gethostname()``).
    """

    def __init__(self, *, timeout: float, ttl: float, host: str | None = None) -> None:
        self.timeout = timeout
        self.interval = max(0.2, timeout / 5)
        self._ttl = int(ttl)
        self._host = host
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat_at: float | None = (
            None  # monotonic time of the last beat that landed
        )
        self._reap_after = 0.0

    @property
    def host(self) -> str:
        """The host name this process's beats are recorded under."""
        return self._host or socket.gethostname()

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(broker,), name="mailworker-heartbeat", daemon=True
        )
        self._thread.start()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        # Not before: while in-flight jobs finish, this process still holds messages
        # (and its consumers, stopping, no longer fetch, which beats too).
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.leave(broker)

    def leave(self, broker: Any) -> None:
        """Take this process out of its host's record: it no longer works there."""
        try:
            broker.client.hdel(host_key(broker.namespace, self.host), broker.broker_id)
        except Exception as exc:  # Redis away: the line is forgotten as it ages
            log.warning("heartbeat_record_not_removed", error_type=type(exc).__name__)

    def beat(self, broker: Any) -> int:
        """One heartbeat and one reaping pass; return how many messages were taken back."""
        now = int(time.time() * 1000)
        client = broker.client
        client.eval(
            _BEAT,
            0,
            broker.namespace,
            self.host,
            broker.broker_id,
            now,
            os.getpid(),
            int(self.timeout * 4000),
            HOST_RECORD_TTL,
        )
        at = time.monotonic()
        if self._beat_at is not None and at - self._beat_at > self.timeout:
            # This process could not beat for longer than the timeout (Redis away): nor
            # could any other, so every heartbeat looks stale now. Reap again only once
            # the live ones had a timeout to beat, or their jobs would be sent twice.
            self._reap_after = at + self.timeout
            log.warning("heartbeat_resumed", after_s=round(at - self._beat_at, 1))
        self._beat_at = at
        if at < self._reap_after:
            return 0
        queues = sorted({*broker.queues, *(dq_name(q) for q in broker.queues)})
        moved = int(
            client.eval(
                _REAP,
                0,
                broker.namespace,
                now,
                int(self.timeout * 1000),
                broker.broker_id,
                self._ttl,
                *queues,
            )
        )
        if moved:
            log.warning("messages_redelivered", count=moved, reason="worker_died")
        return moved

    def _run(self, broker: Broker) -> None:
        while not self._stop.is_set():
            try:
                self.beat(broker)
            except Exception as exc:  # Redis away: try again next beat
                log.warning("heartbeat_failed", error_type=type(exc).__name__)
            self._stop.wait(self.interval)


class ReliableRetries(Middleware):
    """Retries a failed message with backoff, up to ``max_attempts`` runs in all (the
    actor's own rule for delivery failures), never losing it.

    The actor raises ``dramatiq.Retry`` with its own delay for every retry it wants; any
    other exception (a bug, Redis gone mid-job) is retried with exponential backoff. The
    delayed copy is enqueued by ``SafeConsumer.ack`` (see ``worker.broker``).
    """

    def __init__(
        self, *, max_attempts: int, min_backoff: int, max_backoff: int
    ) -> None:
        self.max_attempts = max_attempts
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff

    @property
    def actor_options(self) -> set[str]:
        """``throws``: exceptions that fail the message at once."""
        return {"throws"}

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        actor = broker.get_actor(message.actor_name)
        throws = actor.options.get("throws")
        if throws and isinstance(exception, throws):
            message.fail()
            return
        retries = int(message.options.get("retries", 0))
        message.options["retries"] = retries + 1
        message.options["last_error"] = f"{type(exception).__name__}: {exception}"[:500]
        if retries + 1 >= self.max_attempts:  # that was the last attempt
            message.fail()
            return
        if isinstance(exception, Retry) and exception.delay is not None:
            delay = int(exception.delay)
        else:
            _, delay = compute_backoff(
                retries, factor=self.min_backoff, max_backoff=self.max_backoff
            )
        set_pending_retry(message, (message.copy(), delay))


def pending_retry(message: MessageProxy) -> tuple[Any, int] | None:
    """The retry ``ReliableRetries`` left for the ack to enqueue, if any."""
    value: tuple[Any, int] | None = vars(message).get(_PENDING)
    return value


def set_pending_retry(message: MessageProxy, value: tuple[Any, int] | None) -> None:
    """Attach (or clear) the retry the ack must enqueue before acknowledging."""
    vars(message)[_PENDING] = value


def attach_write(message: object, packed: list[Any]) -> None:
    """Leave a status write (``StatusStore.pack``) for the ack of ``message``: it is
    applied in the same round trip as the ack, or before a nack or a retry."""
    vars(message).setdefault(_WRITES, []).append(packed)


def attached_writes(message: MessageProxy) -> list[list[Any]]:
    """The status writes still to be applied with this message's ack."""
    writes: list[list[Any]] = vars(message).get(_WRITES) or []
    return writes


def clear_writes(message: MessageProxy) -> None:
    """The attached writes were applied."""
    vars(message).pop(_WRITES, None)


def attach_enqueue(message: object, later: tuple[Any, int]) -> None:
    """Leave a message to enqueue (a job of a bulk message put back, with its delay in
    ms) for the ack or nack of ``message``: enqueued after its writes, before it is
    acknowledged, inside Dramatiq's loop that tries again until Redis answers."""
    vars(message).setdefault(_ENQUEUES, []).append(later)


def attached_enqueues(message: MessageProxy) -> list[tuple[Any, int]]:
    """The enqueues still to be made before this message is acknowledged; the caller
    removes each one it made."""
    enqueues: list[tuple[Any, int]] = vars(message).get(_ENQUEUES) or []
    return enqueues
