"""Per-key rate limits shared by every API process: one token bucket per key in Redis.

The bucket (``{ns}:api:rate:NAME``) holds up to ``N`` tokens of a rate ``N/period`` and
refills continuously; one Lua script refills it and takes tokens, so the fleet shares
one limit. A process takes tokens in leases and spends them locally, so a busy process
asks Redis once per lease, not once per request. A lease lives a twentieth of the
period; its size follows the key's use in this process: twice the last lease when that
was spent in time, what was spent of it when not, at least 1 and at most 5 % of ``N``.
Tokens of a lease that expires unspent are lost: the fleet may serve a little less
than the limit, never more.
"""

from __future__ import annotations

import math
import time

import redis

from common.keys import api_rate_key
from settings.models import rate_parts

__all__ = ["Decision", "RateLimiter"]

# KEYS: bucket. ARGV: capacity, period (ms), now (ms), tokens wanted.
# Returns {granted, retry after (ms)}: granted >= 1, or 0 and when one token is back.
_TAKE = """
local cap, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, want = tonumber(ARGV[3]), tonumber(ARGV[4])
local held = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens, at = tonumber(held[1]) or cap, tonumber(held[2]) or now
if now > at then
  tokens = math.min(cap, tokens + (now - at) * cap / period)
  at = now
end
local grant = math.min(want, math.floor(tokens))
if grant >= 1 then tokens = tokens - grant end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', tostring(at))
redis.call('PEXPIRE', KEYS[1], period * 2)
if grant >= 1 then return {grant, 0} end
return {0, math.ceil((1 - tokens) * period / cap)}
"""

# (allowed, seconds until a request may be allowed again)
Decision = tuple[bool, int]


class RateLimiter:
    """Takes one token per request for a key, from the fleet's shared bucket.

    Args:
        client: the broker's Redis client.
        namespace: the key prefix.
        rate: ``[api] rate_limit`` (``"200/s"``).
    """

    def __init__(self, client: redis.Redis, namespace: str, rate: str) -> None:
        self.capacity, period = rate_parts(rate)
        self._period_ms = period * 1000
        self._lease = max(1, self.capacity // 20)
        self._lease_ttl = period / 20
        self._ns = namespace
        self._take = client.register_script(_TAKE)
        # name -> (tokens left, expiry, size of the lease)
        self._local: dict[str, tuple[int, float, int]] = {}

    def allow(self, name: str) -> Decision:
        """Take a token for key ``name``; (False, Retry-After seconds) when there is none.

        Raises:
            redis.RedisError: the broker cannot be reached (the request is refused).
        """
        now = time.monotonic()
        tokens, expiry, size = self._local.get(name, (0, 0.0, 0))
        if tokens > 0 and now < expiry:
            self._local[name] = (tokens - 1, expiry, size)
            return True, 0
        spent = size - tokens
        want = min(self._lease, max(1, 2 * size if tokens == 0 else spent))
        granted, retry_ms = self._take(
            keys=[api_rate_key(self._ns, name)],
            args=[self.capacity, self._period_ms, int(time.time() * 1000), want],
        )
        if int(granted) >= 1:
            self._local[name] = (int(granted) - 1, now + self._lease_ttl, int(granted))
            return True, 0
        self._local.pop(name, None)
        return False, max(1, math.ceil(int(retry_ms) / 1000))
