"""Dead-letter filters from a query or a JSON body: ``since``, ``reason``, ``service``."""

from __future__ import annotations

from worker.api.problems import problem
from worker.deadletter import REASONS, Filters, since_moment

__all__ = ["filters_of"]


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return since_moment(value)
    except ValueError:
        raise problem(
            400,
            f"since: {value[:80]!r} is neither a duration (2h, 7d) nor an ISO time",
            errors=[{"field": "since", "message": "not a duration nor an ISO time"}],
        ) from None


def filters_of(since: str | None, reason: str | None, service: str | None) -> Filters:
    """The filters ``mailworker dead list`` takes, checked as it checks them.

    Raises:
        ProblemDetailsException: 400 naming the filter at fault.
    """
    if reason is not None and reason not in REASONS:
        raise problem(
            400,
            f"reason: {reason[:80]!r} is not one of {', '.join(REASONS)}",
            errors=[{"field": "reason", "message": "not a dead letter's reason"}],
        )
    return Filters(since=_since(since), reason=reason, service=service)
