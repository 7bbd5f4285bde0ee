"""``/v1/notifications``: enqueue one, enqueue a batch, read a job's status record."""

from __future__ import annotations

from typing import Annotated, Any

from anyio import to_thread
from litestar import Request, Response, get, post
from litestar.params import HeaderParameter, Parameter

from producers import parse_job
from settings import JobValidationError
from worker.actions.keys import action_outcomes
from worker.api.auth import scoped
from worker.api.batches import enqueue_batch, read_batch
from worker.api.bodies import json_body
from worker.api.context import ApiContext
from worker.api.docs import problems
from worker.api.ids import check_job_id
from worker.api.problems import problem
from worker.api.schemas import Accepted, BatchResult, StatusDoc
from worker.metrics.recorder import recorder

__all__ = ["ROUTES"]


def _with_key(data: Any, header: str | None) -> Any:
    """The job with the Idempotency-Key header as its ``idempotency_key``."""
    if header is None or not isinstance(data, dict):
        return data
    given = data.get("idempotency_key")
    if given is not None and given != header:
        raise problem(
            422,
            "idempotency_key: differs from the Idempotency-Key header",
            errors=[{"field": "idempotency_key", "message": "differs from the header"}],
        )
    return {**data, "idempotency_key": header}


@post(
    "/v1/notifications",
    status_code=202,
    guards=[scoped],
    opt={"scope": "send", "body": "notification"},
    responses=problems(400, 409, 413, 415, 422),
    summary="Enqueue one notification",
    description="The job as JSON (attachments' content base64). With an Idempotency-Key "
    "header, the same key and body give the same id again; another body, 409.",
)
async def create_notification(
    request: Request[Any, Any, Any],
    idempotency_key: Annotated[
        str | None,
        HeaderParameter(name="Idempotency-Key", max_length=200, min_length=1),
    ] = None,
) -> Response[Accepted]:
    """Validate the job (as producers do) and enqueue it in one script."""
    context: ApiContext = request.app.state.api
    data = _with_key(await json_body(request), idempotency_key)
    job = parse_job(data)
    try:
        job_id = await context.enqueuer.enqueue(job)
    except JobValidationError as exc:
        if exc.field != "idempotency_key":
            raise
        raise problem(
            409,
            "idempotency_key: already used with another body",
            errors=[{"field": "idempotency_key", "message": exc.reason}],
        ) from None
    recorder().enqueued(job.priority, source="api")
    return Response(
        {"id": job_id},
        status_code=202,
        headers={"Location": f"/v1/notifications/{job_id}"},
    )


@post(
    "/v1/notifications/batch",
    status_code=200,
    guards=[scoped],
    opt={"scope": "send", "body": "batch"},
    responses=problems(400, 413, 415, 422),
    summary="Enqueue many notifications",
    description="A JSON array, or NDJSON (one job a line), of at most [api] max_batch "
    "jobs. Each item gets its id or its error, in order; a bad item (a line that is "
    "not JSON too) never refuses the others.",
)
async def create_batch(request: Request[Any, Any, Any]) -> BatchResult:
    """Validate each item on its own, then enqueue the valid ones in few round trips."""
    context: ApiContext = request.app.state.api
    items = await read_batch(request, context.settings.api.max_batch)
    # Hundreds of jobs take tens of ms: in a thread, the loop serves others meanwhile.
    return await to_thread.run_sync(enqueue_batch, context.producer, items)


@get(
    "/v1/notifications/{job_id:str}",
    guards=[scoped],
    opt={"scope": "read"},
    responses=problems(404),
    summary="The status record of one job",
)
async def get_notification(
    request: Request[Any, Any, Any],
    job_id: Annotated[str, Parameter(description="The job id.", max_length=200)],
) -> StatusDoc:
    """The record ``mailworker status --json`` prints; 404 when unknown or expired."""
    context: ApiContext = request.app.state.api
    check_job_id(job_id)
    record: dict[str, Any] | None = context.status.get(job_id)  # type: ignore[assignment]
    if record is None:
        raise problem(404, f"no job {job_id}: unknown, or expired after status.ttl")
    actions = action_outcomes(context.client, context.settings.namespace, job_id)
    if actions:
        record["actions"] = actions
    return record  # type: ignore[return-value]


ROUTES = [create_notification, create_batch, get_notification]
