"""The MIME writer (worker.mime): every shape parses back with the stdlib parser."""

from __future__ import annotations

import base64
import email
import email.policy
import random
import re
import uuid
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import pytest

from producers import Mailbox, Notification, parse_job
from worker.clock import iso_micros
from worker.mime import Base64Lines, Mime, render, render_body, render_message
from worker.status import now_iso

FROM = Mailbox(address="noreply@notify.example.org", name="Example Notifications")
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
NAMES = [
    "Doe, Jane",
    'Jane "JD" Doe',
    "O'Brien",
    "Ann (Finance)",
    "back\\slash",
    "Team: Ops",
    "Müller, Jörg",
    "Zoë Ünal",
    "日本 太郎",
]


def _job(**fields: Any) -> Notification:
    job: dict[str, Any] = {
        "to": ["ann@example.com"],
        "subject": "Approval needed",
        "text": "Please approve.",
    }
    job.update(fields)
    return parse_job(job)


def _render(job: Notification, job_id: str = "job-1", **kwargs: Any) -> bytes:
    return render(job, job_id=job_id, from_box=kwargs.pop("from_box", FROM), **kwargs)


def _parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _head(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def _assert_wire_form(data: bytes) -> None:
    # Lines may start with '.': SMTP dot-stuffs them (tests/test_smtp_pipeline.py).
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")[:-1]
    for number, line in enumerate(lines):
        assert b"\r" not in line, f"bare CR on line {number}"
        assert b"\n" not in line, f"bare LF on line {number}"
        assert len(line) <= 998, f"line {number} has {len(line)} bytes"


def _text(part: Any) -> str:
    """A text part's content with LF line ends: text goes out in canonical form (CRLF)."""
    return str(part.get_content()).replace("\r\n", "\n")


def _body(message: EmailMessage, subtype: str) -> str:
    part = message.get_body((subtype,))
    assert part is not None, f"no text/{subtype} body"
    return _text(part)


def _boxes(message: EmailMessage, name: str) -> list[tuple[str, str]]:
    return [(a.display_name, a.addr_spec) for a in message[name].addresses]


# ---------------------------------------------------------------- shapes


def test_text_only_is_a_single_text_plain_part():
    """A text-only job is one text/plain entity with the same text."""
    job = _job(text="Hello Ann,\nplease approve.\n")
    message = _parse(_render(job))
    assert message.get_content_type() == "text/plain"
    assert not message.is_multipart()
    assert _text(message) == job.text


def test_html_only_is_a_single_text_html_part():
    """An html-only job is one text/html entity with the same html."""
    job = _job(text=None, html="<p>Hello <b>Ann</b></p>\n")
    message = _parse(_render(job))
    assert message.get_content_type() == "text/html"
    assert _text(message) == job.html


def test_text_and_html_are_multipart_alternative():
    """text + html become multipart/alternative: text/plain first, then text/html."""
    job = _job(text="Hello Ann", html="<p>Hello Ann</p>")
    message = _parse(_render(job))
    assert message.get_content_type() == "multipart/alternative"
    plain, html = message.iter_parts()
    assert (plain.get_content_type(), _text(plain)) == ("text/plain", job.text)
    assert (html.get_content_type(), _text(html)) == ("text/html", job.html)
    assert _body(message, "plain") == job.text
    assert _body(message, "html") == job.html


def test_attachments_make_multipart_mixed():
    """With attachments the message is multipart/mixed: the text, then each file."""
    job = _job(
        attachments=[
            {"filename": "q3.pdf", "content_type": "application/pdf", "content": PDF},
            {"filename": "logo.png", "content_type": "image/png", "content": PNG},
        ]
    )
    message = _parse(_render(job))
    assert message.get_content_type() == "multipart/mixed"
    first, *files = message.iter_parts()
    assert (first.get_content_type(), _text(first)) == ("text/plain", job.text)
    assert [(f.get_filename(), f.get_content_type()) for f in files] == [
        ("q3.pdf", "application/pdf"),
        ("logo.png", "image/png"),
    ]
    assert [f.get_content() for f in files] == [PDF, PNG]
    assert all(f.get_content_disposition() == "attachment" for f in files)


def test_text_html_and_attachments_nest_alternative_in_mixed():
    """text + html + attachments give mixed[alternative[plain, html], files...]."""
    job = _job(
        text="Hello",
        html="<p>Hello</p>",
        attachments=[{"filename": "q3.pdf", "content": PDF}],
    )
    message = _parse(_render(job))
    assert message.get_content_type() == "multipart/mixed"
    alternative, attachment = message.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    assert [_text(p) for p in alternative.iter_parts()] == [job.text, job.html]
    assert attachment.get_content() == PDF
    assert attachment.get_content_type() == "application/octet-stream"
    assert _body(message, "html") == job.html


def test_non_ascii_subject_and_bodies_round_trip_in_an_ascii_message():
    """A non-ASCII subject and bodies come back equal from a 7-bit message."""
    job = _job(
        subject="Genehmigung nötig: Straße 5 – 日本語 ✓",
        text="Grüße aus Köln – ✓\n",
        html="<p>Grüße aus Köln – ✓</p>",
    )
    data = _render(job)
    assert data.isascii()
    message = _parse(data)
    assert message["Subject"] == job.subject
    assert _body(message, "plain") == job.text
    assert _body(message, "html") == job.html


def test_display_names_round_trip():
    """Display names with commas, quotes, specials and non-ASCII come back equal."""
    to = [{"address": f"user{i}@example.com", "name": n} for i, n in enumerate(NAMES)]
    job = _job(
        to=to,
        cc=['"Doe, John" <john@example.com>', "plain@example.com"],
        reply_to=["Help Desk <help@example.com>"],
    )
    from_box = Mailbox(
        address="noreply@notify.example.org", name="Benachrichtigung Müller"
    )
    data = _render(job, from_box=from_box)
    assert data.isascii()
    message = _parse(data)
    assert _boxes(message, "To") == [(m.name, m.address) for m in job.to]
    assert _boxes(message, "Cc") == [
        ("Doe, John", "john@example.com"),
        ("", "plain@example.com"),
    ]
    assert _boxes(message, "Reply-To") == [("Help Desk", "help@example.com")]
    assert _boxes(message, "From") == [
        ("Benachrichtigung Müller", "noreply@notify.example.org")
    ]


def test_idn_recipient_is_written_in_punycode():
    """A recipient with an IDN domain appears in punycode in an ASCII header."""
    data = _render(_job(to=["Jörg <joerg@münchen.de>"]))
    assert _boxes(_parse(data), "To") == [("Jörg", "joerg@xn--mnchen-3ya.de")]
    assert data.isascii()


@pytest.mark.parametrize(
    "filename",
    [
        "q3.pdf",
        "Q3 report; final (v2).pdf",
        "a=b, c.txt",
        "it's.txt",
        "Übersicht 2024.xlsx",
        "日本語.txt",
        "r" * 250 + ".pdf",
    ],
)
def test_attachment_file_names_round_trip(filename):
    """Attachment file names, ASCII or not, come back equal with their bytes."""
    job = _job(attachments=[{"filename": filename, "content": PNG}])
    data = _render(job)
    assert data.isascii()
    [attachment] = _parse(data).iter_attachments()
    assert attachment.get_filename() == filename
    assert attachment.get_content() == PNG


def test_empty_and_large_attachments_round_trip():
    """An empty file and a 300 KiB binary file come back byte for byte."""
    big = bytes(range(256)) * 1200
    job = _job(
        attachments=[
            {"filename": "empty.txt", "content": b""},
            {"filename": "big.bin", "content": big},
        ]
    )
    data = _render(job)
    _assert_wire_form(data)
    empty, large = _parse(data).iter_attachments()
    assert empty.get_content() == b""
    assert large.get_content() == big


# ---------------------------------------------------------------- wire form


def _shapes() -> dict[str, Notification]:
    recipients = [
        {"address": f"user{i}@example.com", "name": f"User Number {i}"}
        for i in range(300)
    ]
    return {
        "text": _job(),
        "html": _job(text=None, html="<p>x</p>"),
        "alternative": _job(html="<p>x</p>"),
        "mixed": _job(
            html="<p>x</p>", attachments=[{"filename": "a.bin", "content": PNG}]
        ),
        "long-words-subject": _job(subject=("approval " * 250)[:2000]),
        "long-non-ascii-subject": _job(subject=("Grüße aus Köln " * 150)[:2000]),
        "300-recipients": _job(to=recipients[:100], cc=recipients[100:200]),
        "300-to": _job(to=recipients),
        "long-header": _job(headers={"X-Note": ("note " * 170).strip()}),
        "dots": _job(
            subject=". leading dot",
            text=".\n..\n.hidden\n" * 50,
            html="<p>\n.</p>\n",
            headers={"X-Dot": ". dot"},
        ),
    }


@pytest.mark.parametrize("shape", list(_shapes()))
def test_every_line_ends_with_crlf_and_fits_998_bytes(shape):
    """Every line ends with CRLF and has at most 998 bytes; the bodies parse back."""
    job = _shapes()[shape]
    data = _render(job)
    _assert_wire_form(data)
    message = _parse(data)
    assert message["Subject"] == job.subject
    assert [a.addr_spec for a in message["To"].addresses] == [m.address for m in job.to]
    if job.text:
        assert _body(message, "plain").rstrip("\n") == job.text.rstrip("\n")


def test_three_hundred_recipients_are_all_in_the_headers():
    """300 recipients in To and Cc all come back, in order."""
    job = _shapes()["300-recipients"]
    message = _parse(_render(job))
    assert _boxes(message, "To") == [(m.name, m.address) for m in job.to]
    assert _boxes(message, "Cc") == [(m.name, m.address) for m in job.cc]


def test_two_thousand_character_subject_without_spaces_fits_998_bytes():
    """A 2,000-character subject with no space is folded into lines of 998 bytes or less."""
    job = _job(subject="x" * 2000)
    data = _render(job)
    _assert_wire_form(data)
    assert _parse(data)["Subject"] == job.subject


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Subject", "INV-" + "0" * 70 + " is due"),
        (
            "List-Unsubscribe",
            "<https://lists.example.com/unsubscribe?t=" + "a" * 60 + ">",
        ),
    ],
)
def test_header_starting_with_a_long_word_round_trips(name, value):
    """A subject or extra header whose first word is long parses back unchanged."""
    fields = {"subject": value} if name == "Subject" else {"headers": {name: value}}
    data = _render(_job(**fields))
    _assert_wire_form(data)
    assert _parse(data)[name] == value


