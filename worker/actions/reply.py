"""A reply to an action key, read purely: its keys, senders, action word and new text.

Quotes and signatures are removed by mail-parser-reply (Outlook, Gmail, Apple Mail and
``>`` quoting in many languages), never by rules of our own; an html-only reply is
turned into text first, without its ``<blockquote>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from html.parser import HTMLParser

from mailparser_reply import EmailReplyParser
from mailparser_reply.constants import MAIL_LANGUAGES, QUOTED_REMOVAL_REGEX

from worker.inbound.parse import Headers, payload_text, walk_outer

__all__ = ["Reply", "keys_in", "new_text", "read_reply"]

_TEXT_LIMIT = 256 * 1024
# Re:, AW:, SV:, Fwd: ... as mail clients in many languages prefix a reply's subject.
_PREFIX = re.compile(
    r"^\s*(?:(?:re|aw|sv|vs|ref|rif|res|antw|odp|wg|fw|fwd|tr|rv|enc)\s*(?:\[\d+\])?\s*[:：]\s*)+",
    re.IGNORECASE,
)
_WORD = re.compile(r"^\s*\[?\s*([^\s:\]]+)")
_PARSER = EmailReplyParser(languages=list(MAIL_LANGUAGES))
_QUOTED = re.compile(QUOTED_REMOVAL_REGEX)


@dataclass(frozen=True, slots=True)
class Reply:
    """What an action reply says, before any rule is applied.

    Attributes:
        keys: the action keys it is addressed to (envelope first), each once.
        malformed: addresses at the reply domain with a ``+`` tag that is no key.
        senders: From's addresses, lower case (several From addresses: all of them).
        sender_header: Sender's address, lower case, "" when absent.
        subject_word: the first word of the subject without Re:/AW:/..., lower case.
        first_line: the first line of the new text.
        text: the whole new text.
    """

    keys: tuple[str, ...]
    malformed: tuple[str, ...]
    senders: tuple[str, ...]
    sender_header: str
    subject_word: str
    first_line: str
    text: str


def keys_in(
    addresses: list[str], local: str, domain: str
) -> tuple[list[str], list[str]]:
    """The keys of ``local+<key>@domain`` among ``addresses``, and the malformed tags."""
    keys: list[str] = []
    malformed: list[str] = []
    prefix = f"{local}+"
    for address in addresses:
        name, _, host = address.lower().rpartition("@")
        if host != domain or not name.startswith(prefix):
            continue
        tag = name[len(prefix) :]
        target = keys if re.fullmatch(r"[a-z2-7]{26}", tag) else malformed
        if tag not in target:
            target.append(tag)
    return keys, malformed


class _HtmlText(HTMLParser):
    """The text of an html body, without quoted blocks, styles or scripts."""

    _SKIP = frozenset({"blockquote", "style", "script", "head", "title"})
    _BREAK = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "table"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BREAK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        elif tag in self._BREAK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _HtmlText()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # html.parser copes with most garbage; this is the rest
        return ""
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _body(message: Message) -> str:
    """The reply's own text: its first text/plain leaf, else its html as text."""
    html = ""
    for part in walk_outer(message):
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            return payload_text(part, _TEXT_LIMIT)
        if kind == "text/html" and not html:
            html = payload_text(part, _TEXT_LIMIT)
    return _html_text(html) if html else ""


def new_text(body: str) -> str:
    """The new text of a reply body: quotes and signature removed (mail-parser-reply)."""
    body = body.replace("\r\n", "\n").replace("\r", "\n")
    try:
        text = _PARSER.parse_reply(body) or ""
    except Exception:  # the library's regexes on hostile input: keep nothing
        return ""
    # The library splits at attribution lines ("On ... wrote:"); ">" lines without one
    # are removed with its own quote pattern.
    lines = [line for line in text.split("\n") if not _QUOTED.match(line)]
    return "\n".join(lines).strip()


def _word(text: str) -> str:
    match = _WORD.match(text)
    return match.group(1).lower().rstrip(".,;!") if match else ""


def read_reply(
    message: Message, rcpt_to: tuple[str, ...], local: str, domain: str
) -> Reply:
    """Read ``message`` as a reply to the reply address ``local@domain``."""
    headers = Headers(message)
    addresses = [
        *rcpt_to,
        *headers.addresses("delivered-to", "x-original-to", "to", "cc"),
    ]
    keys, malformed = keys_in(addresses, local, domain)
    text = new_text(_body(message))
    first = text.split("\n", 1)[0].strip()
    sender = headers.addresses("sender")
    return Reply(
        keys=tuple(keys),
        malformed=tuple(malformed),
        senders=tuple(a.lower() for a in headers.addresses("from")),
        sender_header=sender[0].lower() if sender else "",
        subject_word=_word(_PREFIX.sub("", headers.text("subject"))),
        first_line=first,
        text=text,
    )
