"""E-mail actions on the producer's side: the ``actions`` of a job, and closing them."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, NamedTuple

import redis
from pydantic import AfterValidator, Field

from common.broker import broker_error
from common.keys import actions_key
from producers.validation import JobModel
from settings.models import header_text

__all__ = [
    "MAX_ACTIONS",
    "Action",
    "Closed",
    "check_actions",
    "check_context",
    "close_actions",
]

MAX_ACTIONS = 6
ACTION_ID = re.compile(r"^[a-z0-9_-]{1,32}$")
_CONTEXT_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_CONTEXT_BYTES = 2048

# KEYS: the job's actions hash. ARGV: namespace, now (ms).
# Every key of the job is closed at once; a used key keeps its outcome. The records'
# names are common.keys.action_key's.
_CLOSE = """
local keys = redis.call('HVALS', KEYS[1])
local closed = 0
for _, key in ipairs(keys) do
  local record = ARGV[1] .. ':action:' .. key
  local state = redis.call('HGET', record, 'state')
  if state == 'open' then
    redis.call('HSET', record, 'state', 'closed', 'closed_at', ARGV[2])
    closed = closed + 1
  end
end
return {#keys, closed}
"""


class Closed(NamedTuple):
    """What ``close_actions`` did: the keys a job has, and how many it closed now."""

    keys: int
    closed: int


class Action(JobModel):
    """One action a recipient can take by replying: ``{"id", "label", "comment"?}``.

    ``comment = "required"`` refuses a reply to it without a comment.
    """

    id: Annotated[str, Field(pattern=ACTION_ID.pattern)]
    label: Annotated[
        str, AfterValidator(header_text), Field(min_length=1, max_length=80)
    ]
    comment: Literal["required", "optional"] = "optional"


def check_actions(value: list[Action]) -> list[Action]:
    """Refuse more than ``MAX_ACTIONS`` actions, or one id twice.

    Raises:
        ValueError: the list breaks a rule.
    """
    if len(value) > MAX_ACTIONS:
        raise ValueError(f"{len(value)} actions; at most {MAX_ACTIONS}")
    seen: set[str] = set()
    for action in value:
        if action.id in seen:
            raise ValueError(f"the action id {action.id!r} is given twice")
        seen.add(action.id)
    return value


def check_context(value: dict[str, Any]) -> dict[str, Any]:
    """Refuse an ``action_context`` that is not a small flat object.

    Raises:
        ValueError: a key is not a plain name, or the whole is too large.
    """
    for key in value:
        if not _CONTEXT_KEY.match(key):
            raise ValueError(
                f"{key[:80]!r} is not a context key (letters, digits, _ . -)"
            )
    if len(repr(value)) > MAX_CONTEXT_BYTES:
        raise ValueError(f"larger than {MAX_CONTEXT_BYTES} bytes")
    return value


def close_actions(
    client: redis.Redis, namespace: str, job_id: str, *, now_ms: int, label: str
) -> Closed:
    """Close every action key of ``job_id``: later replies are refused ``closed``.

    Returns:
        The keys the job has (0: no such job, or none issued yet) and how many were
        closed now. A key already used or closed stays as it is.

    Raises:
        BrokerUnavailableError: Redis cannot be reached.
    """
    try:
        total, closed = client.eval(
            _CLOSE, 1, actions_key(namespace, job_id), namespace, now_ms
        )
    except redis.RedisError as exc:
        raise broker_error(label, exc) from None
    return Closed(int(total), int(closed))
