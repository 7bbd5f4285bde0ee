"""Errors as RFC 9457 problems (``application/problem+json``) that name the field.

Every problem has ``type``, ``title``, ``status`` and ``detail``; one about the request's
content adds ``errors``: ``[{"field": "to[0].address", "message": "..."}]``.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import redis
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)

from settings import BrokerUnavailableError, JobValidationError

__all__ = ["INTERNAL_HANDLERS", "TYPE_BASE", "FieldError", "problem", "problem_plugin"]

# Each kind of problem has a ``type`` URI under this base (README, "HTTP API").
TYPE_BASE = "urn:mailworker:problem:"
FieldError = dict[str, str]
_log = structlog.get_logger("mailworker.api")
_TYPES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "too-large",
    415: "unsupported-media-type",
    422: "invalid",
    429: "rate-limited",
    500: "internal",
    503: "unavailable",
}


def problem(
    status: int,
    detail: str,
    *,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> ProblemDetailsException:
    """The exception a handler raises for one problem.

    Args:
        status: the HTTP status.
        detail: what went wrong, in one line, without secrets.
        errors: the fields at fault, each ``{"field", "message"}``.
        headers: e.g. ``Retry-After`` or ``WWW-Authenticate``.
    """
    return ProblemDetailsException(
        status_code=status,
        detail=detail,
        title=HTTPStatus(status).phrase,
        type_=TYPE_BASE + _TYPES.get(status, "error"),
        extra={"errors": errors} if errors is not None else None,
        headers=headers,
    )


def _from_http(exc: HTTPException) -> ProblemDetailsException:
    if isinstance(exc, ProblemDetailsException):
        return exc
    status = exc.status_code
    if isinstance(exc, ValidationException):
        return problem(400, "the request is malformed", errors=_litestar_fields(exc))
    detail = exc.detail if exc.detail != HTTPStatus(status).phrase else ""
    if status == 413:
        detail = "the request body is larger than [api] max_body_bytes"
    return problem(
        status, detail or HTTPStatus(status).description, headers=exc.headers
    )


def _litestar_fields(exc: ValidationException) -> list[FieldError]:
    items = exc.extra if isinstance(exc.extra, list) else []
    fields = []
    for item in items:
        if isinstance(item, dict):
            name = str(item.get("key") or item.get("source") or "request")
            fields.append({"field": name, "message": str(item.get("message", ""))})
    return fields or [{"field": "request", "message": str(exc.detail)}]


def _from_job(exc: JobValidationError) -> ProblemDetailsException:
    return problem(
        422,
        f"{exc.field}: {exc.reason}",
        errors=[{"field": exc.field, "message": exc.reason}],
    )


def _from_broker(exc: BrokerUnavailableError) -> ProblemDetailsException:
    return problem(503, str(exc), headers={"Retry-After": "5"})


def _from_redis(exc: redis.RedisError) -> ProblemDetailsException:
    return problem(
        503,
        f"the broker cannot be used: {type(exc).__name__}",
        headers={"Retry-After": "5"},
    )


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # The traceback goes to the log (the renderer shows no locals); the client learns
    # nothing of the code.
    _log.error(
        "api_request_failed",
        method=request.method,
        path=request.url.path,
        error_type=type(exc).__name__,
        exc_info=exc,
    )
    return problem(500, "the server failed; the error is logged").to_response(request)


def problem_plugin() -> ProblemDetailsPlugin:
    """Litestar's RFC 9457 plugin, with our conversions of every error."""
    return ProblemDetailsPlugin(
        ProblemDetailsConfig(
            exception_to_problem_detail_map={
                HTTPException: _from_http,
                JobValidationError: _from_job,
                BrokerUnavailableError: _from_broker,
                redis.RedisError: _from_redis,
            }
        )
    )


INTERNAL_HANDLERS = {500: _internal, Exception: _internal}
