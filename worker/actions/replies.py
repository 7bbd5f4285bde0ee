"""Replies to action keys: decide, then record the outcome, the key and the event at once.

The outcome is written by ``acceptance.Acceptance``'s one script, which checks the key's
state again: of two replies racing for one key, exactly one is accepted, the other is
refused ``used``. The inbound record, the key's new state and the ``action.*`` event are
one step (DESIGN §9).
"""

from __future__ import annotations

import dataclasses
import time

import orjson
import redis

from common.keys import action_key, inbound_key
from settings import EmailActionsSettings, EventsSettings
from worker.actions.acceptance import Acceptance, Answer, InboundEntry
from worker.actions.confirm import Confirmations
from worker.actions.reply import Reply, keys_in, read_reply
from worker.actions.verdict import KeyRecord, Verdict, decide, key_record
from worker.clock import iso_millis
from worker.inbound.classify import Classification
from worker.inbound.model import Handled, InboundUnavailableError, Received
from worker.inbound.parse import Headers, UnreadableMessageError, parse

__all__ = ["ActionReplies"]


class ActionReplies:
    """Handles the messages addressed to an action key (``local+<key>@domain``).

    Args:
        client: the broker's Redis.
        namespace: the workers' namespace.
        settings: ``[email_actions]``.
        events: which event types go on the stream, and its length.
        ttl: how long an inbound record is kept (``status.ttl``), in seconds.
        confirmations: where confirmations are enqueued (``confirm_by_email``).
        mailboxes: the names of graph sources: Exchange Online mailboxes, whose copy
            shows whether the sender is authenticated.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str,
        settings: EmailActionsSettings,
        events: EventsSettings,
        ttl: float,
        confirmations: Confirmations | None = None,
        mailboxes: frozenset[str] = frozenset(),
    ) -> None:
        self._confirmations = confirmations
        self._mailboxes = mailboxes
        self._client = client
        self._ns = namespace
        self._settings = settings
        self._acceptance = Acceptance(
            client, namespace=namespace, events=events, ttl=ttl
        )

    def wants(self, found: Classification, received: Received) -> bool:
        """True when the message is addressed to a ``+`` tag of the reply address."""
        if found.unparseable:
            return False
        keys, malformed = keys_in(
            [*received.rcpt_to, *found.addressed_to],
            self._settings.local_part,
            self._settings.domain,
        )
        return bool(keys or malformed)

    def _read(
        self, found: Classification, received: Received
    ) -> tuple[Reply, list[str], str]:
        try:
            message = parse(received.raw, max_parts=1000, max_depth=10)
        except UnreadableMessageError:  # classify read it; a limit cannot differ
            message = parse(received.raw, max_parts=10**6, max_depth=100)
        reply = read_reply(
            message,
            received.rcpt_to,
            self._settings.local_part,
            self._settings.domain,
        )
        headers = Headers(message)
        authas = headers.token("x-ms-exchange-organization-authas")
        return reply, headers.raw("authentication-results"), authas

    def _decide(
        self, found: Classification, received: Received, record: KeyRecord | None,
        reply: Reply, auth: list[str], authas: str,
    ) -> Verdict:  # fmt: skip
        auto = ""
        if found.kind in ("bounce", "auto_reply"):
            auto = found.reason or found.kind
        if not auto and received.mail_from == "":
            auto = "null envelope sender"
        return decide(
            reply,
            record,
            auto_reply=auto,
            auth_fields=auth,
            settings=self._settings,
            now_ms=int(time.time() * 1000),
            exchange=authas if received.source in self._mailboxes else None,
        )

    def inspect(self, found: Classification, received: Received) -> Handled:
        """What the reply would do, read against Redis and written nowhere.

        Its ``details`` name the key, the action and the actor.

        Raises:
            InboundUnavailableError: Redis did not answer.
        """
        reply, auth, authas = self._read(found, received)
        record = self._record(reply)
        verdict = self._decide(found, received, record, reply, auth, authas)
        handled = self._handled(found, reply, record, verdict)
        handled.details["key"] = reply.keys[0] if len(reply.keys) == 1 else ""
        return handled

    def handle(self, found: Classification, received: Received) -> Handled:
        """Decide and record the reply, once; the key's state and its event with it.

        Raises:
            InboundUnavailableError: nothing was recorded; the source tries again.
        """
        reply, auth, authas = self._read(found, received)
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(inbound_key(self._ns, found.key))
                pipe.hgetall(self._key(reply) or "")
                previous, raw = pipe.execute()
            if previous:
                return _previous(found.key, previous)
            record = key_record(raw) if self._key(reply) else None
            verdict = self._decide(found, received, record, reply, auth, authas)
            handled = self._handled(found, reply, record, verdict)
            answer, entry = self._answer(received, reply, record, verdict, handled)
            outcome, reason = self._acceptance.write(answer, entry)
        except redis.RedisError as exc:
            raise InboundUnavailableError(f"cannot record: {exc}") from None
        if outcome == "duplicate":
            return self.handle(found, received)  # recorded meanwhile: read it
        handled = dataclasses.replace(handled, outcome=outcome, reason=reason)
        if self._confirmations is not None:
            self._confirmations.confirm(
                actor=handled.details["actor"],
                verdict=dataclasses.replace(verdict, outcome=outcome, reason=reason),
                subject=record.subject if record is not None else found.subject,
                reply_id=found.message_id,
                message_key=found.key,
                job_id=handled.job_id,
            )
        return handled

    def _key(self, reply: Reply) -> str | None:
        if len(reply.keys) != 1 or reply.malformed:
            return None
        return action_key(self._ns, reply.keys[0])

    def _record(self, reply: Reply) -> KeyRecord | None:
        key = self._key(reply)
        if key is None:
            return None
        try:
            return key_record(self._client.hgetall(key))  # type: ignore[arg-type]
        except redis.RedisError as exc:
            raise InboundUnavailableError(f"cannot read key: {exc}") from None

    @staticmethod
    def _handled(
        found: Classification,
        reply: Reply,
        record: KeyRecord | None,
        verdict: Verdict,
    ) -> Handled:
        actor = reply.senders[0] if reply.senders else ""
        return Handled(
            key=found.key,
            kind="action",
            outcome=verdict.outcome,
            reason=verdict.reason,
            job_id=record.job_id if record is not None else None,
            message_id=found.message_id,
            details={"action": verdict.action, "actor": actor},
        )

    def _answer(
        self,
        received: Received,
        reply: Reply,
        record: KeyRecord | None,
        verdict: Verdict,
        handled: Handled,
    ) -> tuple[Answer, InboundEntry]:
        now = iso_millis()
        fields = {
            "received_at": now,
            "source": received.source,
            "message_id": handled.message_id or "",
            "kind": "action",
            "job_id": handled.job_id or "",
            "key": handled.key,
            "details": orjson.dumps(handled.details).decode(),
        }
        answer = Answer(
            key=reply.keys[0] if self._key(reply) else "",
            verdict=verdict,
            job_id=handled.job_id or "",
            actor=handled.details["actor"],
            context=record.context if record is not None else {},
            via=received.source,
            message_id=handled.message_id,
            received_at=now,
        )
        return answer, InboundEntry(handled.key, fields)


def _previous(key: str, raw: dict[bytes, bytes]) -> Handled:
    data = {k.decode(): v.decode() for k, v in raw.items()}
    details = orjson.loads(data["details"]) if data.get("details") else {}
    return Handled(
        key=key,
        kind=data.get("kind", "action"),  # type: ignore[arg-type]
        outcome=data.get("outcome", "refused"),  # type: ignore[arg-type]
        reason=data.get("reason", ""),
        job_id=data.get("job_id") or None,
        message_id=data.get("message_id") or None,
        duplicate=True,
        details=details,
    )
