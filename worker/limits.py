"""Limits shared by every worker process and host through Redis.

They are concurrency slots with leases that expire, sliding-window budgets, and the
circuit breaker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis
import structlog
from redis.typing import EncodableT

__all__ = ["Breaker", "Budget", "Slots"]

log = structlog.get_logger("mailworker.limits")

# KEYS[1] zset member → lease expiry (ms). ARGV: now, limit, expiry, member
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
  return 1
end
return 0
"""

# KEYS: minute zset, day zset. ARGV: now, per-minute limit, per-day limit, recipients, prefix
# Returns {1, 0} when both budgets had room (and were spent), else {0, ms until room}.
_SPEND = """
local now = tonumber(ARGV[1])
local windows = {60000, 86400000}
local wanted = {1, tonumber(ARGV[4])}
local wait = 0
for i = 1, 2 do
  local limit = tonumber(ARGV[i + 1])
  if limit > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - windows[i])
    local used = redis.call('ZCARD', KEYS[i])
    if wanted[i] > limit then return {0, -1} end
    if used + wanted[i] > limit then
      local freeing = redis.call('ZRANGE', KEYS[i], used + wanted[i] - limit - 1,
                                 used + wanted[i] - limit - 1, 'WITHSCORES')
      local until_free = tonumber(freeing[2]) + windows[i] - now
      if until_free > wait then wait = until_free end
    end
  end
end
if wait > 0 then return {0, wait} end
for i = 1, 2 do
  if tonumber(ARGV[i + 1]) > 0 then
    for n = 1, wanted[i] do redis.call('ZADD', KEYS[i], now, ARGV[5] .. ':' .. n) end
    redis.call('PEXPIRE', KEYS[i], windows[i])
  end
end
return {1, 0}
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


class Slots:
    """A counting semaphore across processes: at most ``limit`` holders of ``key``.

    A holder's lease expires after ``lease`` seconds, so a crashed holder frees its slot.
    """

    def __init__(
        self, client: redis.Redis, key: str, *, limit: int, lease: float
    ) -> None:
        self.key = key
        self.limit = limit
        self._lease_ms = int(lease * 1000)
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)

    def try_acquire(self) -> str | None:
        """Take a slot now if one is free and return its token."""
        token = uuid.uuid4().hex
        now = _now_ms()
        args: list[EncodableT] = [now, self.limit, now + self._lease_ms, token]
        return token if self._acquire(keys=[self.key], args=args) == 1 else None

    def acquire(self, timeout: float) -> str | None:
        """Wait up to ``timeout`` seconds for a slot, never overflowing."""
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            token = self.try_acquire()
            if token is not None or time.monotonic() >= deadline:
                return token
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def release(self, token: str) -> None:
        """Give a slot back.

        It never raises: with Redis away the lease expires instead. A release runs after
        a message went out, where an error would lose its outcome.
        """
        try:
            self._client.zrem(self.key, token)
        except redis.RedisError as exc:
            log.warning(
                "slot_release_failed", key=self.key, error_type=type(exc).__name__
            )

    @contextmanager
    def held(self, timeout: float) -> Iterator[bool]:
        """Hold a slot for the block.

        It yields False when none came free in time.
        """
        token = self.acquire(timeout)
        try:
            yield token is not None
        finally:
            if token is not None:
                self.release(token)


class Budget:
    """Per-mailbox sending budgets: messages per sliding minute, recipients per sliding day."""

    def __init__(
        self, client: redis.Redis, key: str, *, per_minute: int, recipients_per_day: int
    ) -> None:
        self.key = key
        self.per_minute = per_minute
        self.per_day = recipients_per_day
        self._spend = client.register_script(_SPEND)

    @property
    def unlimited(self) -> bool:
        """True when neither budget is set."""
        return self.per_minute == 0 and self.per_day == 0

    def spend(self, recipients: int) -> float:
        """Spend one message and ``recipients``.

        Returns 0, or the seconds until there is room (``inf`` when the message alone is
        larger than the daily budget).
        """
        if self.unlimited:
            return 0.0
        keys = [f"{self.key}:minute", f"{self.key}:day"]
        args: list[EncodableT] = [
            _now_ms(),
            self.per_minute,
            self.per_day,
            recipients,
            uuid.uuid4().hex,
        ]
        ok, wait = self._spend(keys=keys, args=args)
        if ok == 1:
            return 0.0
        return float("inf") if wait < 0 else wait / 1000


class Breaker:
    """A circuit breaker per service, shared through Redis.

    After ``failures`` consecutive failed deliveries a service is skipped for ``cooldown``
    seconds. Then one probe goes through, and a success closes it. The state is cached in
    the process for ``refresh`` seconds so a healthy service costs no round trip per job.

    The breaker is advice: with Redis away it lets every service be tried and forgets
    what it could not count, and none of its methods raises (they run after a message
    went out, where an error would lose what became of it). Opening and closing each
    write one line (``breaker_opened`` at error level, ``breaker_closed``).
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        *,
        failures: int,
        cooldown: float,
        refresh: float = 1.0,
    ) -> None:
        self._client = client
        self._ns = namespace
        self.failures = failures
        self.cooldown = cooldown
        self._refresh = refresh
        # name → (read at, count, open until)
        self._cache: dict[str, tuple[float, int, float]] = {}
        self._lock = threading.Lock()
        # Until then Redis is taken to be away: no call waits on it (a partitioned Redis
        # costs its connect timeout per call, for every job of a bulk message).
        self._away_until = 0.0

    def _key(self, service: str) -> str:
        return f"{self._ns}:breaker:{service}"

    def _state(self, service: str) -> tuple[int, float]:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(service)
        if cached and now - cached[0] < self._refresh:
            return cached[1], cached[2]
        count, until = self._client.hmget(self._key(service), "failures", "open_until")
        state = (int(count or 0), float(until or 0))
        with self._lock:
            self._cache[service] = (now, *state)
        return state

    def allow(self, service: str) -> bool:
        """True when the service may be tried.

        That is when the breaker is closed, this caller holds the probe, or Redis cannot
        say.
        """
        if self._away():
            return True
        try:
            _, until = self._state(service)
            if until == 0:
                return True
            if time.time() < until:
                return False
            # Cooling down is over: one probe across all workers.
            key = f"{self._key(service)}:probe"
            return bool(
                self._client.set(key, "1", nx=True, px=int(self.cooldown * 1000))
            )
        except redis.RedisError as exc:
            self._unavailable(service, exc)
            return True

    def success(self, service: str) -> None:
        """Close the breaker (one write, only when it had counted failures)."""
        if self._away():
            return
        try:
            count, until = self._state(service)
            if count or until:
                key = self._key(service)
                closed = self._client.delete(key, f"{key}:probe")
                with self._lock:
                    self._cache.pop(service, None)
                if until and closed:
                    log.warning("breaker_closed", service=service)
        except redis.RedisError as exc:
            self._unavailable(service, exc)

    def failure(self, service: str, *, hold: float | None = None) -> bool:
        """Count a failed delivery.

        It opens the breaker at the threshold, or at once for ``hold`` seconds (a quota
        error). Returns True when it is now open.
        """
        if self._away():
            return False
        try:
            return self._count_failure(service, hold)
        except redis.RedisError as exc:
            self._unavailable(service, exc)
            return False
        finally:
            with self._lock:
                self._cache.pop(service, None)

    def _count_failure(self, service: str, hold: float | None) -> bool:
        key = self._key(service)
        with self._client.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "failures", 1)
            pipe.hget(key, "open_until")
            pipe.expire(key, int(max(self.cooldown, hold or 0) * 4) + 60)
            count, was_until, _ = pipe.execute()
        if hold is None and count < self.failures:
            return False
        now = time.time()
        seconds = hold if hold is not None else self.cooldown
        self._client.hset(key, "open_until", f"{now + seconds:.3f}")
        self._client.delete(f"{key}:probe")
        if was_until is None or float(was_until) <= now:  # closed, or its probe failed
            log.error(
                "breaker_opened",
                service=service,
                failures=count,
                cooldown_s=round(seconds, 1),
                reason="quota" if hold is not None else "failures",
            )
        return True

    def _away(self) -> bool:
        return self._away_until > time.monotonic()

    def _unavailable(self, service: str, exc: redis.RedisError) -> None:
        self._away_until = time.monotonic() + self._refresh
        log.warning(
            "breaker_unavailable", service=service, error_type=type(exc).__name__
        )
