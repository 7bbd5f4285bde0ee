"""The ``/ops/`` console's ASGI app: templates, static CSS, sessions, CSRF, the routes.

``create_console_app`` builds it; ``console_mount`` is the handler another Litestar app
(``mailworker api``) lists among its routes to serve it under a path. The console reads
its own prefix from the request's ``root_path``, so its links and form actions are right
wherever it is mounted (or under ``uvicorn --root-path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
import structlog
from jinja2 import Environment, FileSystemLoader
from litestar import Litestar, Request, Response, Router, asgi
from litestar.datastructures import MutableScopeHeaders, State
from litestar.exceptions import (
    HTTPException,
    NotFoundException,
    PermissionDeniedException,
)
from litestar.handlers.asgi_handlers import ASGIRouteHandler
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.types import Message, Receive, Scope, Send

from settings import Settings
from worker.console.csrf import csrf_config
from worker.console.letters import LettersController
from worker.console.session import COOKIE, ConsoleSessions, console_secret
from worker.console.views import OverviewController, SessionController, base_of, page

__all__ = ["console_mount", "create_console_app"]

log = structlog.get_logger("mailworker.console")

_HERE = Path(__file__).parent
_BODY_CAP = 64 * 1024  # the console's forms are a few fields


def _guard(request: Request[Any, Any, Any]) -> Redirect | None:
    """Send anyone without a live session to the login form."""
    sessions: ConsoleSessions = request.app.state.sessions
    session = sessions.find(request.cookies.get(COOKIE))
    if session is None:
        return Redirect(path=f"{base_of(request)}/login", status_code=303)
    request.state.session = session
    return None


def _page(
    request: Request[Any, Any, Any], status: int, title: str, text: str
) -> Template:
    return page(request, "error.html", status, title=title, text=text)


def _refused(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if "CSRF" in str(getattr(exc, "detail", "")):
        text = (
            "This form did not come with the console's token, or the token does not "
            "match: nothing was changed. Go back, reload the page and try again."
        )
        return _page(
            request, 403, "Refused: the form's token is missing or wrong", text
        )
    return _page(request, 403, "Refused", "This action is not allowed.")


def _not_found(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return _page(request, 404, "Not found", "There is no such page or dead letter.")


def _failed(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error(
        "console_request_failed",
        path=request.url.path,
        error_type=type(exc).__name__,
        exc_info=exc,
    )
    text = "The console could not show this page; the error is in the API's log."
    return _page(request, 500, "Something went wrong", text)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _page(request, exc.status_code, "Request refused", str(exc.detail))


# No script runs on any page: a subject or an error that slipped past escaping could
# not run either. Pages hold dead letters, so nothing is cached or framed.
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


async def _secure_headers(message: Message, scope: Scope) -> None:
    """Add ``_HEADERS`` to every response, error pages and routing's 404 included."""
    if message["type"] == "http.response.start":
        headers = MutableScopeHeaders.from_message(message)
        for name, value in _HEADERS.items():
            headers.setdefault(name, value)


def create_console_app(settings: Settings, client: redis.Redis) -> Litestar:
    """The console as an ASGI app of its own.

    Args:
        settings: the loaded configuration (``[api] session_ttl``, the namespace, the
            services whose breakers are shown).
        client: a Redis client on the broker (bytes replies).

    Returns:
        The Litestar app; serve it with uvicorn or mount it with ``console_mount``.
    """
    secret = console_secret(client, settings.namespace)
    sessions = ConsoleSessions(
        client, settings.namespace, secret=secret, ttl=settings.api.session_ttl
    )
    environment = Environment(
        loader=FileSystemLoader(_HERE / "templates"),
        autoescape=True,  # a subject or an error with HTML in it shows as text
        trim_blocks=True,
        lstrip_blocks=True,
    )
    protected = Router(
        path="/",
        route_handlers=[OverviewController, LettersController],
        before_request=_guard,
    )
    return Litestar(
        route_handlers=[
            SessionController,
            protected,
            create_static_files_router(
                path="/static", directories=[_HERE / "static"], name="static"
            ),
        ],
        template_config=TemplateConfig(
            engine=JinjaTemplateEngine.from_environment(environment)
        ),
        csrf_config=csrf_config(secret),
        exception_handlers={
            PermissionDeniedException: _refused,
            NotFoundException: _not_found,
            HTTPException: _http_error,
            Exception: _failed,
        },
        request_max_body_size=_BODY_CAP,
        before_send=[_secure_headers],
        state=State({"settings": settings, "client": client, "sessions": sessions}),
        openapi_config=None,
        debug=False,
    )


def console_mount(
    settings: Settings, client: redis.Redis, *, path: str = "/ops"
) -> ASGIRouteHandler:
    """A route handler serving the console under ``path`` in another Litestar app.

    Litestar's mount hands the app the rest of the path alone; this handler gives the
    console the ASGI ``root_path`` (the outer one plus ``path``) and the whole path, so
    the console knows where it lives. Each request gets a scope of its own.
    """
    app = create_console_app(settings, client)
    prefix = "/" + path.strip("/")

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        outer = scope.get("root_path", "") or ""
        rest = scope["path"] if scope["path"].startswith("/") else "/" + scope["path"]
        inner: dict[str, Any] = {
            key: value
            for key, value in scope.items()
            if key not in ("state", "path_params", "route_handler", "litestar_app")
        }
        root = outer + prefix
        inner.update(
            root_path=root,
            path=root + (rest if rest != "/" else "/"),
            raw_path=(root + rest).encode(),
            state={},
        )
        await app(inner, receive, send)  # type: ignore[arg-type]

    return asgi(path=prefix, is_mount=True, copy_scope=True)(serve)
