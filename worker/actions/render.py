"""Each recipient's own message: Reply-To with its key, a button and a line per action.

The buttons are tables with inline styles and no script, which Outlook (desktop and
web), Gmail and Apple Mail all draw; each is a ``mailto:`` that opens a reply to the
recipient's key with the action in the subject. With ``links_base_url`` each button is a
link to the action's confirmation page (``worker.actions.web``) instead, and the
``mailto:`` replies follow as plain links: both ways stay open.
"""

from __future__ import annotations

import html
from urllib.parse import quote

from producers.actions import Action
from producers.job import Mailbox, Notification
from settings import EmailActionsSettings

__all__ = ["action_link", "action_subject", "key_address", "mailto", "personal"]

# A mailto of at most ~1,000 characters opens in every client measured
# (shared research, "mailto links"): the subject is cut to keep it short.
_MAX_SUBJECT = 200
_BUTTON = (
    '<td style="padding:0 8px 8px 0">'
    '<table role="presentation" cellspacing="0" cellpadding="0" border="0">'
    '<tr><td bgcolor="#1a5fb4" style="border-radius:4px;background-color:#1a5fb4">'
    '<a href="{href}" target="_blank" style="display:inline-block;padding:10px 20px;'
    "font-family:Arial,Helvetica,sans-serif;font-size:15px;font-weight:bold;"
    'line-height:20px;color:#ffffff;text-decoration:none;border-radius:4px">'
    "{label}</a></td></tr></table></td>"
)
_NOTE = (
    '<p style="margin:4px 0 0 0;font-family:Arial,Helvetica,sans-serif;font-size:12px;'
    'line-height:18px;color:#555555">{text}</p>'
)
_HOW = (
    "Each button opens a reply: send it as it is, or write a comment above the "
    "quoted text first. Only a reply from this address counts, once."
)
_REPLIES = (
    '<p style="margin:4px 0 0 0;font-family:Arial,Helvetica,sans-serif;font-size:13px;'
    'line-height:20px;color:#333333">Or answer by e-mail: {links}</p>'
)
_REPLY_LINK = (
    '<a href="{href}" style="color:#1a5fb4;text-decoration:underline">{label}</a>'
)
_HOW_LINKS = (
    "Each button opens a page that asks you to confirm (and takes a comment); an "
    "e-mail answer opens a reply: write a comment above the quoted text. These links "
    "are yours alone, and one action counts, once."
)


def key_address(settings: EmailActionsSettings, key: str) -> str:
    """``local+<key>@domain``: where one recipient's replies go."""
    return f"{settings.local_part}+{key}@{settings.domain}"


def action_subject(action: Action, subject: str) -> str:
    """The subject of a reply that takes ``action``: its id first, then the subject."""
    return f"{action.id}: {subject[:_MAX_SUBJECT]}"


def mailto(address: str, action: Action, subject: str) -> str:
    """A ``mailto:`` that opens a reply taking ``action`` (spaces as %20, RFC 6068)."""
    return f"mailto:{address}?subject={quote(action_subject(action, subject), safe='')}"


def action_link(base_url: str, key: str, action: Action) -> str:
    """``<links_base_url>/a/<key>/<action id>``: the action's confirmation page.

    At most 200 + 62 characters: the key is 26 base32 characters and an id at most
    32 of ``[a-z0-9_-]``, neither needing escapes.
    """
    return f"{base_url}/a/{key}/{action.id}"


def _buttons(notification: Notification, address: str, key: str, base: str) -> str:
    def href(action: Action) -> str:
        if base:
            return action_link(base, key, action)
        return mailto(address, action, notification.subject)

    cells = "".join(
        _BUTTON.format(href=html.escape(href(a)), label=html.escape(a.label))
        for a in notification.actions
    )
    block = (
        '<table role="presentation" cellspacing="0" cellpadding="0" border="0" '
        'style="margin:16px 0 8px 0"><tr>' + cells + "</tr></table>"
    )
    if not base:
        return block + _NOTE.format(text=html.escape(_HOW))
    replies = " &middot; ".join(
        _REPLY_LINK.format(
            href=html.escape(mailto(address, a, notification.subject)),
            label=html.escape(a.label),
        )
        for a in notification.actions
    )
    return (
        block
        + _REPLIES.format(links=replies)
        + _NOTE.format(text=html.escape(_HOW_LINKS))
    )


def _lines(notification: Notification, address: str, key: str, base: str) -> str:
    lines = ["", "-- "]
    if base:
        lines.append("Act on this: open an action's page (it asks you to confirm),")
        lines.append("or send a reply whose subject starts with the action's word:")
    else:
        lines.append(
            "Reply to act on this. Send a reply whose subject starts with one of:"
        )
    for action in notification.actions:
        needs = " (write a comment)" if action.comment == "required" else ""
        lines.append(f"  {action.id}: {action.label}{needs}")
        if base:
            lines.append(f"    <{action_link(base, key, action)}>")
        lines.append(f"    <{mailto(address, action, notification.subject)}>")
    lines.append("Anything you write above the quoted text is kept as your comment.")
    return "\n".join(lines) + "\n"


def _with_buttons(page: str, block: str) -> str:
    """``block`` just before ``</body>``, or at the end of a fragment."""
    at = page.lower().rfind("</body>")
    return page + block if at < 0 else page[:at] + block + page[at:]


def personal(
    notification: Notification, key: str, settings: EmailActionsSettings
) -> Notification:
    """The notification as the recipient of ``key`` gets it.

    Its Reply-To is the key's address; the html part ends with a button per action, the
    text part with a line per action (with ``links_base_url``, each with its link too).
    """
    address = key_address(settings, key)
    base = settings.links_base_url
    update: dict[str, object] = {"reply_to": [Mailbox(address=address)]}
    if notification.text:
        update["text"] = (
            notification.text.rstrip("\n")
            + "\n"
            + _lines(notification, address, key, base)
        )
    if notification.html:
        update["html"] = _with_buttons(
            notification.html, _buttons(notification, address, key, base)
        )
    return notification.model_copy(update=update)
