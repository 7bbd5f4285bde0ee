"""``/healthz`` (the process answers) and ``/readyz`` (the broker answers too)."""

from __future__ import annotations

from typing import Any

import redis
from litestar import Request, get
from litestar.openapi.datastructures import ResponseSpec

from worker.api.context import ApiContext
from worker.api.docs import PROBLEM_TYPE
from worker.api.problems import problem
from worker.api.schemas import Health, Problem

__all__ = ["ROUTES"]


@get("/healthz", summary="The process is up", security=[])
async def healthz() -> Health:
    """Always 200 while the process serves."""
    return {"status": "ok"}


@get(
    "/readyz",
    summary="The broker is reachable",
    security=[],
    responses={
        503: ResponseSpec(
            data_container=Problem,
            media_type=PROBLEM_TYPE,
            description="The broker does not answer.",
            generate_examples=False,
        )
    },
)
async def readyz(request: Request[Any, Any, Any]) -> Health:
    """200 when Redis answers a PING, else 503 (take the process out of rotation)."""
    context: ApiContext = request.app.state.api
    try:
        context.client.ping()
    except redis.RedisError as exc:
        raise problem(
            503, f"the broker does not answer: {type(exc).__name__}"
        ) from None
    return {"status": "ready"}


ROUTES = [healthz, readyz]
