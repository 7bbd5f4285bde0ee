"""``/v1/events``: the outcome events strictly after a position, oldest first."""

from __future__ import annotations

from typing import Annotated, Any, cast

from litestar import Request, get
from litestar.params import Parameter

from common.keys import events_key
from producers.events import Event
from worker.api.auth import scoped
from worker.api.context import ApiContext
from worker.api.docs import problems
from worker.api.ids import check_stream_id
from worker.api.schemas import EventsPage

__all__ = ["ROUTES"]


def _event(stream_id: bytes, fields: dict[bytes, bytes]) -> Event:
    import orjson

    text = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
    try:
        data = orjson.loads(text.get("data") or "null")
    except orjson.JSONDecodeError:
        data = text.get("data")
    return {
        "stream_id": stream_id.decode(),
        "id": text.get("id", ""),
        "type": text.get("type", ""),
        "job_id": text.get("job_id", ""),
        "at": text.get("at", ""),
        "data": data,
    }


@get(
    "/v1/events",
    guards=[scoped],
    opt={"scope": "read"},
    responses=problems(400),
    summary="Outcome events after a position",
    description="`after` is an event's `stream_id` (or `next` of the page before; "
    "`0` or none: from the oldest kept). The answer's `next` is the last one's, or "
    "`after` again when there is none yet: poll with it.",
)
async def list_events(
    request: Request[Any, Any, Any],
    after: Annotated[
        str, Parameter(description="A stream_id, e.g. 1733150000000-0.")
    ] = "0",
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
) -> EventsPage:
    """Events strictly after ``after``, at most ``limit``, oldest first."""
    context: ApiContext = request.app.state.api
    check_stream_id(after, "after")
    key = events_key(context.settings.namespace)
    # XREAD without BLOCK returns the entries strictly after the id, oldest first.
    replies = cast(
        "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None",
        context.client.xread({key: after}, count=limit),
    )
    events = [
        _event(stream_id, fields)
        for _, entries in replies or []
        for stream_id, fields in entries
        if fields
    ]
    return {"events": events, "next": events[-1]["stream_id"] if events else after}  # type: ignore[typeddict-item]


ROUTES = [list_events]
