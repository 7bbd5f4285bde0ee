"""What each route documents besides its answer: the problems it can give."""

from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec

from worker.api.schemas import Problem

__all__ = ["PROBLEM_TYPE", "problems"]

PROBLEM_TYPE = "application/problem+json"
_WHY = {
    400: "The request is malformed (bad JSON, a bad query parameter or id).",
    401: "No API key, or an unknown one.",
    403: "The key lacks the route's scope.",
    404: "No such id.",
    409: "A conflict: an Idempotency-Key used with another body, or a dead letter "
    "that cannot be requeued as it is.",
    413: "The body is over [api] max_body_bytes, or a batch over [api] max_batch.",
    415: "The Content-Type is not one the route reads.",
    422: "The content is invalid; `errors` names each field at fault.",
    429: "The key's rate limit is spent; Retry-After says when to try again.",
    503: "The broker cannot be reached.",
}
AUTH = (401, 403, 429, 503)


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    """Response specs of ``statuses`` (and of authentication's), each a problem."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            media_type=PROBLEM_TYPE,
            description=_WHY[status],
            generate_examples=False,
        )
        for status in sorted({*statuses, *AUTH})
    }
