"""Request bodies: JSON documents and NDJSON lines, read within ``[api] max_body_bytes``.

Litestar refuses a body whose Content-Length is over the cap before reading it, and
one that streams past the cap as soon as it does (413); only then is it parsed here.
"""

from __future__ import annotations

from typing import Any

import orjson
from litestar import Request

from worker.api.problems import problem

__all__ = [
    "JSON_TYPES",
    "NDJSON_TYPES",
    "Item",
    "json_body",
    "media_type",
    "ndjson_items",
]

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl"}
)
# One item of a batch: a decoded value, or the problem of its line.
Item = tuple[Any, str | None]


def media_type(request: Request[Any, Any, Any]) -> str:
    """The request's media type, lower-cased, without parameters."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _unsupported(kind: str, allowed: frozenset[str]) -> Exception:
    return problem(
        415,
        f"Content-Type {kind or '(none)'!r} is not one of {', '.join(sorted(allowed))}",
        errors=[{"field": "Content-Type", "message": "unsupported media type"}],
    )


async def json_body(request: Request[Any, Any, Any]) -> Any:
    """The body as a JSON value.

    Raises:
        ProblemDetailsException: 415 for another media type, 400 for bad JSON, 413 for
            a body over the cap.
    """
    kind = media_type(request)
    if kind not in JSON_TYPES:
        raise _unsupported(kind, JSON_TYPES)
    raw = await request.body()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise problem(
            400,
            f"the body is not valid JSON: {exc}",
            errors=[{"field": "body", "message": f"not valid JSON: {exc}"}],
        ) from None


def ndjson_items(raw: bytes) -> list[Item]:
    """Each non-blank line of an NDJSON body: (value, None), or (None, why it is bad)."""
    items: list[Item] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append((orjson.loads(line), None))
        except orjson.JSONDecodeError as exc:
            items.append((None, f"line {number} is not valid JSON: {exc}"))
    return items
