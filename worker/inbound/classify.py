"""What an inbound message is: a bounce, an auto-reply or other mail, read purely and never raising.

Bounces are looked for first, because a delivery report carries auto-reply signs too
(``Auto-Submitted``, a null sender). A message from a mail system that reports no failure
(a delivery report of successes, a MAILER-DAEMON message no detector understands) is
``other`` with a reason, so that it is kept for a person to look at rather than dropped
as an auto-reply. Auto-replies are recognised by the signals of RFC 3834 and common
practice, in this order: reports (read receipts), ``Auto-Submitted``, ``Return-Path: <>``,
``Precedence``, vendor headers, mailing-list headers, subjects. ``X-Auto-Response-Suppress``
is not a signal: it asks the receiver not to answer, it does not say the mail is automatic.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message
from typing import Literal

from worker.inbound.bounce import BounceReport, find_bounce, report_type
from worker.inbound.parse import (
    Headers,
    UnreadableMessageError,
    first_of,
    headers_only,
    parse,
)

__all__ = ["BounceReport", "Classification", "auto_reply_reason", "classify"]

_PRECEDENCE = ("bulk", "list", "junk", "auto_reply")
_VENDOR_HEADERS = (
    "X-Autoreply",
    "X-Autorespond",
    "X-Auto-Response",
    "X-Amazon-Auto-Reply",
)
_LIST_HEADERS = ("List-Id", "List-Unsubscribe")
# Outlook and Exchange localise their out-of-office subjects; these are the common ones.
_SUBJECTS = (
    "automatic reply:",
    "autoreply",
    "auto-reply",
    "out of office",
    "out of the office",
    "abwesenheitsnotiz",
    "automatische antwort",
    "réponse automatique",
    "risposta automatica",
    "respuesta automática",
    "automatisch antwoord",
)


@dataclass(frozen=True, slots=True)
class Classification:
    """What one inbound message is, read from its bytes alone.

    Attributes:
        kind: ``bounce`` (reports failed or delayed recipients), ``auto_reply`` or ``other``.
        key: the message's ``<Message-ID>`` as written, else ``sha256:<hex of raw>``.
        message_id: its Message-ID, or None.
        addressed_to: Delivered-To, X-Original-To, To and Cc addresses, in that order,
            lower case, each once.
        sender: the From address (domain lower case), "" if none.
        subject: the decoded subject.
        in_reply_to: the first id of In-Reply-To, or None.
        references: the ids of References, in order.
        original_message_id: a bounce's quoted original Message-ID (text/rfc822-headers,
            message/rfc822, or the quoted text of a plain-text bounce).
        original_job_id: the quoted original's X-Mailworker-Job-Id, if present.
        reports: the failed and delayed recipients; empty unless ``kind`` is bounce.
        reason: which signal made it an auto-reply, why a bounce-like message is
            ``other``, or which limit or fault made it unparseable.
        unparseable: the message could not be read safely; ``kind`` is then ``other``.
    """

    kind: Literal["bounce", "auto_reply", "other"]
    key: str
    message_id: str | None = None
    addressed_to: tuple[str, ...] = ()
    sender: str = ""
    subject: str = ""
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    original_message_id: str | None = None
    original_job_id: str | None = None
    reports: tuple[BounceReport, ...] = ()
    reason: str = ""
    unparseable: bool = False


def classify(
    raw: bytes, *, max_parts: int = 1000, max_depth: int = 10
) -> Classification:
    """Read ``raw`` and say what it is, without ever raising.

    Args:
        raw: the whole message as received.
        max_parts: more MIME entities than this make it unparseable.
        max_depth: nesting deeper than this makes it unparseable.

    Returns:
        The classification; ``unparseable=True`` with a reason naming the limit or fault
        when the message cannot be read safely.
    """
    if isinstance(raw, bytearray | memoryview):
        raw = bytes(raw)
    elif not isinstance(raw, bytes):
        return _unparseable(b"", f"not bytes ({type(raw).__name__})", None)
    try:
        return _classify(raw, max_parts, max_depth)
    except Exception as exc:  # the promise to every source: an answer for any bytes
        return _unparseable(raw, f"unreadable ({type(exc).__name__})", None)


def auto_reply_reason(message: Message, headers: Headers) -> str:
    """The first auto-reply signal of ``message`` (e.g. ``Precedence: bulk``), else ""."""
    kind = report_type(message)
    if kind == "disposition-notification":
        return "read receipt (report-type=disposition-notification)"
    if kind is not None:
        return f"report (report-type={kind})"
    if "auto-submitted" in headers and headers.token("auto-submitted") != "no":
        return f"Auto-Submitted: {headers.token('auto-submitted') or '(empty)'}"
    if headers.text("return-path").replace(" ", "") == "<>":
        return "null sender (Return-Path: <>)"
    if (precedence := headers.token("precedence")) in _PRECEDENCE:
        return f"Precedence: {precedence}"
    for name in _VENDOR_HEADERS + _LIST_HEADERS:
        if name.lower() in headers:
            return (
                f"mailing list ({name})" if name in _LIST_HEADERS else f"{name} header"
            )
    subject = headers.text("subject").lower()
    for prefix in _SUBJECTS:
        if subject.startswith(prefix):
            return f"subject starts with {prefix!r}"
    return ""


def _classify(raw: bytes, max_parts: int, max_depth: int) -> Classification:
    try:
        message = parse(raw, max_parts=max_parts, max_depth=max_depth)
    except UnreadableMessageError as exc:
        return _unparseable(raw, exc.reason, headers_only(raw))
    headers = Headers(message)
    common = _common(raw, headers)
    bounce = find_bounce(message, headers, raw)
    if bounce is not None:
        return dataclasses.replace(
            common,
            kind="bounce" if bounce.reports else "other",
            original_message_id=bounce.original_message_id,
            original_job_id=bounce.original_job_id,
            reports=bounce.reports,
            reason=bounce.reason,
        )
    reason = auto_reply_reason(message, headers)
    return dataclasses.replace(
        common, kind="auto_reply" if reason else "other", reason=reason
    )


def _common(raw: bytes, headers: Headers) -> Classification:
    """The fields every message has, as ``other``."""
    message_id = headers.msg_id("message-id")
    addressed_to = headers.addresses("delivered-to", "x-original-to", "to", "cc")
    return Classification(
        kind="other",
        key=message_id or _digest(raw),
        message_id=message_id,
        addressed_to=_unique(a.lower() for a in addressed_to),
        sender=_lower_domain(first_of(headers.addresses("from"))),
        subject=headers.text("subject"),
        in_reply_to=first_of(headers.msg_ids("in-reply-to")) or None,
        references=tuple(headers.msg_ids("references")),
    )


def _unparseable(raw: bytes, reason: str, headers: Headers | None) -> Classification:
    """``other`` and unparseable, with the top-level fields when its header could still be read."""
    if headers is None:
        common = Classification(kind="other", key=_digest(raw))
    else:
        try:
            common = _common(raw, headers)
        except Exception:  # fields unreadable: the digest will do
            common = Classification(kind="other", key=_digest(raw))
    return dataclasses.replace(common, reason=reason, unparseable=True)


def _digest(raw: bytes) -> str:
    return f"sha256:{hashlib.sha256(raw).hexdigest()}"


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _lower_domain(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address
