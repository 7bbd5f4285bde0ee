"""Worker heartbeats in Redis: Dramatiq's, each host's record, and the reaper.

``beat`` marks a process alive (in Dramatiq's heartbeat set and in its host's record,
which ``mailworker health`` reads: a broker id does not say where it runs). ``reap``
takes back the unacknowledged messages of processes whose heartbeat stopped. Dramatiq
alone does this only after 60 s plus a random maintenance pass.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from worker.broker.keys import LUA, dq_name, heartbeats_key

__all__ = [
    "HOST_RECORD_TTL",
    "HostHealth",
    "ProcessBeat",
    "beat",
    "check_host",
    "host_beats",
    "host_key",
    "hosts_key",
    "reap",
    "redeliveries_key",
]

# Dramatiq's dead-worker requeue, sooner and counted: the messages in the ack sets of
# processes whose heartbeat stopped go back to their queues, each redelivery counted.
# KEYS: none (the names are derived from the namespace, as Dramatiq's own script does).
# ARGV: namespace, now (ms), timeout (ms), own broker id, ttl (s), queue names...
_REAP = (
    LUA
    + """
local ns, now, timeout, me, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local beats = heartbeats_key(ns)
local counts = ns .. ':redeliveries'
local moved = 0
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', beats, '-inf', now - timeout)) do
  if worker ~= me then
    for i = 6, #ARGV do
      local queue = ARGV[i]
      local acks = acks_key(ns, worker, queue)
      for _, id in ipairs(redis.call('SMEMBERS', acks)) do
        if redis.call('HEXISTS', messages_key(ns, queue), id) == 1 then
          redis.call('RPUSH', queue_key(ns, queue), id)
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
)


# How long a host's record outlives the last beat of any process on it (seconds): long
# enough for people to see when a host stopped, short enough that the records of pods
# that came and went do not pile up.
HOST_RECORD_TTL = 86400

# KEYS: the heartbeats (Dramatiq's), this host's record (``host_key``), the index of
#       hosts (``hosts_key``)
# ARGV: namespace (unused), host, own broker id, now (ms), pid, forget after (ms),
#       record ttl (s)
# Dramatiq's heartbeat, then this process's line in its host's record. Lines of processes
# silent for longer than "forget after" (dead ones) are dropped. The host goes into the
# index of hosts (``hosts_key``: host → last beat, ms), which forgets a host a record's
# lifetime after its last beat, so the console lists hosts without scanning keys.
_BEAT = """
local host, me, now, forget = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[6])
redis.call('ZADD', KEYS[1], now, me)
local key = KEYS[2]
redis.call('HSET', key, me, now .. ' ' .. ARGV[5])
local lines = redis.call('HGETALL', key)
for i = 1, #lines, 2 do
  local at = tonumber(string.match(lines[i + 1], '^%d+'))
  if at == nil or at < now - forget then redis.call('HDEL', key, lines[i]) end
end
redis.call('EXPIRE', key, ARGV[7])
local hosts = KEYS[3]
redis.call('ZADD', hosts, now, host)
redis.call('ZREMRANGEBYSCORE', hosts, '-inf', now - tonumber(ARGV[7]) * 1000)
redis.call('EXPIRE', hosts, ARGV[7])
return 1
"""


def hosts_key(namespace: str) -> str:
    """The sorted set of host → its last beat (ms): the hosts with a record."""
    return f"{namespace}:hosts"


def host_key(namespace: str, host: str) -> str:
    """The hash of broker id → ``"{last beat, ms} {pid}"`` of the processes on ``host``.

    ``host`` is the machine's name, ``socket.gethostname()``, which on Kubernetes is the
    pod's name.
    """
    return f"{namespace}:hosts:{host}"


@dataclass(frozen=True, slots=True)
class ProcessBeat:
    """The last heartbeat of one worker process on a host."""

    broker_id: str
    pid: int
    age: float  # seconds since the beat, negative if the clock went back


def host_beats(
    client: Any, namespace: str, host: str, *, now: float | None = None
) -> list[ProcessBeat]:
    """The processes that beat on ``host`` lately, freshest first.

    Dead ones are forgotten after four ``redelivery_timeout``. The ages are measured with
    this machine's clock, so read them on the host itself, whose workers beat with the
    same clock.

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


def beat(
    client: redis.Redis, namespace: str, host: str, broker_id: str, *, timeout: float
) -> None:
    """One heartbeat of this process: Dramatiq's, and its line in ``host``'s record.

    Lines of processes silent for four ``timeout`` (dead ones) are dropped.
    """
    client.eval(
        _BEAT,
        3,
        heartbeats_key(namespace),
        host_key(namespace, host),
        hosts_key(namespace),
        namespace,
        host,
        broker_id,
        int(time.time() * 1000),
        os.getpid(),
        int(timeout * 4000),
        HOST_RECORD_TTL,
    )


def reap(
    client: redis.Redis,
    namespace: str,
    broker_id: str,
    queues: Iterable[str],
    *,
    timeout: float,
    ttl: int,
) -> int:
    """Take back the messages of processes silent for ``timeout`` seconds.

    Returns how many were taken back. ``queues`` are the canonical queue names. Their
    delay queues are reaped too.
    """
    canonical = list(queues)
    names = sorted({*canonical, *(dq_name(q) for q in canonical)})
    return int(
        client.eval(
            _REAP,
            0,
            namespace,
            int(time.time() * 1000),
            int(timeout * 1000),
            broker_id,
            ttl,
            *names,
        )
    )
