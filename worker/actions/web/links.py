"""Action links without HTTP: what a link's page shows, and its POST's acceptance.

A POST is decided by ``verdict.decide_link`` (the replies' rules that apply to a link)
and written by ``acceptance.Acceptance``, the replies' own script: of a reply and a link
racing for one key exactly one is accepted. The actor is the key's recipient.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from dataclasses import dataclass

import redis
import structlog

from common.keys import action_key
from settings import EventsSettings
from worker.actions.acceptance import Acceptance, Answer
from worker.actions.confirm import Confirmations
from worker.actions.verdict import KeyRecord, Verdict, decide_link, key_record
from worker.clock import iso_millis

__all__ = ["VIA", "ActionLinks", "Look", "loggable_path"]

VIA = "link"  # the `via` of an event accepted through a link
_KEY_IN_PATH = re.compile(r"^(/a)/[^/]+", re.IGNORECASE)


def loggable_path(path: str) -> str:
    """``path`` with an action link's key replaced: ``/a/<key>/approve``.

    An access log must never write a key; the HTTP API's log passes paths through it.
    """
    return _KEY_IN_PATH.sub(r"\1/<key>", path)


log = structlog.get_logger("mailworker.actions")


@dataclass(frozen=True, slots=True)
class Look:
    """What a link's GET finds, read and written nowhere.

    Attributes:
        state: ``open`` (the page offers the action), else the reason a POST would be
            refused for: ``unknown_key``, ``unknown_action``, ``used``, ``closed``,
            ``expired``.
        record: the key's record (None for an unknown key).
        action: the offered action (``{"id", "label", "comment"?}``), when there is one.
    """

    state: str
    record: KeyRecord | None
    action: dict[str, str] | None


class ActionLinks:
    """Reads and answers action keys for the link pages.

    Args:
        client: the broker's Redis.
        namespace: the workers' namespace.
        events: which event types go on the stream, and its length.
        ttl: ``status.ttl`` in seconds.
        confirmations: where ``confirm_by_email``'s message is enqueued (None: off).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str,
        events: EventsSettings,
        ttl: float,
        confirmations: Confirmations | None = None,
    ) -> None:
        self._client = client
        self._ns = namespace
        self._acceptance = Acceptance(
            client, namespace=namespace, events=events, ttl=ttl
        )
        self._confirmations = confirmations

    def _record(self, key: str) -> KeyRecord | None:
        return key_record(self._client.hgetall(action_key(self._ns, key)))  # type: ignore[arg-type]

    def look(self, key: str, action: str) -> Look:
        """What the page of ``key`` and ``action`` shows; only reads.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        record = self._record(key)
        verdict = decide_link(record, action, "-", now_ms=int(time.time() * 1000))
        offered = None
        if record is not None:
            offered = next((a for a in record.actions if a["id"] == action), None)
        state = "open" if verdict.outcome == "accepted" else verdict.reason
        return Look(state, record, offered)

    def act(
        self, key: str, action: str, comment: str
    ) -> tuple[Verdict, KeyRecord | None]:
        """Take ``action`` with ``comment`` on ``key``, once; the verdict as written.

        A refusal is written too (``action.refused``), as a reply's would be, except
        ``unknown_key``: a key that was never issued has no job to tell.

        Raises:
            redis.RedisError: Redis did not answer; nothing or everything was written.
        """
        record = self._record(key)
        verdict = decide_link(record, action, comment, now_ms=int(time.time() * 1000))
        if record is None:
            return verdict, None
        answer = Answer(
            key=key,
            verdict=verdict,
            job_id=record.job_id,
            actor=record.recipient,
            context=record.context,
            via=VIA,
            message_id=None,
            received_at=iso_millis(),
        )
        outcome, reason = self._acceptance.write(answer)
        if outcome == "duplicate":  # only a reply's write has a record to find
            raise AssertionError("a link's answer has no inbound record")
        written = dataclasses.replace(verdict, outcome=outcome, reason=reason)
        log.info(
            "action_link_answered",
            job_id=record.job_id,
            action=action,
            outcome=outcome,
            reason=reason,
        )
        if outcome == "accepted" and self._confirmations is not None:
            # A link can be forwarded with its mail: the recipient hears that it was used.
            self._confirmations.confirm(
                actor=record.recipient,
                verdict=written,
                subject=record.subject,
                reply_id=None,
                message_key="link:" + hashlib.sha256(key.encode()).hexdigest(),
                job_id=record.job_id,
            )
        return written, record