def test_long_non_ascii_file_name_fits_998_bytes():
    """A 255-character non-ASCII file name still gives lines of 998 bytes or less."""
    filename = "é" * 251 + ".pdf"
    data = _render(_job(attachments=[{"filename": filename, "content": PDF}]))
    _assert_wire_form(data)
    [attachment] = _parse(data).iter_attachments()
    assert attachment.get_filename() == filename


# ---------------------------------------------------------------- headers


def test_message_id_is_job_id_at_the_from_domain():
    """Message-ID is <job_id@domain of the from address>, the same on every render."""
    job_id = str(uuid.uuid4())
    job = _job()
    first = _parse(_render(job, job_id))
    again = _parse(_render(job, job_id))
    assert first["Message-ID"] == f"<{job_id}@notify.example.org>"
    assert again["Message-ID"] == first["Message-ID"]
    other = Mailbox(address="relay@mail.example.net")
    assert _parse(_render(job, job_id, from_box=other))["Message-ID"] == (
        f"<{job_id}@mail.example.net>"
    )


def test_auto_submitted_and_date_are_present():
    """Every message is Auto-Submitted: auto-generated, with one Date and MIME-Version."""
    message = _parse(_render(_job()))
    assert message.get_all("Auto-Submitted") == ["auto-generated"]
    assert message["Date"].datetime is not None
    assert message["MIME-Version"] == "1.0"


