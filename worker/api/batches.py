"""A batch of notifications: read (JSON array or NDJSON), check each, enqueue the good.

Each item is validated on its own (``parse_job``, then ``Producer.check``), so one bad
item is reported and the others go on. Items without an idempotency key are enqueued
in one ``enqueue_many`` call (many jobs per broker message, few round trips). Items
with one are enqueued a broker message at a time, each message atomic: a message
whose key was used with another body writes nothing, that item is reported as the
conflict and the message is sent again without it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from litestar import Request

from common.keys import BATCH_SIZE
from producers import Notification, Producer, parse_job
from settings import JobValidationError
from worker.api.bodies import (
    JSON_TYPES,
    NDJSON_TYPES,
    Item,
    json_body,
    media_type,
    ndjson_items,
)
from worker.api.problems import problem
from worker.api.schemas import BatchItem, BatchResult
from worker.metrics.recorder import recorder

__all__ = ["enqueue_batch", "read_batch"]


async def read_batch(request: Request[Any, Any, Any], max_batch: int) -> list[Item]:
    """The batch's items, each (value, None) or (None, why its line is not JSON).

    Raises:
        ProblemDetailsException: 415, 400 (a JSON body that is not JSON), 422 (not an
            array), 413 (more than ``max_batch`` items or over the body cap).
    """
    kind = media_type(request)
    if kind not in JSON_TYPES | NDJSON_TYPES:
        raise problem(
            415,
            f"Content-Type {kind or '(none)'!r}: send application/json (an array) or "
            "application/x-ndjson (one job a line)",
            errors=[{"field": "Content-Type", "message": "unsupported media type"}],
        )
    if kind in JSON_TYPES:
        data = await json_body(request)
        if not isinstance(data, list):
            raise problem(
                422,
                "body: a batch is a JSON array of jobs",
                errors=[{"field": "body", "message": "must be an array"}],
            )
        items: list[Item] = [(value, None) for value in data]
    else:
        items = ndjson_items(await request.body())
    if len(items) > max_batch:
        raise problem(
            413,
            f"{len(items)} items; at most {max_batch} ([api] max_batch)",
            errors=[{"field": "body", "message": f"at most {max_batch} items"}],
        )
    return items


def _check(producer: Producer, value: Any, line_error: str | None) -> Notification:
    if line_error is not None:
        raise JobValidationError("body", line_error)
    job = parse_job(value)
    producer.check(job)
    return job


def enqueue_batch(producer: Producer, items: list[Item]) -> BatchResult:
    """Validate and enqueue each item; the outcome of each, in order.

    Raises:
        BrokerUnavailableError: the broker cannot be reached (some may be enqueued).
    """
    results: list[BatchItem | None] = [None] * len(items)
    plain: list[int] = []
    keyed: dict[str, list[int]] = {}
    jobs: dict[int, Notification] = {}
    for index, (value, line_error) in enumerate(items):
        try:
            jobs[index] = _check(producer, value, line_error)
        except JobValidationError as exc:
            results[index] = {"error": {"field": exc.field, "message": exc.reason}}
            continue
        if jobs[index].idempotency_key is None:
            plain.append(index)
        else:
            keyed.setdefault(jobs[index].priority, []).append(index)
    if plain:
        ids = producer.enqueue_many([jobs[i] for i in plain])
        for index, job_id in zip(plain, ids, strict=True):
            results[index] = {"id": job_id}
    for indexes in keyed.values():
        for start in range(0, len(indexes), BATCH_SIZE):
            _enqueue_keyed(producer, jobs, indexes[start : start + BATCH_SIZE], results)
    priorities = Counter(
        jobs[i].priority for i, r in enumerate(results) if r is not None and "id" in r
    )
    for priority, count in priorities.items():
        recorder().enqueued(priority, count, source="api")
    done = [r for r in results if r is not None]
    accepted = sum("id" in r for r in done)
    return {"items": done, "accepted": accepted, "rejected": len(done) - accepted}


def _enqueue_keyed(
    producer: Producer,
    jobs: dict[int, Notification],
    indexes: list[int],
    results: list[BatchItem | None],
) -> None:
    """One atomic broker message of jobs with keys; a conflicting one is left out."""
    pending = list(indexes)
    while pending:
        try:
            ids = producer.enqueue_many([jobs[i] for i in pending])
        except JobValidationError as exc:
            at = _conflict_position(exc.field, len(pending))
            results[pending.pop(at)] = {
                "error": {"field": "idempotency_key", "message": exc.reason}
            }
            continue
        for index, job_id in zip(pending, ids, strict=True):
            results[index] = {"id": job_id}
        return


def _conflict_position(field: str, count: int) -> int:
    """The position ``[3].idempotency_key`` names (``idempotency_key`` alone: one job)."""
    if count == 1 or not field.startswith("["):
        return 0
    return int(field[1 : field.index("]")])
