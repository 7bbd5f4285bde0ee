"""Write a notification as MIME, fast: no ``email.message`` in the per-job path.

The stdlib ``EmailMessage`` costs about a hundred times as much per message as writing
the bytes directly (docs/benchmarks.md). A large attachment is encoded block by block
while the message is written to the socket, never as a whole (``Mime``). Tests parse
every shape back with ``email.parser`` as the oracle.
"""

from __future__ import annotations

import binascii
import itertools
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from email.header import Header
from email.utils import formatdate
from urllib.parse import quote

from producers.job import Attachment, Mailbox, Notification

__all__ = [
    "Base64Lines",
    "Mime",
    "format_mailbox",
    "message_id",
    "render",
    "render_body",
    "render_message",
]

_ATEXT_PHRASE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*$")
_CRLF = b"\r\n"
_FOLD = ",\r\n "
_MAX_LINE = 998


def message_id(job_id: str, from_address: str) -> str:
    """``<job_id@domain of the from address>``: stable across retries and failover."""
    return f"<{job_id}@{from_address.rpartition('@')[2]}>"


def format_mailbox(box: Mailbox) -> str:
    """One address for a header: ``Name <a@b>``, quoted or RFC 2047-encoded as needed."""
    name = box.name
    if not name:
        return box.address
    if not name.isascii():
        encoded = Header(name, "utf-8").encode(linesep="\r\n")
        return f"{encoded} <{box.address}>"
    if _ATEXT_PHRASE.match(name):
        return f"{name} <{box.address}>"
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{box.address}>'


def _header(name: str, value: str) -> bytes:
    # ASCII that fits one line (RFC 5322: 998) is written as is, never folded: folding at
    # the wrong place changes the value. Anything else becomes RFC 2047 encoded-words,
    # which fold anywhere.
    if not value.isascii() or len(name) + 2 + len(value) > _MAX_LINE:
        value = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {value}\r\n".encode("ascii")


def _address_header(name: str, boxes: list[Mailbox]) -> bytes:
    joined = _FOLD.join(format_mailbox(b) for b in boxes)
    return f"{name}: {joined}\r\n".encode("ascii")


class Base64Lines:
    """An attachment's content as base64 in CRLF-ended lines of 76 characters.

    It is encoded a block at a time as it is written, so the whole encoded text never
    exists at once.

    Attributes:
        content: the bytes (the job's own, not a copy).
        size: the length of the encoded lines.
    """

    __slots__ = ("content", "size")

    def __init__(self, content: bytes) -> None:
        self.content = content
        full, rest = divmod(len(content), 57)
        self.size = full * 78 + ((rest + 2) // 3 * 4 + 2 if rest else 0)

    def blocks(self) -> Iterator[bytes]:
        """The encoded lines, about 78 KiB at a time."""
        view = memoryview(self.content)
        for start in range(0, len(view), _BLOCK):
            yield _b64(view[start : start + _BLOCK])


class Mime:
    """A rendered message (or entity) as pieces.

    The pieces are bytes, and attachments that are encoded only while they are written
    (``Base64Lines``).

    Attributes:
        pieces: the bytes and attachments, in order.
        size: the length of the whole, in bytes.
    """

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: Iterable[bytes | Base64Lines]) -> None:
        self.pieces = tuple(pieces)
        self.size = sum(len(p) if isinstance(p, bytes) else p.size for p in self.pieces)

    def chunks(self) -> Iterator[bytes]:
        """The message's bytes, piece by piece (an attachment block by block)."""
        for piece in self.pieces:
            if isinstance(piece, bytes):
                yield piece
            else:
                yield from piece.blocks()

    def __bytes__(self) -> bytes:
        return b"".join(self.chunks())


Piece = bytes | Base64Lines
_BLOCK = 57 * 1024  # bytes of content per encoded block: whole lines, ~78 KiB encoded
_EAGER = 64 * 1024  # attachments up to this size are encoded when rendered
_QP = "quoted-printable"
_QP_MAX = 76  # characters a quoted-printable line may have (RFC 2045 6.7)
# Up to 75 characters and a soft line break's "=", never ending inside an "=XX" escape.
_QP_SEGMENT = re.compile(r"[^\n]{1,75}(?<!=)(?<!=.)")
_TRAILING_BLANK = re.compile(r"[ \t]$", re.MULTILINE)
_QP_LITERAL = bytes(range(32, 127)) + b"\t\n"  # what _qp_ascii writes as is (but "=")


