"""Limits shared by every worker process and host through Redis.

They are concurrency slots with leases that expire, sliding-window budgets (Office 365
mailboxes and SMTP connections alike), and the circuit breaker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import structlog
from redis.typing import EncodableT

from settings import OpenAuthService, Settings, SmtpConnection
from worker.broker.scripts import ThreadLocalScript

__all__ = [
    "Breaker",
    "Budget",
    "Slots",
    "Spent",
    "budgets",
    "graph_budget",
    "smtp_budget",
]

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

# KEYS: one sorted set per window. ARGV: now, member prefix, window count w, then per
# window its length (ms), limit and what it counts ("r" recipients, else messages),
# then each message's recipient count. Messages are spent in order while every window
# has room for them. Returns {messages spent, ms until the next one has room (-1: it
# never fits; 0: all were spent), the window that refused it (1-based; 0: none)}.
_SPEND = """
local now, prefix, nwin = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local span, limit, rcpt, used = {}, {}, {}, {}
for w = 1, nwin do
  local b = 4 + (w - 1) * 3
  span[w], limit[w], rcpt[w] = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), ARGV[b + 2] == 'r'
  redis.call('ZREMRANGEBYSCORE', KEYS[w], '-inf', now - span[w])
  used[w] = redis.call('ZCARD', KEYS[w])
end
local first = 4 + nwin * 3
local spent, wait, refused = 0, 0, 0
for m = first, #ARGV do
  local n = tonumber(ARGV[m])
  for w = 1, nwin do
    local wanted = rcpt[w] and n or 1
    if wanted > limit[w] then
      wait, refused = -1, w
      break
    end
    if used[w] + wanted > limit[w] then
      local oldest = used[w] + wanted - limit[w] - 1
      local freeing = redis.call('ZRANGE', KEYS[w], oldest, oldest, 'WITHSCORES')
      local until_free = tonumber(freeing[2]) + span[w] - now
      if until_free > wait then wait, refused = until_free, w end
    end
  end
  if refused > 0 then break end
  for w = 1, nwin do
    local wanted = rcpt[w] and n or 1
    for r = 1, wanted do
      redis.call('ZADD', KEYS[w], now, prefix .. ':' .. (m - first) .. ':' .. r)
    end
    used[w] = used[w] + wanted
  end
  spent = spent + 1
end
if spent > 0 then
  for w = 1, nwin do redis.call('PEXPIRE', KEYS[w], span[w]) end
end
return {spent, wait, refused}
"""

# The windows a budget can have: (setting, key suffix, length in ms, what it counts).
_WINDOWS = (
    ("messages_per_minute", "minute", 60_000, "m"),
    ("messages_per_hour", "hour", 3_600_000, "m"),
    ("recipients_per_day", "day", 86_400_000, "r"),
)


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


@dataclass(frozen=True, slots=True)
class Spent:
    """What a budget let through of some messages, in their order.

    Attributes:
        count: how many messages, from the first, were spent (and may be sent).
        wait: seconds until the next one has room (``inf``: it never fits, being
            larger than a budget); 0 when every message was spent.
        limit: the setting that refused the next one (``messages_per_minute``), or "".
    """

    count: int
    wait: float = 0.0
    limit: str = ""


class Budget:
    """Sending budgets of one mailbox or connection, shared by every worker.

    Messages per sliding minute and per sliding hour, recipients per sliding day; a
    limit of 0 is no budget. Office 365 mailboxes (``[[openauth]]``) and ``[[smtp]]``
    connections both spend through this one script.
    """

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        *,
        per_minute: int = 0,
        per_hour: int = 0,
        recipients_per_day: int = 0,
    ) -> None:
        self.key = key
        self.per_minute = per_minute
        self.per_hour = per_hour
        self.per_day = recipients_per_day
        limits = (per_minute, per_hour, recipients_per_day)
        # (setting, key, window ms, counts, limit) of each budget that is set.
        self._windows = [
            (name, f"{key}:{suffix}", span, counts, limit)
            for (name, suffix, span, counts), limit in zip(
                _WINDOWS, limits, strict=True
            )
            if limit > 0
        ]
        self._client = client
        # Over the thread's own connection, as the status writes: a call through
        # redis-py's pool costs twice the client CPU (docs/benchmarks.md). Not made
        # again when its reply is lost: that could spend twice.
        self._spend = ThreadLocalScript(client, _SPEND, idempotent=False)

    @property
    def unlimited(self) -> bool:
        """True when no budget is set."""
        return not self._windows

    def spend(self, recipients: int) -> float:
        """Spend one message and ``recipients``.

        Returns 0, or the seconds until there is room (``inf`` when the message alone is
        larger than a budget).
        """
        return self.spend_many([recipients]).wait

    def spend_many(self, recipients: Sequence[int]) -> Spent:
        """Spend messages in order, while every budget has room: one round trip.

        Args:
            recipients: each message's number of recipients.

        Returns:
            How many were spent, and what holds back the next one.
        """
        if self.unlimited or not recipients:
            return Spent(len(recipients))
        keys = [key for _, key, _, _, _ in self._windows]
        args: list[EncodableT] = [_now_ms(), uuid.uuid4().hex, len(self._windows)]
        for _, _, span, counts, limit in self._windows:
            args += [span, limit, counts]
        args += list(recipients)
        count, wait, refused = self._spend.run(keys, args)
        if refused == 0:
            return Spent(int(count))
        name = self._windows[int(refused) - 1][0]
        return Spent(int(count), float("inf") if wait < 0 else wait / 1000, name)

    def describe(self) -> dict[str, int]:
        """The budgets that are set, by setting name (``messages_per_minute``: 30)."""
        return {name: limit for name, _, _, _, limit in self._windows}

    def usage(self) -> dict[str, tuple[int, int]]:
        """Per budget that is set: (used in its window now, limit). One round trip."""
        now = _now_ms()
        with self._client.pipeline(transaction=False) as pipe:
            for _, key, span, _, _ in self._windows:
                pipe.zcount(key, f"({now - span}", "+inf")
            used = pipe.execute()
        return {
            name: (int(n), limit)
            for (name, _, _, _, limit), n in zip(self._windows, used, strict=True)
        }


def smtp_budget(client: redis.Redis, namespace: str, conn: SmtpConnection) -> Budget:
    """The sending budgets of one ``[[smtp]]`` connection, shared by every worker."""
    return Budget(
        client,
        f"{namespace}:budget:smtp:{conn.name}",
        per_minute=conn.messages_per_minute,
        per_hour=conn.messages_per_hour,
        recipients_per_day=conn.recipients_per_day,
    )


def graph_budget(client: redis.Redis, namespace: str, oa: OpenAuthService) -> Budget:
    """The sending budgets of one Office 365 mailbox, shared by every worker."""
    return Budget(
        client,
        f"{namespace}:budget:{oa.service_identity}",
        per_minute=oa.messages_per_minute,
        recipients_per_day=oa.recipients_per_day,
    )


def budgets(settings: Settings, client: redis.Redis) -> dict[str, Budget]:
    """The budgets of every enabled service that has one, by service name."""
    found = [
        (oa.name, graph_budget(client, settings.namespace, oa))
        for oa in settings.openauth
        if oa.enabled
    ] + [
        (conn.name, smtp_budget(client, settings.namespace, conn))
        for conn in settings.smtp
        if conn.enabled
    ]
    return {name: budget for name, budget in found if not budget.unlimited}


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
