"""The dead letters' pages: the filtered list, one letter, requeue and purge, each
change behind a confirmation page and a CSRF-checked form."""

from __future__ import annotations

from typing import Any

import orjson
import redis
from litestar import Controller, Request, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath
from litestar.response import Redirect, Template

from settings import Settings
from worker.console import reads
from worker.console.views import Form, base_of, job_or_404, page
from worker.deadletter import REASONS, DeadLetters, RequeueRefusedError

__all__ = ["BY_FILTER_CAP", "LettersController"]

BY_FILTER_CAP = 1000  # letters requeued per confirmed form: a request stays short
TEXT_SHOWN = 4000  # characters of a job's text and html shown on its page


def _store(request: Request[Any, Any, Any]) -> tuple[Settings, DeadLetters]:
    settings: Settings = request.app.state.settings
    client: redis.Redis = request.app.state.client
    store = DeadLetters(client, namespace=settings.namespace, ttl=settings.status.ttl)
    return settings, store


def _enabled_webhooks(settings: Settings) -> list[str]:
    return [w.name for w in settings.webhook if w.enabled]


def _shown_message(message: Any) -> str:
    """The elided message as indented JSON, long text and html cut."""
    if isinstance(message, dict) and isinstance(message.get("job"), dict):
        job = dict(message["job"])
        for key in ("text", "html"):
            if isinstance(job.get(key), str) and len(job[key]) > TEXT_SHOWN:
                job[key] = job[key][:TEXT_SHOWN] + f"… ({len(job[key])} characters)"
        message = {**message, "job": job}
    return orjson.dumps(message, option=orjson.OPT_INDENT_2).decode()


def _query(request: Request[Any, Any, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in request.query_params.items()}


def _confirm(request: Request[Any, Any, Any], job_id: str, action: str) -> Template:
    _, store = _store(request)
    shown = store.show(job_or_404(job_id))
    if shown is None:
        raise NotFoundException("no such dead letter")
    return page(
        request,
        "confirm.html",
        title=f"{action.capitalize()} {job_id}",
        action=action,
        record=shown,
    )


class LettersController(Controller):
    """``/letters``: what ``mailworker dead list|show|requeue|purge`` do, for people."""

    path = "/letters"

    @get("/", sync_to_thread=True)
    def listing(self, request: Request[Any, Any, Any]) -> Template:
        """Dead letters, newest first, filtered as ``dead list`` and paged."""
        _, store = _store(request)
        query = _query(request)
        chosen = reads.parse_filter(query)
        try:
            number = int(query.get("page") or 1)
        except ValueError:
            number = 1
        found = reads.letter_page(store, chosen, number)
        status = 400 if chosen.errors else 200
        return page(
            request,
            "letters.html",
            status,
            title="Dead letters",
            chosen=chosen,
            found=found,
            reasons=REASONS,
            done=query.get("done", ""),
        )

    @get("/requeue", sync_to_thread=True)
    def confirm_by_filter(self, request: Request[Any, Any, Any]) -> Template:
        """How many letters the filters select, and the form that requeues them."""
        _, store = _store(request)
        chosen = reads.parse_filter(_query(request))
        entries = [] if chosen.errors else store.entries(chosen.filters)
        return page(
            request,
            "confirm_filter.html",
            400 if chosen.errors else 200,
            title="Requeue dead letters",
            chosen=chosen,
            count=len(entries),
            before=max((e[1] for e in entries), default=0.0),
            cap=BY_FILTER_CAP,
            reasons=REASONS,
        )

    @post("/requeue", sync_to_thread=True)
    def requeue_by_filter(
        self, request: Request[Any, Any, Any], data: Form
    ) -> Template:
        """Requeue what the confirmed filters select, none that died after the page."""
        settings, store = _store(request)
        chosen = reads.parse_filter(data)
        if chosen.errors:
            return page(
                request, "confirm_filter.html", 400, title="Requeue dead letters",
                chosen=chosen, count=0, before=0.0, cap=BY_FILTER_CAP, reasons=REASONS,
            )  # fmt: skip
        try:
            before = float(data.get("before") or 0)
        except ValueError:
            before = 0.0
        ids = [e[0] for e in store.entries(chosen.filters) if e[1] <= before]
        requeued, refused = [], []
        for job_id in ids[:BY_FILTER_CAP]:
            try:
                store.requeue(
                    job_id, settings.limits, webhooks=_enabled_webhooks(settings)
                )
                requeued.append(job_id)
            except RequeueRefusedError as exc:
                refused.append((job_id, str(exc)))
        return page(
            request,
            "requeued.html",
            title="Requeued",
            requeued=requeued,
            refused=refused,
            left=max(0, len(ids) - BY_FILTER_CAP),
            chosen=chosen,
        )

    @get("/{job_id:str}", sync_to_thread=True)
    def letter(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> Template:
        """One dead letter: record, errors, recipients, attempts, the message elided."""
        _, store = _store(request)
        shown = store.show(job_or_404(job_id))
        if shown is None:
            raise NotFoundException("no such dead letter")
        return page(
            request,
            "letter.html",
            title=f"Dead letter {job_id}",
            record=shown,
            message=_shown_message(shown.get("message")),
            problem=None,
        )

    @get("/{job_id:str}/requeue", sync_to_thread=True)
    def confirm_requeue(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> Template:
        """The confirmation page of a requeue."""
        return _confirm(request, job_id, "requeue")

    @get("/{job_id:str}/purge", sync_to_thread=True)
    def confirm_purge(
        self, request: Request[Any, Any, Any], job_id: FromPath[str]
    ) -> Template:
        """The confirmation page of a purge."""
        return _confirm(request, job_id, "purge")

    @post("/{job_id:str}/requeue", sync_to_thread=True)
    def requeue(
        self, request: Request[Any, Any, Any], job_id: FromPath[str], data: Form
    ) -> Template | Redirect:
        """Validate again and enqueue under the same id; then show the job's status."""
        settings, store = _store(request)
        job_or_404(job_id)
        try:
            store.requeue(job_id, settings.limits, webhooks=_enabled_webhooks(settings))
        except RequeueRefusedError as exc:
            shown = store.show(job_id)
            if shown is None:
                raise NotFoundException("no such dead letter") from None
            return page(
                request, "letter.html", 409, title=f"Dead letter {job_id}",
                record=shown, message=_shown_message(shown.get("message")),
                problem=f"Requeue refused: {exc}",
            )  # fmt: skip
        return Redirect(
            path=f"{base_of(request)}/jobs/{job_id}",
            status_code=303,
            query_params={"requeued": "1"},
        )

    @post("/{job_id:str}/purge", sync_to_thread=True)
    def purge(
        self, request: Request[Any, Any, Any], job_id: FromPath[str], data: Form
    ) -> Redirect:
        """Delete one dead letter for good."""
        _, store = _store(request)
        if not store.purge(job_or_404(job_id)):
            raise NotFoundException("no such dead letter")
        return Redirect(
            path=f"{base_of(request)}/letters/",
            status_code=303,
            query_params={"done": "purged"},
        )