def _b64(data: bytes | memoryview) -> bytes:
    # One C call for the block, then its 76-character lines: ~half the time of
    # base64.encodebytes (a Python loop over 57-byte slices) and its CRLF replace.
    encoded = binascii.b2a_base64(data, newline=False)
    lines = [encoded[i : i + 76] for i in range(0, len(encoded), 76)]
    return _CRLF.join([*lines, b""]) if lines else b""


def _text_content(text: str) -> tuple[bytes, str]:
    """The text with CRLF line ends in the lightest safe encoding, and its name.

    The encoding is 7bit when the text is ASCII in lines of at most 998 characters,
    quoted-printable when it is mostly ASCII, and base64 otherwise. None of the three can
    contain a boundary. ``=_`` is kept out of 7bit text, and the others never write it.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        if (
            "=_" not in text
            and "\x00" not in text
            and (len(text) <= _MAX_LINE or max(map(len, text.split("\n"))) <= _MAX_LINE)
        ):
            return text.replace("\n", "\r\n").encode("ascii"), "7bit"
        if not text.encode("ascii").translate(None, _QP_LITERAL):  # no control char
            return _qp_ascii(text), _QP
    data = text.encode()
    if (len(data) - len(text)) * 10 <= len(data):  # at most ~1 in 5 bytes non-ASCII
        if "\n" not in text:  # b2a_qp breaks lines as the text does: LF if it has none
            return binascii.b2a_qp(data, istext=True).replace(b"\n", _CRLF), _QP
        return binascii.b2a_qp(data.replace(b"\n", _CRLF), istext=True), _QP
    return _b64(data.replace(b"\n", _CRLF)), "base64"


def _qp_ascii(text: str) -> bytes:
    """Quoted-printable of ASCII text without control characters.

    LF line ends go in and CRLF come out. The result is what ``binascii.b2a_qp`` writes,
    in half its time (long HTML lines are the common case).
    """
    text = text.replace("=", "=3D")
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
        text = _TRAILING_BLANK.sub(lambda m: "=20" if m[0] == " " else "=09", text)
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if len(line) > _QP_MAX:
            lines[index] = "=\r\n".join(_QP_SEGMENT.findall(line))
    return "\r\n".join(lines).encode("ascii")


def _text_part(subtype: str, text: str) -> bytes:
    content, encoding = _text_content(text)
    return (
        f"Content-Type: text/{subtype}; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode() + content


def _attachment_part(attachment: Attachment) -> list[Piece]:
    name = attachment.filename
    if name.isascii():
        params = f'; name="{name}"', f'; filename="{name}"'
    else:
        params = _rfc2231("name", name), _rfc2231("filename", name)
    head = (
        f"Content-Type: {attachment.content_type}{params[0]}\r\n"
        f"Content-Disposition: attachment{params[1]}\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    content = attachment.content
    if len(content) <= _EAGER:
        return [head + _b64(content)]
    return [head, Base64Lines(content)]


def _rfc2231(param: str, value: str) -> str:
    """A non-ASCII parameter, split into RFC 2231 continuations of short lines."""
    encoded = quote(value, safe="")
    if len(encoded) <= 60:
        return f";\r\n {param}*=utf-8''{encoded}"
    chunks, rest = [], encoded
    while rest:
        cut = 60
        while cut < len(rest) and "%" in rest[cut - 2 : cut]:
            cut -= 1  # never split a %XX escape
        chunks.append(rest[:cut])
        rest = rest[cut:]
    first = f";\r\n {param}*0*=utf-8''{chunks[0]}"
    return first + "".join(
        f";\r\n {param}*{i}*={c}" for i, c in enumerate(chunks[1:], 1)
    )


# Boundaries: "=_" never occurs in base64 or quoted-printable and is kept out of 7bit
# text, so the parts' content cannot contain one. A random prefix per start and a
# counter make each boundary unique.
_BOUNDARY_PREFIX = f"=_{uuid.uuid4().hex[:16]}."
_boundaries = itertools.count()
_DATE: tuple[int, bytes] = (0, b"")  # the Date header of the last whole second


def _date_header() -> bytes:
    global _DATE
    second, header = _DATE
    now = int(time.time())
    if now != second:
        header = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        _DATE = (now, header)
    return header


def _multipart(subtype: str, parts: list[list[Piece]]) -> list[Piece]:
    """The entity: its header, then each part after a delimiter.

    A delimiter begins with CRLF (RFC 2046), so a part's content keeps its own last line
    end.
    """
    boundary = f"{_BOUNDARY_PREFIX}{next(_boundaries):x}"
    out: list[Piece] = [
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()
    ]
    delimiter = f"--{boundary}\r\n".encode()
    for part in parts:
        out += [delimiter, *part, b"\r\n"]
    out.append(f"--{boundary}--\r\n".encode())
    return out


def _joined(pieces: list[Piece]) -> list[Piece]:
    """Runs of bytes joined into one piece.

    A message without large attachments is one piece of body.
    """
    out: list[Piece] = []
    run: list[bytes] = []
    for piece in pieces:
        if isinstance(piece, bytes):
            run.append(piece)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(piece)
    if run:
        out.append(b"".join(run))
    return out


def render_body(notification: Notification) -> Mime:
    """The MIME entity of the content (no top-level headers but its own Content-*).

    Attachments larger than 64 KiB are not encoded here but while the message is
    written (``Mime.chunks``), so the job's bytes are the only copy of them.
    """
    texts = []
    if notification.text:
        texts.append(_text_part("plain", notification.text))
    if notification.html:
        texts.append(_text_part("html", notification.html))
    if len(texts) == 1:
        body: list[Piece] = [texts[0]]
    else:
        body = _multipart("alternative", [[t] for t in texts])
    if notification.attachments:
        body = _multipart(
            "mixed", [body, *map(_attachment_part, notification.attachments)]
        )
    elif len(texts) == 1 and not texts[0].endswith(_CRLF):
        body.append(_CRLF)  # a message ends with a line end
    return Mime(_joined(body))


def render(
    notification: Notification,
    *,
    job_id: str,
    from_box: Mailbox,
    body: Mime | None = None,
    extra_headers: dict[str, str] | None = None,
    bcc: bool = False,
) -> bytes:
    """``render_message``, as one bytes object."""
    return bytes(
        render_message(
            notification,
            job_id=job_id,
            from_box=from_box,
            body=body,
            extra_headers=extra_headers,
            bcc=bcc,
        )
    )


def render_message(
    notification: Notification,
    *,
    job_id: str,
    from_box: Mailbox,
    body: Mime | None = None,
    extra_headers: dict[str, str] | None = None,
    bcc: bool = False,
) -> Mime:
    """The whole message: headers for ``from_box`` followed by the body.

    Args:
        notification: the job.
        job_id: its id, for the Message-ID.
        from_box: the service's From address and display name.
        body: ``render_body(notification)`` when already made (it is per job, not per service).
        extra_headers: headers added by mailworker itself (e.g. for redirected staging mail).
        bcc: write a Bcc header, for a service that takes recipients from the headers
            and strips Bcc itself (Graph's MIME form). SMTP never gets one.

    Returns:
        The message, CRLF line ends, every line at most 998 bytes. Its attachments
        are encoded as it is written.
    """
    head = [
        _address_header("From", [from_box]),
        _address_header("To", notification.to) if notification.to else b"",
        _address_header("Cc", notification.cc) if notification.cc else b"",
        _address_header("Bcc", notification.bcc) if bcc and notification.bcc else b"",
        _address_header("Reply-To", notification.reply_to)
        if notification.reply_to
        else b"",
        _header("Subject", notification.subject),
        _date_header(),
        f"Message-ID: {message_id(job_id, from_box.address)}\r\n".encode(),
        b"MIME-Version: 1.0\r\n",
        f"Auto-Submitted: {notification.auto_submitted}\r\n".encode(),
        b"X-Auto-Response-Suppress: All\r\n",
    ]
    for name, value in {**notification.headers, **(extra_headers or {})}.items():
        head.append(_header(name, value))
    entity = body if body is not None else render_body(notification)
    return Mime((b"".join(head), *entity.pieces))
