"""The OpenAPI document: Litestar's, with the request bodies the handlers read themselves.

The handlers read their bodies raw (to cap, parse and validate them as producers do),
so Litestar cannot see their shape: it is added here, from ``Notification``'s own JSON
schema. Served at ``GET /openapi.json`` and written to ``docs/openapi.json``.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
from litestar import Request, Router
from litestar.enums import MediaType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import OpenAPIRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from producers import Notification

__all__ = ["document", "openapi_config", "write_document"]

_REF = "#/components/schemas/{model}"
OPEN = ("/healthz", "/readyz")  # the routes without a key


def _job_schemas() -> dict[str, Any]:
    schema = Notification.model_json_schema(ref_template=_REF)
    defs = schema.pop("$defs", {})
    # On the wire an attachment's content is base64 text.
    content = defs.get("Attachment", {}).get("properties", {}).get("content")
    if content is not None:
        content.clear()
        content.update({"type": "string", "format": "byte", "title": "Content"})
    schema["properties"]["schema_version"] = {"type": "integer", "enum": [1]}
    return {"Notification": schema, **defs}


def _bodies() -> dict[str, dict[str, Any]]:
    job = {"$ref": _REF.format(model="Notification")}
    return {
        "notification": {
            "required": True,
            "content": {"application/json": {"schema": job}},
        },
        "batch": {
            "required": True,
            "description": "A JSON array of jobs, or NDJSON: one job a line.",
            "content": {
                "application/json": {"schema": {"type": "array", "items": job}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        },
        "requeue_filter": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "since": {"type": "string"},
                            "reason": {"type": "string"},
                            "service": {"type": "string"},
                            "all": {"type": "boolean"},
                            "limit": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 10000,
                            },
                        },
                    }
                }
            },
        },
    }


def document(
    schema: dict[str, Any], bodies: dict[tuple[str, str], str]
) -> dict[str, Any]:
    """Litestar's document with the request bodies and the job's schemas added.

    Args:
        schema: what Litestar generated.
        bodies: (path, method) → the name of its body in ``_bodies``.
    """
    out = copy.deepcopy(schema)
    out.setdefault("components", {}).setdefault("schemas", {}).update(_job_schemas())
    known = _bodies()
    for (path, method), name in bodies.items():
        out["paths"][path][method]["requestBody"] = known[name]
    for path in OPEN:
        out["paths"][path]["get"]["security"] = []  # probes need no key
    return out


class _Json(OpenAPIRenderPlugin):
    """Serves the completed document as JSON at the router's own path."""

    def __init__(self, bodies: dict[tuple[str, str], str]) -> None:
        super().__init__(path="/", media_type=MediaType.JSON)
        self._bodies = bodies
        self._rendered: bytes | None = None

    def render(
        self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]
    ) -> bytes:
        if self._rendered is None:
            self._rendered = orjson.dumps(document(openapi_schema, self._bodies))
        return self._rendered


def openapi_config(version: str, bodies: dict[tuple[str, str], str]) -> OpenAPIConfig:
    """Litestar's OpenAPI config: one JSON document at ``/openapi.json``, bearer auth."""
    return OpenAPIConfig(
        title="mailworker",
        version=version,
        description="Enqueue notifications, read their status, work with dead letters "
        "and read outcome events. Errors are RFC 9457 problems "
        "(application/problem+json) whose `errors` name each field at fault.",
        render_plugins=[_Json(bodies)],
        openapi_router=Router(
            "/openapi.json", route_handlers=[], include_in_schema=False
        ),
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description="An API key: mailworker api-key create",
                )
            }
        ),
        security=[{"bearer": []}],
    )


def write_document(path: str) -> None:
    """Write the document of an app of the default configuration to ``path``."""
    from settings import Settings
    from worker.api.app import BODIES, create_app

    app = create_app(Settings())
    text = orjson.dumps(
        document(app.openapi_schema.to_schema(), BODIES),
        option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
    )
    with open(path, "wb") as handle:
        handle.write(text + b"\n")


if __name__ == "__main__":
    import sys

    write_document(sys.argv[1] if len(sys.argv) > 1 else "docs/openapi.json")
