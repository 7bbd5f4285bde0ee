"""Action keys: one per recipient of a job, 128 random bits, kept in Redis with its rules."""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Sequence

import orjson
import redis

from common.keys import action_key, actions_key
from producers.job import Notification

__all__ = ["KEY", "ActionKeys", "action_outcomes", "new_key"]

# 26 lowercase base32 characters: 128 bits without padding.
KEY = re.compile(r"^[a-z2-7]{26}$")

# KEYS: the job's actions hash. ARGV: namespace, record ttl (s), now (ms), expires (ms),
# actions (JSON), context (JSON), subject, job id, then recipient/candidate key pairs.
# A recipient that has a key keeps it (a retry sends the same one); the others get
# the candidate, its record written in the same step.
_ISSUE = """
local keys = {}
for i = 9, #ARGV, 2 do
  local recipient, key = ARGV[i], ARGV[i + 1]
  local held = redis.call('HGET', KEYS[1], recipient)
  if held then
    key = held
  else
    redis.call('HSET', KEYS[1], recipient, key)
    local record = ARGV[1] .. ':action:' .. key
    redis.call('HSET', record, 'job_id', ARGV[8], 'recipient', recipient,
      'actions', ARGV[5], 'context', ARGV[6], 'subject', ARGV[7],
      'issued_at', ARGV[3], 'expires_at', ARGV[4], 'state', 'open')
    redis.call('EXPIRE', record, ARGV[2])
  end
  table.insert(keys, key)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return keys
"""


def new_key() -> str:
    """A fresh key: 128 random bits as 26 lowercase base32 characters."""
    return base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=").lower()


class ActionKeys:
    """Issues the keys of a job's recipients.

    Args:
        client: the broker's Redis.
        namespace: the workers' namespace.
        key_ttl: ``email_actions.key_ttl``: how long a key is live, in seconds.
        keep: how much longer its record is kept (``status.ttl``), in seconds.
    """

    def __init__(
        self, client: redis.Redis, *, namespace: str, key_ttl: float, keep: float
    ) -> None:
        self._namespace = namespace
        self._key_ttl = key_ttl
        self._record_ttl = int(key_ttl + keep)
        self._script = client.register_script(_ISSUE)

    def issue(
        self, job_id: str, notification: Notification, recipients: Sequence[str]
    ) -> dict[str, str]:
        """The key of each recipient, issued now or on an earlier attempt.

        Raises:
            redis.RedisError: Redis cannot be reached (nothing was sent yet).
        """
        if not recipients:
            return {}
        now = int(time.time() * 1000)
        actions = [a.model_dump(exclude_defaults=True) for a in notification.actions]
        args: list[str | int | bytes] = [
            self._namespace,
            self._record_ttl,
            now,
            now + int(self._key_ttl * 1000),
            orjson.dumps(actions),
            orjson.dumps(notification.action_context),
            notification.subject,
            job_id,
        ]
        for recipient in recipients:
            args += [recipient, new_key()]
        keys = self._script(keys=[actions_key(self._namespace, job_id)], args=args)
        return {r: k.decode() for r, k in zip(recipients, keys, strict=True)}

    def record_key(self, key: str) -> str:
        """The Redis key of ``key``'s record (``common.keys.action_key``)."""
        return action_key(self._namespace, key)


_OUTCOME_FIELDS = ["state", "action", "actor", "used_at", "expires_at", "closed_at"]


def action_outcomes(
    client: redis.Redis, namespace: str, job_id: str
) -> list[dict[str, str]]:
    """Per recipient of ``job_id``, whether an action came: ``mailworker status``.

    Each is ``{address, state, action, actor, at}``; ``state`` is ``open``, ``used``
    (an action was accepted), ``closed`` or ``expired``. The keys themselves are left
    out. Empty for a job without actions.

    Raises:
        redis.RedisError: Redis did not answer.
    """
    issued: dict[bytes, bytes] = client.hgetall(actions_key(namespace, job_id))  # type: ignore[assignment]
    if not issued:
        return []
    with client.pipeline(transaction=False) as pipe:
        for key in issued.values():
            pipe.hmget(action_key(namespace, key.decode()), _OUTCOME_FIELDS)
        rows = pipe.execute()
    now = int(time.time() * 1000)
    out = []
    for address, row in zip(issued, rows, strict=True):
        state, action, actor, used_at, expires_at, closed_at = (
            v.decode() if v is not None else "" for v in row
        )
        if state == "open" and expires_at and int(expires_at) <= now:
            state = "expired"
        out.append(
            {
                "address": address.decode(),
                "state": state or "expired",
                "action": action,
                "actor": actor,
                "at": used_at or closed_at,
            }
        )
    return out
