"""Bounces: RFC 3464 delivery reports read field by field, other formats found by flufl.bounce.

A delivery report (``multipart/report; report-type=delivery-status``) is read by
``worker.inbound.dsn``. Anything else that looks like a bounce (an ``X-Failed-Recipients`` header,
a sender such as MAILER-DAEMON, a null ``Return-Path`` or a bounce subject) goes to
flufl.bounce, whose detectors know Exim, qmail, old Exchange and many more. They give
addresses only, so the code and diagnostic come from the notice text next to each one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses

import flufl.bounce

from worker.inbound.dsn import (
    MAX_DIAGNOSTIC,
    Action,
    BounceReport,
    code_in,
    default_code,
    dsn_reports,
    lower_domain,
)
from worker.inbound.parse import (
    Headers,
    content_type,
    first_of,
    header_blocks,
    msg_id_in,
    normalise,
    param,
    parse_prefix,
    payload_text,
    subparts,
    walk_outer,
)

__all__ = ["Bounce", "BounceReport", "find_bounce", "report_type"]

# flufl.bounce runs some 60 line patterns over every body line (5 ms for 10 KB): it
# reads only the first 64 KB, where every format puts its notice.
FLUFL_MAX_BYTES = 64 * 1024
# Text read for codes near an address and for a quoted original's Message-ID.
TEXT_MAX = 256 * 1024

_HEADER_TYPES = {"text/rfc822-headers"}
_MESSAGE_TYPES = {"message/rfc822", "message/global", "message/global-headers"}
_REPORT_PARTS = {
    "message/delivery-status": "delivery-status",
    "message/global-delivery-status": "delivery-status",
    "message/disposition-notification": "disposition-notification",
    "message/global-disposition-notification": "disposition-notification",
}
_DAEMON = re.compile(
    r"(?:mailer[-_]?daemon|postmaster|microsoftexchange[0-9a-f]{32})@", re.IGNORECASE
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|delivery status notification|delivery (?:failure|has failed)"
    r"|failure notice|returned mail|mail delivery failed|could not be delivered"
    r"|unzustellbar|nicht zustellbar|non remis",
    re.IGNORECASE,
)
# A person replying to or forwarding a bounce is not a mail system reporting one.
_REPLY_PREFIX = re.compile(r"\s*(?:re|fwd?|aw|wg|tr)\s*:", re.IGNORECASE)
_QUOTED_ID = re.compile(
    r"^[ \t>]*message-id:[ \t]*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE
)
_QUOTED_JOB = re.compile(
    r"^[ \t>]*x-mailworker-job-id:[ \t]*([^\s<>;]{1,200})", re.IGNORECASE | re.MULTILINE
)
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n")
_TAG = re.compile(r"<[^>]*>")


@dataclass(frozen=True, slots=True)
class Bounce:
    """What a bounce-like message says, and (``reason``) why it has no reports."""

    reports: tuple[BounceReport, ...]
    original_message_id: str | None
    original_job_id: str | None
    reason: str


def find_bounce(message: Message, headers: Headers, raw: bytes) -> Bounce | None:
    """The bounce ``message`` is, or None when it does not look like one.

    Args:
        message: the parsed message.
        headers: its top-level header fields.
        raw: the message as received (flufl.bounce reads a prefix of a large one).

    Returns:
        A ``Bounce`` with its reports; one without reports (and a ``reason``) for a
        delivery report without failures or a mail-system message naming no failure;
        None for a message with no sign of a bounce.
    """
    strong = _bounce_signal(message, headers)
    if not strong and not _weak_signal(headers):
        return None
    notice = _Notice(message)
    reports: tuple[BounceReport, ...] = ()
    recognised = False
    if report_type(message) == "delivery-status":
        reports, recognised = dsn_reports(message, notice.near)
    if not reports and not recognised:
        reports = _detected_reports(message, raw, notice)
    if not reports and not strong:
        return None
    original_id, job_id = _original(message, notice)
    if reports:
        reason = ""
    elif recognised:
        reason = "delivery report without failures"
    else:
        reason = f"looks like a bounce ({strong}) but names no failed recipient"
    return Bounce(reports, original_id, job_id, reason)


def report_type(message: Message) -> str | None:
    """The report a ``multipart/report`` carries (``delivery-status``, ...), else None."""
    if content_type(message) != "multipart/report":
        return None
    declared = param(message, "report-type")
    if declared:
        return declared
    kinds = (_REPORT_PARTS.get(content_type(part)) for part in subparts(message))
    return first_of(kind or "" for kind in kinds) or "unknown"


def _bounce_signal(message: Message, headers: Headers) -> str:
    """What marks ``message`` as a mail system's report, or ""."""
    if report_type(message) == "delivery-status":
        return "a delivery status notification"
    if "x-failed-recipients" in headers:
        return "X-Failed-Recipients"
    sender = first_of(headers.addresses("from"))
    if _DAEMON.match(sender):
        return f"from {sender.rpartition('@')[0]}"
    return ""