def test_date_is_now_and_boundaries_differ_between_messages():
    """The Date header (formatted once a second) is the current time, in GMT; two
    multipart messages never share a boundary."""
    before = datetime.now(UTC).replace(microsecond=0)
    job = _job(text="plain", html="<p>html</p>")
    raw = _render(job)
    first, second = _parse(raw), _parse(_render(job))
    after = datetime.now(UTC)
    assert before <= first["Date"].datetime <= after
    assert re.search(rb"^Date: [A-Z][a-z]{2}, .* GMT\r$", raw, re.MULTILINE)
    assert first.get_boundary() != second.get_boundary()
    assert first.get_boundary().startswith("=_")


def test_now_iso_writes_what_isoformat_writes():
    before = datetime.now(UTC)
    stamp = now_iso()
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", stamp)
    parsed = datetime.fromisoformat(stamp)
    # milliseconds, truncated (datetime rounds to microseconds first: allow one ms)
    assert before - timedelta(milliseconds=1) <= parsed <= after


def test_bcc_never_appears():
    """Bcc recipients appear nowhere in the message, header or body."""
    job = _job(
        to=["ann@example.com"],
        bcc=["Secret Boss <hidden.boss@example.com>", "audit@example.net"],
    )
    data = _render(job)
    assert b"hidden.boss" not in data
    assert b"audit@example.net" not in data
    assert b"Secret Boss" not in data
    assert re.search(rb"^bcc:", data, re.IGNORECASE | re.MULTILINE) is None
    assert "Bcc" not in _parse(data)


