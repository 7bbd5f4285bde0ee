"""The shapes of the API's answers, as the OpenAPI document shows them."""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = [
    "Accepted",
    "BatchItem",
    "BatchResult",
    "DeadLetterPage",
    "DeadLetterSummary",
    "EventsPage",
    "FieldProblem",
    "Health",
    "Problem",
    "Requeued",
    "RequeuedMany",
]


class Accepted(TypedDict):
    """A notification on the queue: its job id."""

    id: str


class FieldProblem(TypedDict):
    """One field at fault: its path in the request (``to[0].address``) and why."""

    field: str
    message: str


class _ProblemFields(TypedDict):
    type: str
    title: str
    status: int
    detail: str


class Problem(_ProblemFields, total=False):
    """An RFC 9457 problem (``application/problem+json``); ``errors`` names fields."""

    errors: list[FieldProblem]


class BatchItem(TypedDict, total=False):
    """One item's outcome, in the batch's order: ``id`` or ``error``."""

    id: str
    error: FieldProblem


class BatchResult(TypedDict):
    """The outcome of each item, and how many were accepted and rejected."""

    items: list[BatchItem]
    accepted: int
    rejected: int


class Recipient(TypedDict):
    """What became of one recipient."""

    address: str
    state: str
    code: int | str | None
    message: str


class ErrorDoc(TypedDict):
    """Why the job is not (yet) sent."""

    type: str
    code: int | None
    service: str | None
    message: str


class _StatusFields(TypedDict):
    id: str
    state: str
    service: str | None
    attempts: int
    error: ErrorDoc | None
    reason: str | None
    recipients: list[Recipient]
    skipped: list[dict[str, Any]]
    message_id: str | None
    queue: str | None
    created_at: str | None
    updated_at: str | None
    next_attempt_at: str | None
    dead_at: str | None
    metadata: dict[str, Any]


class StatusDoc(_StatusFields, total=False):
    """The status record of one job (README, "Status"); ``actions`` with e-mail actions."""

    history: list[dict[str, Any]]
    actions: list[dict[str, Any]]


class DeadLetterSummary(TypedDict):
    """One dead letter as ``mailworker dead list --json`` prints it."""

    id: str
    dead_at: str
    reason: str | None
    service: str | None
    attempts: int
    error: dict[str, Any]


class DeadLetterPage(TypedDict):
    """A page of dead letters, oldest first; ``next`` is the cursor of the next page."""

    dead_letters: list[DeadLetterSummary]
    next: str | None


class Requeued(TypedDict):
    """A dead letter back on its queue under the same id."""

    id: str
    state: str


class Refusal(TypedDict):
    """A dead letter that could not be requeued, and why."""

    id: str
    message: str


class RequeuedMany(TypedDict):
    """What a requeue by filter did; ``more`` when letters beyond ``limit`` matched."""

    requeued: list[str]
    refused: list[Refusal]
    more: bool


class Event(TypedDict):
    """One outcome event; ``stream_id`` is its position, what ``after`` takes."""

    stream_id: str
    id: str
    type: str
    job_id: str
    at: str
    data: Any


class EventsPage(TypedDict):
    """Events strictly after ``after``, oldest first; ``next`` is the last position."""

    events: list[Event]
    next: str


class Health(TypedDict):
    """The process (``/healthz``) or the broker (``/readyz``) is fine."""

    status: str