def _weak_signal(headers: Headers) -> bool:
    """A null sender or a bounce subject: worth asking flufl.bounce, not proof."""
    if headers.text("return-path").replace(" ", "") == "<>":
        return True
    subject = headers.text("subject")
    return bool(_BOUNCE_SUBJECT.search(subject)) and not _REPLY_PREFIX.match(subject)


class _Notice:
    """The human-readable text of a bounce, decoded when first needed."""

    def __init__(self, message: Message) -> None:
        self._message = message
        self._text: str | None = None
        self._lower = ""

    def text(self) -> str:
        """Every text/plain part outside quoted messages (else the HTML, untagged)."""
        if self._text is None:
            self._text = _readable_text(self._message)
            self._lower = self._text.lower()
        return self._text

    def near(self, address: str, others: tuple[str, ...] = ()) -> str:
        """The paragraph from ``address``'s first mention, cut before another address."""
        text = self.text()
        start = self._lower.find(address.lower())
        if start < 0:
            return ""
        end = min(len(text), start + MAX_DIAGNOSTIC)
        if paragraph := _PARAGRAPH_END.search(self._lower, start, end):
            end = paragraph.start()
        for other in others:
            found = self._lower.find(other.lower(), start + len(address), end)
            if other.lower() != address.lower() and found >= 0:
                end = found
        return normalise(text[start:end])


def _readable_text(message: Message) -> str:
    texts: list[str] = []
    htmls: list[str] = []
    size = 0
    for part in walk_outer(message):
        ctype = content_type(part)
        if ctype in ("text/plain", "text/html") and size < TEXT_MAX:
            text = payload_text(part, TEXT_MAX - size)
            size += len(text)
            (texts if ctype == "text/plain" else htmls).append(text)
    if texts:
        return "\n\n".join(texts)
    return "\n\n".join(_TAG.sub(" ", html) for html in htmls)


def _detected_reports(
    message: Message, raw: bytes, notice: _Notice
) -> tuple[BounceReport, ...]:
    """flufl.bounce's permanent (failed) and temporary (delayed) addresses."""
    target = _detector_input(message, raw)
    if target is None:
        return ()
    try:
        temporary, permanent = flufl.bounce.all_failures(target)
    except Exception:  # a detector tripped over this message's shape: nothing found
        return ()
    failed = _addresses(permanent)
    delayed = [a for a in _addresses(temporary) if a not in failed]
    found = tuple(failed + delayed)
    groups: tuple[tuple[Action, list[str]], ...] = (
        ("failed", failed),
        ("delayed", delayed),
    )
    reports = []
    for action, addresses in groups:
        for address in addresses:
            near = notice.near(address, found)
            code = code_in(near) or default_code(action)
            reports.append(BounceReport(address, action, code, near[:MAX_DIAGNOSTIC]))
    return tuple(reports)


def _detector_input(message: Message, raw: bytes) -> Message | None:
    """What flufl.bounce reads: the message, or its first 64 KB, with a usable From."""
    small = len(raw) <= FLUFL_MAX_BYTES
    target = message if small else parse_prefix(raw, FLUFL_MAX_BYTES)
    if target is not None and not getaddresses([str(target.get("from", ""))]):
        # Its Yale detector takes the first From address unchecked, and the error it
        # raises on a missing or unreadable From stops every detector after it: a copy
        # gets the null address, which names no mail system.
        target = parse_prefix(raw, FLUFL_MAX_BYTES) if target is message else target
        if target is not None:
            del target["from"]
            target["From"] = "<>"
    return target


def _addresses(found: frozenset[bytes]) -> list[str]:
    decoded = (lower_domain(a.decode("ascii", "replace").strip("<>")) for a in found)
    return sorted({a for a in decoded if a})


def _original(message: Message, notice: _Notice) -> tuple[str | None, str | None]:
    """The Message-ID and X-Mailworker-Job-Id of the message that bounced, if quoted."""
    for part in walk_outer(message):
        ctype = content_type(part)
        fields: dict[str, str] = {}
        if ctype in _HEADER_TYPES:
            blocks = header_blocks(payload_text(part, TEXT_MAX))
            fields = blocks[0] if blocks else {}
        elif ctype in _MESSAGE_TYPES and (inner := subparts(part)):
            quoted = Headers(inner[0])
            fields = {n: quoted.text(n) for n in ("message-id", "x-mailworker-job-id")}
        message_id = msg_id_in(fields.get("message-id", ""))
        job_id = _job_id(fields.get("x-mailworker-job-id", ""))
        if message_id or job_id:
            return message_id, job_id
    text = notice.text()
    quoted_id = _QUOTED_ID.search(text)
    quoted_job = _QUOTED_JOB.search(text)
    return (
        quoted_id.group(1) if quoted_id else None,
        quoted_job.group(1) if quoted_job else None,
    )


def _job_id(value: str) -> str | None:
    value = value.strip()
    return value if value and len(value) <= 200 and " " not in value else None
