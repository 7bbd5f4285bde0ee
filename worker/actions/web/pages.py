"""The action pages' templates, words and headers: escaped, no script, nothing cached.

Every response (pages, errors, HEAD) carries the same headers: ``no-store`` (a key's
page is nobody's to keep), ``no-referrer`` (the key in the path never leaves in a
``Referer``), ``noindex``, and a Content-Security-Policy that allows no script, no
image, no frame, only the page's own inline style (by its hash) and forms posted to
this origin.
"""

from __future__ import annotations

import base64
import hashlib
from importlib.resources import files
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from litestar.datastructures import MutableScopeHeaders
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Template
from litestar.types import Message, Scope

from worker.actions.verdict import KeyRecord

__all__ = [
    "CSS",
    "HEADERS",
    "MAX_COMMENT",
    "confirm_page",
    "engine",
    "outcome_page",
    "secure_headers",
]

MAX_COMMENT = 10_000  # characters: a comment, not a document
CSS = (files("worker.actions.web") / "templates" / "links.css").read_text("utf-8")
_CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}

# What a page says for each state of a key, or each refusal: (status, title, words).
_STATES: dict[str, tuple[int, str, str]] = {
    "unknown_key": (
        404,
        "This link is not valid",
        "Check that the whole link was opened: a mail program can break a long link "
        "across lines.",
    ),
    "unknown_action": (
        404,
        "No such action",
        "This e-mail does not offer that action.",
    ),
    "used": (
        409,
        "Already answered",
        "An action was already taken with this e-mail (a link or a reply). Nothing "
        "more can be done with it.",
    ),
    "closed": (409, "No longer open", "This task no longer takes actions."),
    "expired": (
        410,
        "This link has expired",
        "Its actions were open for a limited time only. Nothing was done.",
    ),
    "forbidden": (
        403,
        "This form cannot be used",
        "It has expired, or it was not sent from this page. Nothing was done. Open the "
        "action's page again and press its button.",
    ),
    "unavailable": (
        503,
        "Try again in a moment",
        "The service cannot reach its store right now. Nothing was done.",
    ),
    "too_long": (
        413,
        "That was too long",
        f"A comment can have at most {MAX_COMMENT:,} characters. Nothing was done.",
    ),
    "not_found": (404, "Not found", "There is no page here."),
    "not_allowed": (405, "Not possible", "This page cannot be used that way."),
    "bad_request": (400, "Not understood", "The request could not be read."),
    "failed": (500, "Something went wrong", "Nothing was done. Try again later."),
}


def engine() -> JinjaTemplateEngine:
    """The templates, autoescaped; a missing value is an error, never a blank."""
    environment = Environment(
        loader=PackageLoader("worker.actions.web", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
    )
    return JinjaTemplateEngine.from_environment(environment)


async def secure_headers(message: Message, scope: Scope) -> None:
    """``before_send``: the pages' headers on every response of the app."""
    if message["type"] == "http.response.start":
        headers = MutableScopeHeaders.from_message(message)
        for name, value in HEADERS.items():
            headers[name] = value


def _label(record: KeyRecord | None, action_id: str) -> str:
    if record is not None:
        for action in record.actions:
            if action["id"] == action_id:
                return action["label"]
    return action_id


def outcome_page(
    state: str,
    record: KeyRecord | None = None,
    *,
    again: str = "",
) -> Template:
    """The page for a key in ``state`` (or a refusal's reason), or an accepted action.

    Args:
        state: ``accepted``, a ``Look.state`` or refusal reason, or one of the page
            errors (``forbidden``, ``unavailable``, ...).
        record: the key's record, to name the task and the action taken.
        again: the action id whose page to offer again ("" for none).
    """
    subject = record.subject if record is not None else ""
    if state == "accepted":
        assert record is not None
        status, title = 200, "Done"
        message = (
            f"“{_label(record, record.action)}” was taken. You can close this page."
        )
    else:
        status, title, message = _STATES.get(state, _STATES["failed"])
        if state == "used" and record is not None and record.action:
            message = f"“{_label(record, record.action)}” was already taken. " + message
    context = {
        "title": title,
        "message": message,
        "subject": subject,
        "again": again,
        "css": CSS,
    }
    return Template("outcome.html", context=context, status_code=status)


def confirm_page(
    record: KeyRecord,
    action: dict[str, str],
    token: str,
    *,
    comment: str = "",
    error: str = "",
) -> Template:
    """The confirmation form of ``action``: the task, a comment field, one button."""
    required = action.get("comment") == "required"
    context: dict[str, Any] = {
        "title": f"{action['label']}: {record.subject}"[:200],
        "label": action["label"],
        "subject": record.subject,
        "context": [(str(k), _text(v)) for k, v in record.context.items()],
        "recipient": record.recipient,
        "token": token,
        "comment": comment,
        "comment_required": required,
        "max_comment": MAX_COMMENT,
        "error": error,
        "others": [a for a in record.actions if a["id"] != action["id"]],
        "css": CSS,
    }
    return Template("confirm.html", context=context, status_code=422 if error else 200)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)
