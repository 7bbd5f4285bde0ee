"""The status record's types, and pure helpers that turn an outcome into its fields."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

if TYPE_CHECKING:
    from worker.delivery import Outcome
    from worker.status import JobStart

__all__ = [
    "Counts",
    "ErrorRecord",
    "RecipientRecord",
    "RecordFields",
    "SkipRecord",
    "StatusRecord",
    "counts",
    "dead_event",
    "deferred_error",
    "error",
    "event",
    "in_doubt_events",
    "merge_recipients",
    "partial_error",
    "refused_error",
    "sent_event",
]


class ErrorRecord(TypedDict):
    """The ``error`` of a status record: why the job is not (yet) sent."""

    type: str
    code: int | None
    service: str | None
    message: str
    field: NotRequired[str]


class RecipientRecord(TypedDict):
    """What became of one recipient: ``accepted``, ``refused``, ``deferred``, and later
    ``suppressed`` (never tried) or ``bounced`` (``code`` is then the DSN's status)."""

    address: str
    state: str
    code: int | str | None
    message: str


class SkipRecord(TypedDict):
    """A service an attempt passed over, and why (``budget``, ``breaker_open``, ...)."""

    service: str
    reason: str
    message: str


class Counts(TypedDict):
    """How many recipients are in each state."""

    accepted: int
    refused: int
    deferred: int


class RecordFields(TypedDict, total=False):
    """The fields one status write sets (``StatusStore.pack``)."""

    id: str
    state: str
    reason: str
    error: ErrorRecord | None
    queue: str
    attempts: int
    service: str | None
    message_id: str | None
    recipients: list[RecipientRecord]
    counts: Counts
    partial: bool
    skipped: list[SkipRecord]
    metadata: dict[str, Any]
    created_at: str
    next_attempt_at: str
    dead_at: str
    send_at: str


class StatusRecord(TypedDict):
    """A job's status record as ``StatusStore.get`` returns it (README, Status)."""

    id: str
    state: str
    service: str | None
    attempts: int
    error: ErrorRecord | None
    reason: str | None
    recipients: list[RecipientRecord]
    counts: Counts | None
    partial: bool
    skipped: list[SkipRecord]
    message_id: str | None
    queue: str | None
    created_at: str | None
    updated_at: str | None
    next_attempt_at: str | None
    dead_at: str | None
    send_at: str | None
    metadata: dict[str, Any]
    history: NotRequired[list[dict[str, Any]]]


def sent_event(fields: RecordFields) -> dict[str, Any]:
    """The data of a ``delivery.sent`` event: who has the message, through what."""
    return {
        "service": fields.get("service"),
        "message_id": fields.get("message_id"),
        "attempts": fields.get("attempts"),
        "partial": fields.get("partial", False),
        "counts": fields.get("counts"),
        "recipients": fields.get("recipients", []),
        "metadata": fields.get("metadata", {}),
    }


def dead_event(
    reason: str, error: ErrorRecord, attempts: int, metadata: dict[str, Any]
) -> dict[str, Any]:
    """The data of a ``delivery.dead`` event: why the job ended undelivered."""
    return {
        "reason": reason,
        "error": error,
        "attempts": attempts,
        "metadata": metadata,
    }


def error(kind: str, message: str, *, field: str | None = None) -> ErrorRecord:
    """An ``error`` object of a status record (docs/design.md §6)."""
    record: ErrorRecord = {
        "type": kind,
        "code": None,
        "service": None,
        "message": message,
    }
    if field is not None:
        record["field"] = field
    return record


def deferred_error(outcome: Outcome) -> ErrorRecord:
    """The error of an attempt whose server deferred some recipients (4xx to RCPT)."""
    deferred = outcome.receipt.deferred
    if not deferred:
        return error("transient", "no service took the message")
    code, text = next(iter(deferred.values()))
    return {
        "type": "transient",
        "code": code,
        "service": outcome.service,
        "message": f"{len(deferred)} recipient(s) deferred: {text}",
    }


def refused_error(outcome: Outcome) -> ErrorRecord:
    """The error of an attempt whose server refused every recipient for good.

    It names that service and the first refusal's code, as a refused message's error does.
    """
    refused = outcome.receipt.refused
    if not refused:
        return error("permanent", "every recipient was refused")
    code, text = next(iter(refused.values()))
    return {
        "type": "recipient_refused",
        "code": code,
        "service": outcome.service,
        "message": f"every recipient was refused: {text}",
    }


def event(attempt: int, name: str, outcome: Outcome) -> dict[str, Any]:
    """A history entry for this attempt."""
    entry: dict[str, Any] = {
        "attempt": attempt,
        "event": name,
        "service": outcome.service,
    }
    if outcome.skipped:
        entry["skipped"] = outcome.skipped
    return entry


def in_doubt_events(attempt: int, outcome: Outcome) -> list[dict[str, Any]]:
    """History entries for this attempt's tries that lost the reply to the final dot.

    The server may have delivered what was sent again after them.
    """
    return [
        {"attempt": attempt, "event": "in_doubt", **doubt} for doubt in outcome.in_doubt
    ]


def merge_recipients(
    start: JobStart, wanted: list[str], outcome: Outcome
) -> list[RecipientRecord]:
    """Per-recipient outcomes so far: earlier ones, then this attempt's."""
    previous = {r["address"]: r for r in start.recipients}
    receipt = outcome.receipt
    merged: list[RecipientRecord] = []
    for address in wanted:
        if address in start.accepted or address in receipt.accepted:
            entry = previous.get(address) if address in start.accepted else None
            merged.append(
                entry
                or {
                    "address": address,
                    "state": "accepted",
                    "code": 250,
                    "message": receipt.response,
                }
            )
        elif address in receipt.refused or address in receipt.deferred:
            state = "refused" if address in receipt.refused else "deferred"
            code, text = receipt.refused.get(address) or receipt.deferred[address]
            merged.append(
                {"address": address, "state": state, "code": code, "message": text}
            )
        elif address in previous:
            merged.append(previous[address])
        else:
            merged.append(
                {"address": address, "state": "deferred", "code": None, "message": ""}
            )
    return merged


# Recipient states that mean "will not get it": refused by a server, suppressed by us,
# or accepted and then bounced.
_REFUSED = frozenset({"refused", "suppressed", "bounced"})


def suppressed_recipient(address: str, reason: str) -> RecipientRecord:
    """The record of a recipient left out because the suppression list holds it."""
    return {
        "address": address,
        "state": "suppressed",
        "code": None,
        "message": f"on the suppression list ({reason})",
    }


def counts(recipients: list[RecipientRecord]) -> Counts:
    """How many recipients were accepted, refused for good, and are still deferred.

    These are the record's ``counts``, so that a job some but not all recipients got is
    seen at once. A suppressed or bounced recipient counts as refused.
    """
    out: Counts = {"accepted": 0, "refused": 0, "deferred": 0}
    for recipient in recipients:
        state = recipient.get("state")
        if state == "accepted":
            out["accepted"] += 1
        elif state in _REFUSED:
            out["refused"] += 1
        elif state == "deferred":
            out["deferred"] += 1
    return out


def partial_error(
    recipients: list[RecipientRecord], service: str | None
) -> ErrorRecord:
    """The error of a job sent to some recipients while others were refused for good."""
    refused = [r for r in recipients if r.get("state") in _REFUSED]
    first = refused[0]
    code = first.get("code")
    return {
        "type": "recipient_refused",
        "code": code if isinstance(code, int) else None,
        "service": service,
        "message": f"{len(refused)} of {len(recipients)} recipient(s) refused: "
        f"{first.get('message') or ''}".rstrip(": "),
    }
