"""The ``/ops/`` console's ASGI app: templates, static CSS, sessions, CSRF, the routes.

``create_console_app`` builds it. Its links, form actions, redirects and cookie paths
start with the path it is served under: the ASGI ``root_path`` (``uvicorn --root-path``,
a Starlette-style mount), or the path of the Litestar mount that hands it the request
(``@asgi("/ops", is_mount=True)``, as ``mailworker api`` mounts it), which passes on only
the rest of the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
import structlog
from jinja2 import Environment, FileSystemLoader
from litestar import Litestar, Request, Response, Router
from litestar.datastructures import MutableScopeHeaders, State
from litestar.exceptions import (
    HTTPException,
    NotFoundException,
    PermissionDeniedException,
)
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.types import Message, Scope

from settings import Settings
from worker.console.csrf import csrf_config
from worker.console.letters import LettersController
from worker.console.session import COOKIE, ConsoleSessions, console_secret
from worker.console.views import OverviewController, SessionController, base_of, page

__all__ = ["ConsoleApp", "create_console_app"]

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


class ConsoleApp(Litestar):
    """The console's Litestar app, which finds the path it is mounted under.

    A Litestar mount hands over a scope whose ``path`` is what follows the mount's path,
    with ``root_path`` unchanged. The console then gets a scope of its own with that
    path added to ``root_path`` and the whole path in ``path``, as the ASGI spec has it;
    the outer scope is left as it was.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve a request, first making a Litestar mount's scope an ASGI one."""
        handler: Any = scope.get("route_handler") if scope["type"] == "http" else None
        if (
            getattr(handler, "is_mount", False)
            and scope.get("litestar_app") is not self
        ):
            scope = _unmounted(scope, sorted(handler.paths)[0])
        await super().__call__(scope, receive, send)


def _unmounted(scope: Any, mount: str) -> dict[str, Any]:
    outer = str(scope.get("root_path") or "").rstrip("/")
    root = outer + "/" + mount.strip("/")
    rest = str(scope["path"])
    rest = rest if rest.startswith("/") else "/" + rest
    dropped = ("state", "path_params", "route_handler", "litestar_app", "app")
    inner = {k: v for k, v in scope.items() if k not in dropped}
    inner.update(root_path=root, path=root + rest, state={})
    return inner


def create_console_app(settings: Settings, client: redis.Redis) -> Litestar:
    """The console as an ASGI app of its own.

    Args:
        settings: the loaded configuration (``[api] session_ttl``, the namespace, the
            services whose breakers are shown).
        client: a Redis client on the broker (bytes replies).

    Returns:
        The Litestar app; serve it with uvicorn or mount it in another app.
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
    return ConsoleApp(
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
