"""The API's composition root: ``create_app(settings) -> Litestar``.

It builds the stores once, registers the routes, the problem handlers, the OpenAPI
document and the access log, and mounts the other HTTP parts: the
``/ops`` console, the ``/a`` action-link pages and ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import redis
from litestar import Litestar, asgi
from litestar.datastructures import State
from litestar.handlers import ASGIRouteHandler
from litestar.types import Receive, Scope, Send

from common.broker import connect_settings
from settings import Settings
from worker.actions.web import create_links_app
from worker.api import deadletters, events, health, notifications
from worker.api.auth import KeyCache
from worker.api.context import ApiContext
from worker.api.openapi import openapi_config
from worker.api.problems import INTERNAL_HANDLERS, problem_plugin
from worker.console import create_console_app
from worker.metrics.exposition import asgi_app as metrics_app

__all__ = ["create_app", "mounts"]

ROUTES = [*notifications.ROUTES, *deadletters.ROUTES, *events.ROUTES, *health.ROUTES]
# The handlers that read their body themselves: its name in worker.api.openapi.
BODIES = {
    ("/v1/notifications", "post"): "notification",
    ("/v1/notifications/batch", "post"): "batch",
    ("/v1/dead-letters/requeue", "post"): "requeue_filter",
}
# The other HTTP parts, each its own ASGI app: (path, factory taking (settings, client)).
MOUNTED: tuple[tuple[str, Callable[[Settings, redis.Redis], Any]], ...] = (
    ("/ops", create_console_app),
    ("/a", create_links_app),
    ("/metrics", metrics_app),
)


def _mount(path: str, app: Callable[..., Any]) -> ASGIRouteHandler:
    @asgi(path, is_mount=True, copy_scope=True, include_in_schema=False)
    async def mounted(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send)

    return mounted


def mounts(settings: Settings, client: redis.Redis) -> list[ASGIRouteHandler]:
    """Route handlers for the console, the action links and the metrics."""
    return [_mount(path, build(settings, client)) for path, build in MOUNTED]


def create_app(
    settings: Settings, *, client: redis.Redis | None = None, mount: bool = True
) -> Litestar:
    """The HTTP API for ``settings``.

    Args:
        settings: the configuration (``[api]``, ``[limits]``, the broker).
        client: the broker's Redis client (one from ``broker_url`` when omitted).
        mount: mount the console, the action links and the metrics where installed
            (the console reads its session secret from Redis as it is built).

    Returns:
        The ASGI app. It connects to Redis lazily.
    """
    if client is None:
        client = connect_settings(settings)
    context = ApiContext.build(settings, client)
    return Litestar(
        route_handlers=[*ROUTES, *(mounts(settings, client) if mount else [])],
        state=State({"api": context, "key_cache": KeyCache()}),
        plugins=[problem_plugin()],
        exception_handlers=INTERNAL_HANDLERS,  # type: ignore[arg-type]
        openapi_config=openapi_config(version("mailworker"), BODIES),
        request_max_body_size=context.body_cap,
        debug=False,
        logging_config=None,
    )
