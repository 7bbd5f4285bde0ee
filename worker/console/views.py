"""The console's pages apart from the dead letters: login, logout, overview, jobs,
the suppression list."""

from __future__ import annotations

import re
from typing import Any

import redis
from litestar import Controller, Request, get, post
from litestar.datastructures import Cookie
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, URLEncodedBody
from litestar.response import Redirect, Template

from settings import Settings
from worker.api.keys import ApiKeys
from worker.console import reads
from worker.console.session import COOKIE, ConsoleSessions
from worker.inbound.suppression import SuppressionList
from worker.status import StatusStore

__all__ = [
    "ID",
    "Form",
    "OverviewController",
    "SessionController",
    "base_of",
    "job_or_404",
    "page",
]

# What a job, poison or webhook dead-letter id can be; anything else is no such letter
# (and never reaches a Redis key).
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._@+-]{0,199}$")
Form = URLEncodedBody[dict[str, str]]
SUPPRESSED_SHOWN = 500


def base_of(request: Request[Any, Any, Any]) -> str:
    """The path the console is served under ("" at the root), for links and forms."""
    return str(request.scope.get("root_path") or "").rstrip("/")


def page(
    request: Request[Any, Any, Any],
    name: str,
    status_code: int = 200,
    **context: Any,
) -> Template:
    """A page of the console with what every page needs: its base path, who is in."""
    session = getattr(request.state, "session", None)
    return Template(
        template_name=name,
        context={
            "base": base_of(request),
            "who": session.key_name if session else None,
            **context,
        },
        status_code=status_code,
    )


def job_or_404(job_id: str) -> str:
    """The id when it can be one; else the page is not found."""
    if not ID.match(job_id):
        raise NotFoundException("no such dead letter")
    return job_id


def _settings(request: Request[Any, Any, Any]) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _client(request: Request[Any, Any, Any]) -> redis.Redis:
    client: redis.Redis = request.app.state.client
    return client


class SessionController(Controller):
    """Logging in with an ``ops`` key, and out."""

    @get("/login", sync_to_thread=True)
    def login_form(self, request: Request[Any, Any, Any]) -> Template:
        """The form with one field, ``key``."""
        return page(request, "login.html", title="Log in", problem=None)

    @post("/login", sync_to_thread=True)
    def login(self, request: Request[Any, Any, Any], data: Form) -> Template | Redirect:
        """Open a session for a key of scope ``ops``; refuse any other, saying why."""
        sessions: ConsoleSessions = request.app.state.sessions
        secret = (data.get("key") or "").strip()
        key = ApiKeys(_client(request), _settings(request).namespace).authenticate(
            secret
        )
        if key is None:
            problem = "That is not a valid API key (unknown, revoked or mistyped)."
            return page(request, "login.html", 401, title="Log in", problem=problem)
        if not key.allows("ops"):
            problem = (
                "That key does not carry the ops scope: the console needs a key "
                "created with --scopes ops."
            )
            return page(request, "login.html", 403, title="Log in", problem=problem)
        cookie = Cookie(
            key=COOKIE,
            value=sessions.open(key),
            path=base_of(request) or "/",
            max_age=sessions.ttl,
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return Redirect(path=f"{base_of(request)}/", status_code=303, cookies=[cookie])

    @post("/logout", sync_to_thread=True)
    def logout(self, request: Request[Any, Any, Any]) -> Redirect:
        """End the session in Redis and drop the cookie."""
        sessions: ConsoleSessions = request.app.state.sessions
        sessions.close(request.cookies.get(COOKIE))
        gone = Cookie(
            key=COOKIE,
            value="",
            path=base_of(request) or "/",
            max_age=0,
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return Redirect(
            path=f"{base_of(request)}/login", status_code=303, cookies=[gone]
        )


class OverviewController(Controller):
    """Queues, health, breakers, the last hour; one job's status; suppressions."""

    @get("/", sync_to_thread=True)
    def overview(self, request: Request[Any, Any, Any]) -> Template:
        """Queue depths, each host's workers, each service's breaker, the chart."""
        data = reads.overview(_client(request), _settings(request))
        chart = reads.chart(data["minutes"])
        return page(request, "overview.html", title="Overview", chart=chart, **data)

    @get("/jobs/{job_id:str}", sync_to_thread=True)
    def job(self, request: Request[Any, Any, Any], job_id: FromPath[str]) -> Template:
        """One job's status record: where it is now (after a requeue, say)."""
        settings = _settings(request)
        store = StatusStore(
            _client(request), namespace=settings.namespace, ttl=settings.status.ttl
        )
        record = store.get(job_or_404(job_id))
        if record is None:
            raise NotFoundException("no such job")
        return page(
            request,
            "job.html",
            title=f"Job {job_id}",
            record=record,
            requeued=request.query_params.get("requeued") == "1",
        )

    @get("/suppressed", sync_to_thread=True)
    def suppressed(self, request: Request[Any, Any, Any]) -> Template:
        """The suppression list, newest first (the first 500)."""
        listing = SuppressionList(
            _client(request), namespace=_settings(request).namespace
        )
        entries = listing.entries()
        return page(
            request,
            "suppressed.html",
            title="Suppressed addresses",
            entries=entries[:SUPPRESSED_SHOWN],
            total=len(entries),
            done=request.query_params.get("removed"),
        )

    @post("/suppressed/remove", sync_to_thread=True)
    def unsuppress(self, request: Request[Any, Any, Any], data: Form) -> Redirect:
        """Take one address off the list."""
        address = (data.get("address") or "").strip()[:320]
        listing = SuppressionList(
            _client(request), namespace=_settings(request).namespace
        )
        removed = bool(address) and listing.remove(address)
        return Redirect(
            path=f"{base_of(request)}/suppressed",
            status_code=303,
            query_params={"removed": address if removed else ""},
        )
