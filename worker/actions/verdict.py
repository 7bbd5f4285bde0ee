"""The rules of DESIGN §10 applied to one reply, or one link, and the key's record, purely."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from settings import EmailActionsSettings
from worker.actions.authresults import proof
from worker.actions.reply import Reply

__all__ = ["REASONS", "KeyRecord", "Verdict", "decide", "decide_link", "key_record"]

Reason = Literal[
    "unknown_key",
    "expired",
    "used",
    "closed",
    "sender_mismatch",
    "unauthenticated",
    "unknown_action",
    "comment_required",
    "auto_reply",
]
REASONS: dict[str, str] = {
    "unknown_key": "the reply's key is unknown",
    "expired": "the key has expired",
    "used": "an action was already taken with this key",
    "closed": "the task no longer takes actions",
    "sender_mismatch": "the sender is not the recipient the key was issued for",
    "unauthenticated": "the sender could not be authenticated",
    "unknown_action": "the reply names none of the offered actions",
    "comment_required": "the action needs a comment",
    "auto_reply": "an automatic reply, bounce or list message",
}


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key's record as Redis keeps it (``worker.actions.keys``)."""

    job_id: str
    recipient: str
    actions: list[dict[str, str]]
    context: dict[str, Any]
    subject: str
    expires_at: int
    state: str
    action: str = ""
    actor: str = ""
    used_at: str = ""


def key_record(raw: dict[bytes, bytes]) -> KeyRecord | None:
    """The record from HGETALL's answer, or None when there is none."""
    if not raw:
        return None
    data = {k.decode(): v.decode() for k, v in raw.items()}
    return KeyRecord(
        job_id=data.get("job_id", ""),
        recipient=data.get("recipient", ""),
        actions=orjson.loads(data.get("actions", "[]")),
        context=orjson.loads(data.get("context", "{}")),
        subject=data.get("subject", ""),
        expires_at=int(data.get("expires_at", "0")),
        state=data.get("state", ""),
        action=data.get("action", ""),
        actor=data.get("actor", ""),
        used_at=data.get("used_at", ""),
    )


@dataclass(slots=True)
class Verdict:
    """What a reply does: accepted with an action (and comment), or refused with a reason."""

    outcome: Literal["accepted", "refused"]
    reason: str = ""
    action: str = ""
    comment: str = ""
    details: dict[str, str] = field(default_factory=dict)


def _action(reply: Reply, offered: list[dict[str, str]]) -> tuple[str, str]:
    """The offered action the subject (else the first line) names, and the comment.

    A first line that names the same action is not part of the comment.
    """
    names = {a["id"].lower(): a["id"] for a in offered}
    names.update({a["label"].lower(): a["id"] for a in offered})
    first = reply.first_line.lower().rstrip(".,;:! ")
    word = first.split(None, 1)[0].rstrip(".,;:!") if first else ""
    on_first = names.get(first) or names.get(word) or ""
    action = names.get(reply.subject_word) or on_first
    comment = reply.text
    if on_first == action and action:
        rest = reply.text.split("\n", 1)
        comment = rest[1].strip() if len(rest) > 1 else ""
    return action, comment


def _authenticated(
    reply: Reply,
    auth_fields: list[str],
    settings: EmailActionsSettings,
    exchange: str | None,
) -> bool:
    if settings.authentication == "none":
        return True
    if exchange is not None:
        # A mailbox's own copy can always show it: Exchange's intra-tenant mark (its
        # header firewall strips it from outside mail), else the topmost A-R.
        if exchange == "internal":
            return True
        return proof(auth_fields[:1], None, reply.senders[0]) == "pass"
    found = proof(auth_fields, settings.trusted_authserv_ids, reply.senders[0])
    if found == "absent":
        return settings.authentication == "auto"
    return found == "pass"


def decide(
    reply: Reply,
    record: KeyRecord | None,
    *,
    auto_reply: str,
    auth_fields: list[str],
    settings: EmailActionsSettings,
    now_ms: int,
    exchange: str | None = None,
) -> Verdict:
    """Apply the rules in order; the first that fails is the reason.

    Args:
        reply: the reply as read.
        record: its key's record (None: no such key).
        auto_reply: why it is an auto-reply, bounce or list message ("" if it is not).
        auth_fields: its Authentication-Results values, topmost first.
        settings: ``[email_actions]``.
        now_ms: the time now, in ms.
        exchange: for a reply read from an Exchange Online mailbox (a graph source),
            its ``X-MS-Exchange-Organization-AuthAs`` in lower case ("" if absent);
            None for other sources.
    """

    def refused(reason: Reason) -> Verdict:
        return Verdict("refused", reason)

    if auto_reply:
        return refused("auto_reply")
    if len(reply.keys) != 1 or reply.malformed:
        return refused("unknown_key")
    dead = _dead(record, now_ms)
    if dead is not None or record is None:
        return refused(dead or "unknown_key")
    senders = {*reply.senders, *([reply.sender_header] if reply.sender_header else [])}
    if len(reply.senders) != 1 or senders != {record.recipient.lower()}:
        return refused("sender_mismatch")
    if not _authenticated(reply, auth_fields, settings, exchange):
        return refused("unauthenticated")
    action, comment = _action(reply, record.actions)
    if not action:
        return refused("unknown_action")
    return _taken(record, action, comment)


def _dead(record: KeyRecord | None, now_ms: int) -> Reason | None:
    """Why the key takes no answer any more (None: it is live)."""
    if record is None:
        return "unknown_key"
    if record.state in ("used", "closed"):
        return "used" if record.state == "used" else "closed"
    if record.expires_at <= now_ms:
        return "expired"
    return None


def _taken(record: KeyRecord, action: str, comment: str) -> Verdict:
    """``action`` (one the key offers) taken with ``comment``, if it may be."""
    offered = next(a for a in record.actions if a["id"] == action)
    if offered.get("comment") == "required" and not comment:
        return Verdict("refused", "comment_required", action=action)
    return Verdict("accepted", action=action, comment=comment)


def decide_link(
    record: KeyRecord | None, action: str, comment: str, *, now_ms: int
) -> Verdict:
    """The rules that apply to an action link's POST, in the order replies apply them.

    The key in the link is the proof (its recipient is the actor), so the sender and
    authentication rules have nothing to check; the others are the replies' own.

    Args:
        record: the key's record (None: no such key).
        action: the action id in the link.
        comment: the comment typed on the page, stripped.
        now_ms: the time now, in ms.
    """
    # Unlike a reply's, a link's action is known whatever the verdict: its refusals name it.
    dead = _dead(record, now_ms)
    if dead is not None or record is None:
        return Verdict("refused", dead or "unknown_key", action=action)
    if not any(a["id"] == action for a in record.actions):
        return Verdict("refused", "unknown_action", action=action)
    return _taken(record, action, comment)