def test_bcc_only_job_has_no_to_header():
    """A job with bcc only has neither To nor Bcc in the message."""
    data = _render(_job(to=[], bcc=["hidden@example.com"]))
    message = _parse(data)
    assert "To" not in message
    assert "Bcc" not in message
    assert b"hidden@example.com" not in data


def test_extra_headers_appear():
    """Extra headers of the job and of mailworker appear with their values."""
    job = _job(headers={"X-Workflow": "wf-1", "List-Id": "<approvals.example.com>"})
    message = _parse(_render(job, extra_headers={"X-Original-To": "ann@example.com"}))
    assert message["X-Workflow"] == "wf-1"
    assert message["List-Id"] == "<approvals.example.com>"
    assert message["X-Original-To"] == "ann@example.com"


def test_non_ascii_extra_header_is_rfc2047_encoded():
    """A non-ASCII extra header value is written as RFC 2047 words and reads back equal."""
    job = _job(headers={"X-Workflow-Title": "Genehmigung für Jörg ✓"})
    data = _render(job)
    assert data.isascii()
    [line] = [
        line
        for line in _head(data).split(b"\r\n")
        if line.startswith(b"X-Workflow-Title:")
    ]
    assert b"=?utf-8?" in line.lower()
    assert _parse(data)["X-Workflow-Title"] == "Genehmigung für Jörg ✓"


def test_given_body_is_used_verbatim():
    """render(body=render_body(job)) ends with exactly that body, for every sender."""
    job = _job(html="<p>x</p>", attachments=[{"filename": "a.pdf", "content": PDF}])
    body = render_body(job)
    first = _render(job, body=body)
    second = _render(job, body=body, from_box=Mailbox(address="relay@mail.example.net"))
    assert first.endswith(bytes(body))
    assert second.endswith(bytes(body))
    assert _body(_parse(first), "html") == "<p>x</p>"


def test_render_body_starts_with_its_content_headers():
    """render_body gives the content entity only: its Content-* headers, then the body."""
    body = render_body(_job(text="Hello"))
    head, _, payload = bytes(body).partition(b"\r\n\r\n")
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")]
    assert names == [b"content-type", b"content-transfer-encoding"]
    assert payload == b"Hello\r\n"


def test_iso_micros_writes_utc_with_microseconds():
    before = datetime.now(UTC)
    stamp = iso_micros()
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    # truncated to microseconds (datetime.now rounds: allow one)
    assert before - timedelta(microseconds=1) <= parsed <= after


# ---------------------------------------------------------------- transfer encodings


def _encodings(data: bytes) -> list[str]:
    return [
        str(part["Content-Transfer-Encoding"])
        for part in _parse(data).walk()
        if part.get_content_maintype() == "text"
    ]


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("Hello Ann,\nplease approve task 42.\n", "7bit"),
        ("Windows\r\nline ends\r\nand old Mac\rones\n", "7bit"),
        (".\n..\n.hidden\nfinal .\n", "7bit"),
        ("one long line " * 100, "quoted-printable"),  # 1,400 characters
        ("x" * 998 + "\n" + "y" * 10, "7bit"),
        ("x" * 999, "quoted-printable"),
        ("Grüße aus Köln,\nbitte genehmigen.\n", "quoted-printable"),
        ("a boundary-like =_ mark\n", "quoted-printable"),
        ("a NUL \x00 byte\n", "quoted-printable"),
        ("trailing space \nand tab\t\n", "7bit"),
        ("日本語のテキストです。\n" * 5, "base64"),
        ("Ελληνικά κείμενα\n", "base64"),
    ],
    ids=[
        "ascii",
        "mixed-line-ends",
        "leading-dots",
        "long-ascii-line",
        "998-characters",
        "999-characters",
        "mostly-ascii",
        "boundary-mark",
        "nul",
        "trailing-space",
        "japanese",
        "greek",
    ],
)
def test_text_goes_in_the_lightest_safe_encoding(text, encoding):
    """Text is 7bit when it is ASCII in short lines, quoted-printable when mostly ASCII,
    base64 otherwise; every shape parses back to the text, with CRLF line ends."""
    canonical = text.replace("\r\n", "\n").replace("\r", "\n")
    for job in (_job(text=text), _job(text=text, html=f"<pre>{text}</pre>")):
        data = _render(job)
        _assert_wire_form(data)
        assert data.isascii()
        assert _encodings(data)[0] == encoding
        assert _body(_parse(data), "plain").rstrip("\n") == canonical.rstrip("\n")


