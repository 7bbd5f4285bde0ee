"""``/v1/dead-letters``: list (filters, a cursor), show, requeue, purge, requeue by filter."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, cast

from litestar import Request, delete, get, post
from litestar.params import Parameter

from common.keys import dead_index_key
from worker.api.auth import scoped
from worker.api.bodies import json_body
from worker.api.context import ApiContext
from worker.api.docs import problems
from worker.api.filters import filters_of
from worker.api.ids import check_dead_id
from worker.api.problems import problem
from worker.api.schemas import DeadLetterPage, DeadLetterSummary, Requeued, RequeuedMany
from worker.deadletter import Filters, RequeueRefusedError
from worker.status import StatusRecord

__all__ = ["ROUTES"]

_WINDOW = 200  # index entries read at a time
_SCAN_LIMIT = 5000  # entries one page reads at most; then it ends early, with a cursor


def _summary(job_id: str, dead_at: float, record: StatusRecord) -> DeadLetterSummary:
    error: dict[str, Any] = dict(record["error"] or {})
    return {
        "id": job_id,
        "dead_at": datetime.fromtimestamp(dead_at, UTC).isoformat(timespec="seconds"),
        "reason": record.get("reason"),
        "service": error.get("service") or record["service"],
        "attempts": record["attempts"],
        "error": error,
    }


def _cursor(value: str | None) -> tuple[int, str]:
    if value is None:
        return 0, ""
    score, _, job_id = value.partition(":")
    if not score.isdigit() or len(score) > 20 or not job_id or len(job_id) > 300:
        raise problem(
            400,
            "cursor: give the `next` of the page before, as it was",
            errors=[{"field": "cursor", "message": "not a cursor of this API"}],
        )
    return int(score), job_id


def _page(
    context: ApiContext, filters: Filters, cursor: tuple[int, str], limit: int
) -> tuple[list[DeadLetterSummary], str | None]:
    """Up to ``limit`` letters after ``cursor`` (time of death ms, id), oldest first."""
    key = dead_index_key(context.settings.namespace)
    out: list[DeadLetterSummary] = []
    score, after = cursor
    offset = scanned = 0
    while scanned < _SCAN_LIMIT:
        window = cast(
            "list[tuple[bytes, float]]",
            context.client.zrangebyscore(
                key, score, "+inf", start=offset, num=_WINDOW, withscores=True
            ),
        )
        for raw, ms in window:
            scanned += 1
            job_id, at = raw.decode(), int(ms)
            if at == cursor[0] and job_id <= after:
                continue  # on the page before (same millisecond, ordered by id)
            record = context.status.get(job_id)
            if record is not None and filters.match(record, at / 1000):
                out.append(_summary(job_id, at / 1000, record))
                if len(out) == limit:
                    return out, f"{at}:{job_id}"
        if len(window) < _WINDOW:
            return out, None
        offset += _WINDOW
    last_id, last_ms = window[-1]
    return out, f"{int(last_ms)}:{last_id.decode()}"


@get(
    "/v1/dead-letters",
    guards=[scoped],
    opt={"scope": "read"},
    responses=problems(400),
    summary="Dead letters, oldest first, a page at a time",
    description="Filters as `mailworker dead list`. Follow `next` (as `cursor`) until it "
    "is null; a page may hold fewer than `limit` letters.",
)
async def list_dead_letters(
    request: Request[Any, Any, Any],
    since: Annotated[
        str | None,
        Parameter(description="Died within a duration (2h) or after a time."),
    ] = None,
    reason: Annotated[str | None, Parameter(description="Only this reason.")] = None,
    service: Annotated[
        str | None,
        Parameter(description="Only those this service refused, failed or skipped."),
    ] = None,
    cursor: Annotated[
        str | None, Parameter(description="`next` of the page before.")
    ] = None,
    limit: Annotated[int, Parameter(ge=1, le=500)] = 100,
) -> DeadLetterPage:
    """One page of the dead letters that pass every filter given."""
    context: ApiContext = request.app.state.api
    filters = filters_of(since, reason, service)
    context.dead.sweep()
    letters, after = _page(context, filters, _cursor(cursor), limit)
    return {"dead_letters": letters, "next": after}


@get(
    "/v1/dead-letters/{letter_id:str}",
    guards=[scoped],
    opt={"scope": "read"},
    responses=problems(400, 404),
    summary="One dead letter: record, attempts, errors, the message (elided)",
)
async def get_dead_letter(
    request: Request[Any, Any, Any],
    letter_id: Annotated[str, Parameter(max_length=300)],
) -> dict[str, Any]:
    """The record and the message, attachments shown as name, type, size and sha256."""
    context: ApiContext = request.app.state.api
    shown = context.dead.show(check_dead_id(letter_id))
    if shown is None:
        raise problem(404, f"no dead letter {letter_id}")
    return shown


def _requeue(context: ApiContext, letter_id: str) -> None:
    settings = context.settings
    enabled = [w.name for w in settings.webhook if w.enabled]
    context.dead.requeue(letter_id, settings.limits, webhooks=enabled)


@post(
    "/v1/dead-letters/{letter_id:str}/requeue",
    status_code=202,
    guards=[scoped],
    opt={"scope": "ops"},
    responses=problems(400, 404, 409),
    summary="Requeue one dead letter under the same id",
)
async def requeue_dead_letter(
    request: Request[Any, Any, Any],
    letter_id: Annotated[str, Parameter(max_length=300)],
) -> Requeued:
    """Validated again and enqueued; 409 when it cannot be sent again as it is."""
    context: ApiContext = request.app.state.api
    check_dead_id(letter_id)
    try:
        _requeue(context, letter_id)
    except RequeueRefusedError as exc:
        if context.dead.show(letter_id) is None:
            raise problem(404, f"no dead letter {letter_id}") from None
        raise problem(409, f"requeue refused: {exc}") from None
    return {"id": letter_id, "state": "queued"}


@delete(
    "/v1/dead-letters/{letter_id:str}",
    status_code=204,
    guards=[scoped],
    opt={"scope": "ops"},
    responses=problems(400, 404),
    summary="Purge one dead letter",
)
async def purge_dead_letter(
    request: Request[Any, Any, Any],
    letter_id: Annotated[str, Parameter(max_length=300)],
) -> None:
    """Deleted for good; its status record expires on its own."""
    context: ApiContext = request.app.state.api
    if not context.dead.purge(check_dead_id(letter_id)):
        raise problem(404, f"no dead letter {letter_id}")


def _requeue_filter(data: Any) -> tuple[Filters, int]:
    if not isinstance(data, dict):
        raise problem(
            422,
            "body: a JSON object",
            errors=[{"field": "body", "message": "must be an object"}],
        )
    allowed = {"since", "reason", "service", "all", "limit"}
    for name in data:
        if name not in allowed:
            raise problem(
                422,
                f"{name}: unknown field",
                errors=[{"field": str(name)[:80], "message": "unknown field"}],
            )
    for name in ("since", "reason", "service"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise problem(
                422,
                f"{name}: must be a string",
                errors=[{"field": name, "message": "must be a string"}],
            )
    limit = data.get("limit", 1000)
    if (
        not isinstance(limit, int)
        or isinstance(limit, bool)
        or not 1 <= limit <= 10_000
    ):
        raise problem(
            422,
            "limit: an integer from 1 to 10000",
            errors=[
                {"field": "limit", "message": "must be an integer from 1 to 10000"}
            ],
        )
    chosen = {n: data.get(n) for n in ("since", "reason", "service")}
    if not any(v is not None for v in chosen.values()) and data.get("all") is not True:
        raise problem(
            422,
            'all: give a filter, or "all": true to requeue every dead letter',
            errors=[{"field": "all", "message": "required (true) without a filter"}],
        )
    return filters_of(**chosen), limit


@post(
    "/v1/dead-letters/requeue",
    status_code=200,
    guards=[scoped],
    opt={"scope": "ops", "body": "requeue_filter"},
    responses=problems(400, 413, 415, 422),
    summary="Requeue every dead letter a filter selects",
    description="Body: `since`, `reason`, `service` (as `mailworker dead requeue --all`), "
    'or `{"all": true}`; `limit` (default 1000) bounds one call: `more` says to call again.',
)
async def requeue_dead_letters(request: Request[Any, Any, Any]) -> RequeuedMany:
    """Each selected letter validated again and enqueued; refusals listed with the reason."""
    context: ApiContext = request.app.state.api
    filters, limit = _requeue_filter(await json_body(request))
    entries = context.dead.entries(filters)
    requeued: list[str] = []
    refused = []
    for letter_id, _, _ in entries[:limit]:
        try:
            _requeue(context, letter_id)
            requeued.append(letter_id)
        except RequeueRefusedError as exc:
            refused.append({"id": letter_id, "message": str(exc)})
    return {"requeued": requeued, "refused": refused, "more": len(entries) > limit}  # type: ignore[typeddict-item]


ROUTES = [
    list_dead_letters,
    requeue_dead_letters,
    get_dead_letter,
    requeue_dead_letter,
    purge_dead_letter,
]
