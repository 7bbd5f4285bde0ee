"""``create_links_app``: the action links' pages, a Litestar app mounted at ``/a``.

``GET /a/<key>/<action>`` shows what the action is about and a form; it reads the key
and acts on nothing, so the link scanners of mail systems (Safe Links, Proofpoint, ...),
which fetch every link before the recipient sees the mail, change nothing. ``HEAD``
answers without reading anything. ``POST`` (the form's button) takes the action, once,
through the replies' own rules and script, with the page's token and from the page's
own origin; else ``403`` and nothing is done.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import urlsplit

import redis
import structlog
from litestar import Litestar, Request, Response, get, head, post
from litestar.concurrency import sync_to_thread
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.response import Template
from litestar.template.config import TemplateConfig

from producers.actions import ACTION_ID
from producers.enqueue import Producer
from settings import Settings
from worker.actions.confirm import Confirmations
from worker.actions.keys import KEY
from worker.actions.web.links import ActionLinks
from worker.actions.web.pages import (
    MAX_COMMENT,
    confirm_page,
    engine,
    outcome_page,
    secure_headers,
)
from worker.actions.web.tokens import FormTokens

__all__ = ["create_links_app"]

log = structlog.get_logger("mailworker.actions")
_PATH = "/{key:str}/{action:str}"
# A form of one token and a comment of MAX_COMMENT characters in the worst form
# encoding (a 4-byte UTF-8 character percent-encoded is 12 bytes), and room for the
# token and field names: a longer comment gets the page saying the limit, not a 413.
_MAX_BODY = 12 * MAX_COMMENT + 4096
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of an origin or URL, the scheme's default port as None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    scheme = parts.scheme.lower()
    if port == _DEFAULT_PORTS.get(scheme):
        port = None
    return scheme, parts.hostname.lower(), port


class _Guard:
    """Whether a POST came from one of our pages: same origin, and a valid token."""

    def __init__(self, base_url: str, tokens: FormTokens) -> None:
        self._own = _origin(base_url) if base_url else None
        self._tokens = tokens

    def cross_site(self, request: Request) -> bool:  # type: ignore[type-arg]
        """True for a POST the browser says came from elsewhere.

        ``Sec-Fetch-Site`` (every current browser sends it) must be ``same-origin``;
        an ``Origin`` must be ours: ``links_base_url``'s, else the request's own host.
        A client that sends neither (curl, old browsers) is judged by the token alone.
        """
        site = request.headers.get("sec-fetch-site")
        if site is not None and site.lower() != "same-origin":
            return True
        given = request.headers.get("origin")
        if given is None:
            return False
        origin = _origin(given)
        if origin is None:  # "null": a sandboxed or privacy-redirected form
            return True
        if self._own is not None:
            return origin != self._own
        host = _origin(f"{origin[0]}://{request.headers.get('host', '')}")
        return host is None or origin[1:] != host[1:]

    def token_valid(self, token: str, key: str, action: str) -> bool:
        """True when ``token`` is a page's token for this key and action.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        return bool(token) and self._tokens.valid(token, key, action)


def _well_formed(key: str, action: str) -> bool:
    return bool(KEY.match(key) and ACTION_ID.match(action))


def _error_page(request: Request, exc: Exception) -> Response:  # type: ignore[type-arg]
    """Every error as a page of ours, with the pages' headers; no details."""
    if isinstance(exc, redis.RedisError):
        log.warning("action_link_unavailable", error_type=type(exc).__name__)
        return outcome_page("unavailable")
    if isinstance(exc, HTTPException):
        state = {404: "not_found", 405: "not_allowed", 413: "too_long"}.get(
            exc.status_code, "bad_request"
        )
        return outcome_page(state)
    log.error("action_link_failed", error_type=type(exc).__name__)
    return outcome_page("failed")