def test_random_ascii_texts_round_trip_in_every_encoding():
    """Seeded random texts of '=', blanks, dots, tabs and long lines (the quoted-printable
    writer's hard cases) parse back to the text, in lines of at most 76 characters when
    quoted-printable."""
    rng = random.Random(2920)
    alphabets = [
        "ab= \t\n.=_" + "x" * 5,
        "ab= \t.=_" + "x" * 200,
    ]  # the second: long lines
    for _ in range(300):
        alphabet = rng.choice(alphabets)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 2500)))
        text = text if text.strip() else "x"
        data = _render(_job(text=text, html="<p>x</p>"))
        _assert_wire_form(data)
        assert _body(_parse(data), "plain") == text
        if _encodings(data)[0] == "quoted-printable":
            body = data.split(b"quoted-printable\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
            assert max(map(len, body.split(b"\r\n"))) <= 76


def test_text_in_multipart_keeps_its_last_line_end():
    """In a multipart message a text part comes back exactly, with or without a final
    line end (the CRLF before a boundary belongs to the boundary)."""
    for text in ("no final newline", "one final newline\n", "two\n\n"):
        job = _job(text=text, html="<p>x</p>")
        assert _body(_parse(_render(job)), "plain") == text


# ---------------------------------------------------------------- large attachments


@pytest.mark.parametrize(
    "size", [0, 1, 56, 57, 58, 65_536, 65_537, 57 * 1024, 57 * 1024 + 1, 300_001]
)
def test_mime_size_is_the_length_written(size):
    """``Mime.size`` is the length of the bytes it writes, for every attachment size."""
    content = bytes(range(256)) * (size // 256) + bytes(size % 256)
    job = _job(attachments=[{"filename": "a.bin", "content": content}])
    mime = render_message(job, job_id="job-1", from_box=FROM)
    data = bytes(mime)
    assert mime.size == len(data)
    [attachment] = _parse(data).iter_attachments()
    assert attachment.get_content() == content
    _assert_wire_form(data)


def test_a_large_attachment_is_encoded_only_while_written():
    """An attachment over 64 KiB stays the job's own bytes in the rendered message (no
    encoded copy): it is base64-encoded block by block as the message is written, and
    every block is whole 76-character lines."""
    content = bytes(range(256)) * 4000  # 1,000 KiB
    job = _job(
        html="<p>x</p>", attachments=[{"filename": "big.bin", "content": content}]
    )
    mime = render_message(job, job_id="job-1", from_box=FROM)
    [lazy] = [p for p in mime.pieces if isinstance(p, Base64Lines)]
    assert lazy.content is job.attachments[0].content
    assert all(isinstance(p, bytes) for p in mime.pieces if p is not lazy)
    blocks = list(lazy.blocks())
    assert len(blocks) > 1
    for block in blocks:
        assert block.endswith(b"\r\n")
        assert {len(line) for line in block.split(b"\r\n")[:-1]} <= set(range(1, 77))
    assert b"".join(blocks) == base64.encodebytes(content).replace(b"\n", b"\r\n")
    [attachment] = _parse(bytes(mime)).iter_attachments()
    assert attachment.get_content() == content


def test_a_message_without_large_attachments_is_two_pieces():
    """Headers and body are one piece each when nothing needs encoding on the way out:
    the send path writes such a message, its dot and the next commands at once."""
    job = _job(html="<p>x</p>", attachments=[{"filename": "a.pdf", "content": PDF}])
    mime = render_message(job, job_id="job-1", from_box=FROM)
    assert isinstance(mime, Mime)
    assert len(mime.pieces) == 2
    assert all(isinstance(p, bytes) for p in mime.pieces)
