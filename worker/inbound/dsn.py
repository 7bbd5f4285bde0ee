"""RFC 3464 delivery status notifications, read block by block with the stdlib.

Each per-recipient block gives the address, the action, the status code and the
diagnostic. The pitfalls: the parser hands a ``message/delivery-status`` over as a list
of field blocks (``walk()`` yields them as text/plain parts), folded Diagnostic-Code
lines must be unfolded, and a few MTAs send the part base64 or quoted-printable encoded,
or as RFC 6533's ``message/global-delivery-status``, which the parser reads as one message.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Literal

from worker.inbound.parse import (
    Headers,
    content_type,
    decode_bytes,
    header_blocks,
    normalise,
    subparts,
    walk_outer,
)

__all__ = [
    "MAX_DIAGNOSTIC",
    "Action",
    "BounceReport",
    "code_in",
    "default_code",
    "dsn_reports",
    "lower_domain",
]

Action = Literal["failed", "delayed"]

MAX_DIAGNOSTIC = 500

_STATUS_TYPES = {"message/delivery-status", "message/global-delivery-status"}
_STATUS = re.compile(r"(?<![\d.])[245]\.\d{1,3}\.\d{1,3}(?![\d.])")
# In free text only failure classes count: a transcript's "250 2.1.5 Ok" is no bounce code.
_FAILURE_STATUS = re.compile(r"(?<![\d.])[45]\.\d{1,3}\.\d{1,3}(?![\d.])")
_REPLY = re.compile(r"(?<![\d.])([45])\d\d(?=[ -])")
_DIAGNOSTIC_TYPE = re.compile(r"^[A-Za-z][\w.-]*\s*;\s*")
_UTF8_XTEXT = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


@dataclass(frozen=True, slots=True)
class BounceReport:
    """One recipient a bounce reports as failed or delayed.

    Attributes:
        address: the recipient: Original-Recipient, else Final-Recipient, else the
            address the bounce names; the domain lower case, the local part as written.
        action: ``failed`` or ``delayed`` (the MTA still retries).
        code: the enhanced status code (``5.1.1``, ``4.4.7``); a bare SMTP reply gives
            its class (``550`` → ``5.0.0``); else ``5.0.0`` when failed, ``4.0.0`` when delayed.
        message: the diagnostic, whitespace normalised, at most 500 characters.
    """

    address: str
    action: Action
    code: str
    message: str


def dsn_reports(
    message: Message, near: Callable[[str], str]
) -> tuple[tuple[BounceReport, ...], bool]:
    """The failed and delayed recipients of a delivery report, each address and action once.

    Args:
        message: a ``multipart/report; report-type=delivery-status``.
        near: the notice text at an address, for a block without a code or diagnostic.

    Returns:
        The reports, and whether any recipient block could be read (a report of
        deliveries only has none, but was read).
    """
    reports: dict[tuple[str, str], BounceReport] = {}
    recognised = False
    for part in walk_outer(message):
        if content_type(part) not in _STATUS_TYPES:
            continue
        for block in _status_blocks(part):
            action = _action(block.get("action", ""))
            address = _recipient(block)
            if action == "other":
                recognised = True
            elif action is not None and address:
                recognised = True
                code, diagnostic = _dsn_code(block, action, near(address))
                report = BounceReport(address, action, code, diagnostic)
                reports.setdefault((address, action), report)
    return tuple(reports.values()), recognised


def _status_blocks(part: Message) -> list[dict[str, str]]:
    """The field blocks of a delivery-status part, however it was sent."""
    encoding = Headers(part).token("content-transfer-encoding")
    if content_type(part) == "message/delivery-status" and encoding not in (
        "base64",
        "quoted-printable",
    ):
        return [_fields(block) for block in subparts(part)]
    # message/global-delivery-status was parsed as one message (its first block as the
    # header); an encoded delivery-status as blocks of encoded lines: rebuild the text.
    text = "\n\n".join(_as_text(block) for block in subparts(part))
    data = text.encode("utf-8", "surrogateescape")
    try:
        if encoding == "base64":
            data = base64.b64decode(data)
        elif encoding == "quoted-printable":
            data = quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return []
    return header_blocks(decode_bytes(data, "utf-8"))


def _fields(block: Message) -> dict[str, str]:
    headers = Headers(block)
    names = ("action", "original-recipient", "final-recipient", "x-actual-recipient")
    more = ("status", "diagnostic-code")
    return {name: headers.text(name) for name in names + more if name in headers}


def _as_text(block: Message) -> str:
    lines = [f"{name}: {value}" for name, value in block.raw_items()]
    # decode=True hands back the bytes as received; without it 8-bit text is decoded
    # by the declared charset, which can raise.
    payload = block.get_payload(decode=True)
    if isinstance(payload, bytes):
        lines += ["", payload.decode("ascii", "surrogateescape")]
    return "\n".join(lines)


def _action(value: str) -> Action | Literal["other"] | None:
    """``failed``/``delayed``, ``other`` for delivered/relayed/expanded, None if unreadable."""
    word = value.strip().lower()
    if word.startswith(("fail", "error")):  # opensmtpd writes "error"
        return "failed"
    if word.startswith("delayed"):
        return "delayed"
    if word.startswith(("delivered", "relayed", "expanded")):
        return "other"
    return None


def _recipient(block: dict[str, str]) -> str:
    # Original-Recipient is the address as first received (ours); Final-Recipient may
    # be an alias's target.
    for name in ("original-recipient", "final-recipient", "x-actual-recipient"):
        if address := _address_field(block.get(name, "")):
            return address
    return ""


def _address_field(value: str) -> str:
    """``rfc822; <Gone@Example.ORG>`` gives ``Gone@example.org``, "" when there is no address."""
    kind, _, rest = value.partition(";")
    address = normalise(rest if rest else kind).strip("<>").strip()
    if kind.strip().lower() == "utf-8":
        address = _UTF8_XTEXT.sub(lambda m: _char(m.group(1)), address)
    return lower_domain(address)


def lower_domain(address: str) -> str:
    """``Local@Domain.ORG`` gives ``Local@domain.org``, "" for what is no address."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or " " in address:
        return ""
    return f"{local}@{domain.lower()}"


def _char(hexdigits: str) -> str:
    code = int(hexdigits, 16)
    return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"


def _dsn_code(block: dict[str, str], action: Action, near: str) -> tuple[str, str]:
    """The status code and diagnostic of one recipient block."""
    diagnostic = _DIAGNOSTIC_TYPE.sub("", normalise(block.get("diagnostic-code", "")))
    found = _STATUS.search(block.get("status", ""))
    code = found.group(0) if found else code_in(diagnostic)
    if not code or not diagnostic:
        code = code or code_in(near)
        diagnostic = diagnostic or near
    return code or default_code(action), diagnostic[:MAX_DIAGNOSTIC].rstrip()


def code_in(text: str) -> str:
    """An enhanced status code in ``text``, else the class of an SMTP reply, else ""."""
    if found := _FAILURE_STATUS.search(text):
        return found.group(0)
    if reply := _REPLY.search(text):
        return f"{reply.group(1)}.0.0"
    return ""


def default_code(action: Action) -> str:
    """``5.0.0`` for a failure, ``4.0.0`` for a delay: the codes when none was given."""
    return "5.0.0" if action == "failed" else "4.0.0"