class _Pages:
    """What each request gets: the handlers' bodies, apart from Litestar's wiring."""

    def __init__(self, links: ActionLinks, tokens: FormTokens, guard: _Guard) -> None:
        self._links, self._tokens, self._guard = links, tokens, guard

    def show(self, key: str, action: str) -> Template:
        """The GET: the form when the key takes the action, else why not. Only reads.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        look = self._links.look(key, action)
        if look.state == "open" and look.record is not None and look.action is not None:
            token = self._tokens.issue(key, action)
            return confirm_page(look.record, look.action, token)
        return outcome_page(look.state, look.record)

    async def answer(
        self,
        request: Request,  # type: ignore[type-arg]
        key: str,
        action: str,
    ) -> Template:
        """The POST: from our page (same origin, its token), then the acceptance.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        if self._guard.cross_site(request):
            return outcome_page("forbidden", again=action)
        form = await request.form()
        token, comment = form.get("token"), form.get("comment", "")
        if not isinstance(token, str) or not isinstance(comment, str):
            return outcome_page("forbidden", again=action)
        if not await sync_to_thread(self._guard.token_valid, token, key, action):
            return outcome_page("forbidden", again=action)
        comment = comment.replace("\r\n", "\n").strip()
        if len(comment) > MAX_COMMENT:
            return outcome_page("too_long", again=action)
        return await sync_to_thread(self._act, key, action, comment)

    def _act(self, key: str, action: str, comment: str) -> Template:
        verdict, record = self._links.act(key, action, comment)
        if verdict.outcome == "accepted" and record is not None:
            return outcome_page("accepted", dataclasses.replace(record, action=action))
        if verdict.reason == "comment_required" and record is not None:
            offered = next(a for a in record.actions if a["id"] == action)
            return confirm_page(
                record,
                offered,
                self._tokens.issue(key, action),
                error="This action needs a comment: write one, then press the button.",
            )
        return outcome_page(verdict.reason, record)


def create_links_app(settings: Settings, client: redis.Redis) -> Litestar:
    """The action links' app, to be mounted at ``/a`` by ``mailworker api``.

    Args:
        settings: the configuration (``[email_actions]``, ``[events]``, ``status.ttl``).
        client: the broker's Redis.
    """
    links = ActionLinks(
        client,
        namespace=settings.namespace,
        events=settings.events,
        ttl=settings.status.ttl,
        confirmations=_confirmations(settings, client),
    )
    tokens = FormTokens(client, namespace=settings.namespace)
    pages = _Pages(links, tokens, _Guard(settings.email_actions.links_base_url, tokens))

    @get(_PATH)
    async def show(key: FromPath[str], action: FromPath[str]) -> Template:
        key = key.lower()
        if not _well_formed(key, action):
            return outcome_page("unknown_key")
        return await sync_to_thread(pages.show, key, action)

    @head(_PATH)
    async def peek(key: FromPath[str], action: FromPath[str]) -> Response[None]:
        # Scanners probe with HEAD: answered without reading anything.
        return Response(content=None, status_code=200, media_type="text/html")

    @post(_PATH)
    async def answer(
        request: Request,  # type: ignore[type-arg]
        key: FromPath[str],
        action: FromPath[str],
    ) -> Template:
        key = key.lower()
        if not _well_formed(key, action):
            return outcome_page("unknown_key")
        return await pages.answer(request, key, action)

    return Litestar(
        route_handlers=[show, peek, answer],
        template_config=TemplateConfig(instance=engine()),
        before_send=[secure_headers],
        exception_handlers={Exception: _error_page},
        request_max_body_size=_MAX_BODY,
        openapi_config=None,
        logging_config=None,
    )


def _confirmations(settings: Settings, client: redis.Redis) -> Confirmations | None:
    """``confirm_by_email``'s producer, as ``mailworker inbound`` builds it."""
    if not settings.email_actions.confirm_by_email:
        return None
    producer = Producer(
        client,
        namespace=settings.namespace,
        limits=settings.limits,
        status_ttl=settings.status.ttl,
        idempotency_ttl=settings.status.idempotency_ttl,
    )
    return Confirmations(producer)
