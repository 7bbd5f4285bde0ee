"""The job schema of DESIGN section 4 (producers.job): what is accepted, what is refused."""

from __future__ import annotations

import base64
import json
import pickle
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pydantic
import pytest

from producers import JobValidationError, Notification, parse_job
from producers.job import SCHEMA_VERSION, Attachment, Mailbox
from settings import Limits

PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x80"


def _job(**fields: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "to": ["ann@example.com"],
        "subject": "Approval needed",
        "text": "Please approve.",
    }
    job.update(fields)
    return job


def _refused(**fields: Any) -> JobValidationError:
    with pytest.raises(JobValidationError) as info:
        parse_job(_job(**fields))
    return info.value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------- valid jobs


def test_string_and_object_addresses_are_accepted():
    """Addresses come as plain strings, "Name <a@b>" strings or {address, name} objects."""
    job = parse_job(
        _job(
            to=["ann@example.com", "Bob Builder <bob@example.com>"],
            cc=[{"address": "carol@example.com", "name": "Carol"}],
            bcc="dave@example.com",
            reply_to="Help Desk <help@example.com>",
        )
    )
    assert [(m.name, m.address) for m in job.to] == [
        ("", "ann@example.com"),
        ("Bob Builder", "bob@example.com"),
    ]
    assert [(m.name, m.address) for m in job.cc] == [("Carol", "carol@example.com")]
    assert [m.address for m in job.bcc] == ["dave@example.com"]
    assert [(m.name, m.address) for m in job.reply_to] == [
        ("Help Desk", "help@example.com")
    ]


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ('"Doe, Jane" <jane@example.com>', "Doe, Jane"),
        ('"Jane \\"JD\\" Doe" <jane@example.com>', 'Jane "JD" Doe'),
        ('"Müller, Jörg; Team" <jane@example.com>', "Müller, Jörg; Team"),
        ("<jane@example.com>", ""),
    ],
)
def test_quoted_display_names_are_unquoted(given, name):
    """A quoted display name may hold commas, semicolons and escaped quotes."""
    [box] = parse_job(_job(to=[given])).to
    assert (box.name, box.address) == (name, "jane@example.com")


@pytest.mark.parametrize(
    ("given", "address"),
    [
        ("user@bücher.example", "user@xn--bcher-kva.example"),
        ("Jörg <joerg@münchen.de>", "joerg@xn--mnchen-3ya.de"),
        ("x@例え.テスト", "x@xn--r8jz45g.xn--zckzah"),
        ("Ann@EXAMPLE.Com", "Ann@example.com"),
    ],
)
def test_domains_become_ascii(given, address):
    """IDN domains become punycode and domains are lower-cased; local parts are kept."""
    [box] = parse_job(_job(to=[given])).to
    assert box.address == address


def test_a_full_job_keeps_every_field():
    """Every field of a complete job is kept as given (attachments decoded to bytes)."""
    deadline = "2031-05-01T09:00:00+02:00"
    job = parse_job(
        {
            "schema_version": SCHEMA_VERSION,
            "to": ["ann@example.com"],
            "subject": "Approval needed",
            "text": "Please approve.",
            "html": "<p>Please approve.</p>",
            "headers": {
                "X-Workflow": "wf-1",
                "List-Unsubscribe": "<https://x.example>",
            },
            "attachments": [
                {
                    "filename": "q3.pdf",
                    "content_type": "Application/PDF",
                    "content": _b64(PDF),
                }
            ],
            "sender": "eu-relay",
            "idempotency_key": "task-42",
            "priority": "high",
            "not_after": deadline,
            "metadata": {"workflow.instance-id": "wf-1", "task": 42, "urgent": True},
        }
    )
    assert job.html == "<p>Please approve.</p>"
    assert job.headers == {
        "X-Workflow": "wf-1",
        "List-Unsubscribe": "<https://x.example>",
    }
    [attachment] = job.attachments
    assert attachment.content == PDF
    assert attachment.content_type == "application/pdf"
    assert (job.sender, job.idempotency_key, job.priority) == (
        "eu-relay",
        "task-42",
        "high",
    )
    assert job.not_after == datetime(2031, 5, 1, 7, 0, tzinfo=UTC)
    assert job.metadata == {"workflow.instance-id": "wf-1", "task": 42, "urgent": True}


def test_html_alone_and_bcc_alone_are_enough():
    """A job with only html content and only bcc recipients is valid."""
    job = parse_job(_job(to=[], bcc=["hidden@example.com"], text=None, html="<b>x</b>"))
    assert job.recipients == ["hidden@example.com"]
    assert job.text is None


def test_exactly_fifty_headers_are_accepted():
    """Fifty extra headers are the most a job may carry."""
    headers = {f"X-Header-{i}": str(i) for i in range(50)}
    assert len(parse_job(_job(headers=headers)).headers) == 50


@pytest.mark.parametrize("key", ["workflow.instance-id", "_task", "Task_2", "k" * 64])
def test_valid_metadata_keys_are_accepted(key):
    """Metadata keys of letters, digits, '_', '.' and '-' (up to 64) are accepted."""
    assert parse_job(_job(metadata={key: "v"})).metadata == {key: "v"}


# ---------------------------------------------------------------- refused addresses


@pytest.mark.parametrize("part", ["to", "cc", "bcc", "reply_to"])
@pytest.mark.parametrize(
    "address",
    [
        "not-an-address",
        "ann@localhost",
        "ann smith@example.com",
        "@example.com",
        "ann@",
        "ann..x@example.com",
        "ann@example..com",
        "ann@-example.com",
        "ann@example.com, bob@example.com",
    ],
)
def test_invalid_address_is_refused_naming_its_place(part, address):
    """An invalid address in to, cc, bcc or reply_to is refused, naming that entry."""
    error = _refused(**{part: ["ok@example.com", address]})
    assert error.field == f"{part}[1].address"


def test_invalid_address_in_an_object_is_refused():
    """An invalid address given as an object is refused, naming the entry."""
    error = _refused(cc=[{"address": "nobody", "name": "Nobody"}])
    assert error.field == "cc[0].address"


# ---------------------------------------------------------------- header injection


@pytest.mark.parametrize("bad", ["\r\nBcc: evil@example.net", "\nX: y", "a\rb", "a\0b"])
def test_line_break_in_subject_is_refused(bad):
    """CR, LF or NUL in the subject is refused with field "subject"."""
    assert _refused(subject="Approval" + bad).field == "subject"


@pytest.mark.parametrize("bad", ["\r\nBcc: evil@example.net", "\n", "\0"])
def test_line_break_in_a_display_name_is_refused(bad):
    """CR, LF or NUL in a display name (string or object form) is refused."""
    error = _refused(to=[f"Eve{bad} <eve@example.com>"])
    assert error.field.startswith("to[0]")
    error = _refused(to=[{"address": "eve@example.com", "name": f"Eve{bad}"}])
    assert error.field == "to[0].name"


@pytest.mark.parametrize("bad", ["\r\nBcc: evil@example.net", "\n", "\0"])
def test_line_break_in_a_header_value_is_refused(bad):
    """CR, LF or NUL in an extra header value is refused, naming the header."""
    error = _refused(headers={"X-Workflow": f"wf{bad}"})
    assert error.field == "headers.X-Workflow"


@pytest.mark.parametrize("bad", ["\r\n", "\n", "\0"])
def test_line_break_in_an_attachment_filename_is_refused(bad):
    """CR, LF or NUL in an attachment filename is refused, naming the attachment."""
    attachment = {"filename": f"a{bad}.pdf", "content": _b64(PDF)}
    error = _refused(attachments=[attachment])
    assert error.field == "attachments[0].filename"


# Every C0 control but TAB (CR, LF and NUL are above), DEL, and the characters that
# str.splitlines() takes for line breaks.
CONTROLS = [
    chr(c) for c in [*range(1, 9), *range(11, 13), *range(14, 32), 0x7F, 0x85]
] + ["\u2028", "\u2029"]


@pytest.mark.parametrize("char", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_control_characters_are_refused_in_every_header_field(char):
    """A control character (not only CR, LF, NUL) in the subject, a display name, an
    address, a header value or an attachment filename is refused, naming that field."""
    cases = [
        ({"subject": f"Approval{char}needed"}, "subject"),
        ({"to": [f"Eve{char}Example <eve@example.com>"]}, "to[0]"),
        ({"cc": [{"address": "eve@example.com", "name": f"Eve{char}"}]}, "cc[0].name"),
        ({"bcc": [f"eve{char}@example.com"]}, "bcc[0]"),
        ({"reply_to": [{"address": f"eve{char}@example.com"}]}, "reply_to[0].address"),
        ({"headers": {"X-Workflow": f"wf{char}7"}}, "headers.X-Workflow"),
        (
            {"attachments": [{"filename": f"a{char}.pdf", "content": _b64(PDF)}]},
            "attachments[0].filename",
        ),
    ]
    for fields, field in cases:
        error = _refused(**fields)
        assert error.field == field, (fields, error)
        assert "control character" in str(error)


def test_tab_is_allowed_in_header_text():
    """TAB is whitespace RFC 5322 allows: it is kept in a subject and a display name."""
    job = parse_job(_job(subject="a\tb", to=["Ann\tExample <ann@example.com>"]))
    assert job.subject == "a\tb"
    assert job.to[0].name == "Ann\tExample"


# ---------------------------------------------------------------- headers


@pytest.mark.parametrize(
    "name",
    [
        "From",
        "Bcc",
        "BCC",
        "Message-ID",
        "message-id",
        "Content-Type",
        "content-transfer-encoding",
        "To",
        "Cc",
        "Reply-To",
        "Subject",
        "Date",
        "Sender",
        "MIME-Version",
        "Auto-Submitted",
        "X-Mailworker-Job-Id",
    ],
)
def test_reserved_header_is_refused(name):
    """Headers mailworker sets itself cannot be given, in any letter case."""
    error = _refused(headers={name: "x"})
    assert error.field == "headers"
    assert name in str(error)


@pytest.mark.parametrize(
    "name", ["X Foo", "X:Foo", "", "-X-Foo", "X-Grüße", "X-" + "a" * 80, "X_Foo"]
)
def test_bad_header_name_is_refused(name):
    """A header name that is not letters, digits and '-' (up to 76) is refused."""
    assert _refused(headers={name: "x"}).field == "headers"


def test_more_than_fifty_headers_are_refused():
    """Fifty-one extra headers are refused."""
    headers = {f"X-Header-{i}": str(i) for i in range(51)}
    error = _refused(headers=headers)
    assert error.field == "headers"
    assert "50" in str(error)


# ---------------------------------------------------------------- shape of the job


@pytest.mark.parametrize(
    "content", [{"text": None}, {"text": ""}, {"text": "", "html": ""}]
)
def test_missing_text_and_html_is_refused(content):
    """A job with neither text nor html is refused."""
    job = _job(**content)
    with pytest.raises(JobValidationError) as info:
        parse_job(job)
    assert info.value.field == "text"


def test_no_recipient_is_refused():
    """A job without any to, cc or bcc recipient is refused (reply_to does not count)."""
    error = _refused(to=[], cc=[], bcc=[], reply_to=["help@example.com"])
    assert error.field == "to"


def test_missing_subject_is_refused():
    """The subject is required."""
    job = _job()
    del job["subject"]
    with pytest.raises(JobValidationError) as info:
        parse_job(job)
    assert info.value.field == "subject"


def test_overlong_subject_is_refused():
    """A subject over 2,000 characters is refused."""
    assert _refused(subject="x" * 2001).field == "subject"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"colour": "blue"}, "colour"),
        ({"to": [{"address": "a@example.com", "nick": "A"}]}, "to[0].nick"),
        (
            {"attachments": [{"filename": "a.pdf", "content": _b64(PDF), "size": 3}]},
            "attachments[0].size",
        ),
    ],
)
def test_unknown_field_is_refused_by_name(fields, field):
    """An unknown field, at the top or inside an address or attachment, is refused."""
    error = _refused(**fields)
    assert error.field == field
    assert "unknown field" in str(error)


@pytest.mark.parametrize("version", [2, 0, "1"])
def test_unknown_schema_version_is_refused(version):
    """A schema_version this worker does not read is refused."""
    assert _refused(schema_version=version).field == "schema_version"


def test_absent_schema_version_means_the_current_one():
    """A job without schema_version is read as the current version."""
    job = _job()
    assert "schema_version" not in job
    assert parse_job(job).subject == "Approval needed"


def test_a_job_that_is_not_an_object_is_refused():
    """A job that is not a JSON object is refused with field "job"."""
    with pytest.raises(JobValidationError) as info:
        parse_job(["to", "ann@example.com"])
    assert info.value.field == "job"


@pytest.mark.parametrize(
    "value", ["2031-05-01T09:00:00", "2031-05-01 09:00", "next tuesday"]
)
def test_not_after_without_time_zone_is_refused(value):
    """A not_after without a time zone (or not a time at all) is refused."""
    assert _refused(not_after=value).field == "not_after"


@pytest.mark.parametrize("priority", ["urgent", "HIGH", ""])
def test_unknown_priority_is_refused(priority):
    """Priorities are high, normal and bulk only."""
    assert _refused(priority=priority).field == "priority"


# ---------------------------------------------------------------- attachments


@pytest.mark.parametrize("content", ["not base64!", "aGk", "aGk=\n===="])
def test_attachment_with_bad_base64_is_refused(content):
    """Attachment content that is not valid base64 is refused, naming it."""
    error = _refused(attachments=[{"filename": "a.pdf", "content": content}])
    assert error.field == "attachments[0].content"


@pytest.mark.parametrize(
    "content_type", ["pdf", "application/", "/pdf", "text/plain; charset=utf-8", ""]
)
def test_attachment_with_bad_content_type_is_refused(content_type):
    """An attachment content type that is not type/subtype is refused, naming it."""
    attachment = {
        "filename": "a.pdf",
        "content": _b64(PDF),
        "content_type": content_type,
    }
    error = _refused(attachments=[attachment])
    assert error.field == "attachments[0].content_type"


@pytest.mark.parametrize("filename", ["../etc/passwd", "dir\\a.pdf", 'a".pdf', ""])
def test_attachment_with_bad_filename_is_refused(filename):
    """An attachment filename with a path, a quote, or empty is refused."""
    error = _refused(attachments=[{"filename": filename, "content": _b64(PDF)}])
    assert error.field == "attachments[0].filename"


# ---------------------------------------------------------------- metadata


@pytest.mark.parametrize("key", ["1abc", "has space", "", "a/b", "k" * 65, "ü"])
def test_bad_metadata_key_is_refused(key):
    """Metadata keys start with a letter or '_' and hold letters, digits, _ . - only."""
    assert _refused(metadata={key: "v"}).field == "metadata"


def test_nested_metadata_value_is_refused():
    """Metadata values are scalars: a nested object is refused, naming the key."""
    assert _refused(metadata={"task": {"id": 1}}).field == "metadata.task"


def test_oversized_metadata_is_refused():
    """Metadata larger than 4 KiB is refused."""
    assert _refused(metadata={"blob": "x" * 5000}).field == "metadata"


# ---------------------------------------------------------------- however a job is built


BUILDERS = {
    "constructor": lambda fields: Notification(**fields),
    "model_validate": Notification.model_validate,
    "model_validate_json": lambda fields: Notification.model_validate_json(
        json.dumps(fields)
    ),
    "parse_job": parse_job,
}


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())
@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"to": ["bad"]}, "to[0].address", "'bad' is not an e-mail address"),
        (
            {"metadata": {"task": {"id": 1}}},
            "metadata.task",
            "must be a string, number, boolean or null, not dict",
        ),
        ({"priority": "urgent"}, "priority", "must be 'high', 'normal' or 'bulk'"),
        ({"subject": 7}, "subject", "must be a valid string"),
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"attachments": [7]}, "attachments[0]", "must be an object"),
    ],
)
def test_an_invalid_job_raises_job_validation_error_however_it_is_built(
    build, fields, field, reason
):
    """Constructor, model_validate, model_validate_json and parse_job all raise
    JobValidationError with the field and one reason, never pydantic's ValidationError."""
    with pytest.raises(JobValidationError) as info:
        build(_job(**fields))
    error = info.value
    assert (error.field, error.reason) == (field, reason)
    assert str(error) == f"{field}: {reason}"
    assert not isinstance(error, pydantic.ValidationError)
    assert "pydantic" not in str(error)
    assert isinstance(error, ValueError)  # code that caught ValueError still does


def test_invalid_parts_raise_job_validation_error_when_built_alone():
    """Mailbox and Attachment built on their own raise JobValidationError too."""
    with pytest.raises(JobValidationError) as info:
        Mailbox(address="nobody")
    assert info.value.field == "address"
    with pytest.raises(JobValidationError) as info:
        Attachment(filename="a/b.pdf", content=b"x")
    assert info.value.field == "filename"
    with pytest.raises(JobValidationError) as info:
        Notification.model_validate_json(b"{not json")
    assert info.value.field == "job" and "not valid JSON" in info.value.reason


def test_job_validation_error_survives_pickling():
    """A JobValidationError crosses a process pool with its field and reason."""
    with pytest.raises(JobValidationError) as info:
        Notification(to=["bad"], subject="s", text="t")
    copy = pickle.loads(pickle.dumps(info.value))  # noqa: S301 - our own bytes
    assert (copy.field, copy.reason, str(copy)) == (
        info.value.field,
        info.value.reason,
        str(info.value),
    )


# ---------------------------------------------------------------- limits


SMALL = Limits(max_recipients=2, max_message_bytes=1024)


def test_check_limits_refuses_too_many_recipients():
    """More recipients than limits.max_recipients (to + cc + bcc) are refused."""
    job = parse_job(
        _job(to=["a@example.com"], cc=["b@example.com"], bcc=["c@example.com"])
    )
    with pytest.raises(JobValidationError) as info:
        job.check_limits(SMALL)
    assert info.value.field == "to"
    assert "max_recipients" in str(info.value)


def test_check_limits_accepts_a_job_at_the_limits():
    """A job with exactly max_recipients and small content passes check_limits."""
    job = parse_job(_job(to=["a@example.com"], cc=["b@example.com"]))
    job.check_limits(SMALL)
    assert len(job.recipients) == 2


def test_check_limits_refuses_too_large_attachments():
    """Attachments that make the message larger than max_message_bytes are refused."""
    attachment = {"filename": "big.bin", "content": _b64(b"a" * 800)}
    job = parse_job(_job(attachments=[attachment]))
    with pytest.raises(JobValidationError) as info:
        job.check_limits(SMALL)
    assert info.value.field == "attachments"
    assert "max_message_bytes" in str(info.value)


def test_check_limits_refuses_too_large_text():
    """A body that alone makes the message larger than max_message_bytes is refused."""
    job = parse_job(_job(text="x" * 2000))
    with pytest.raises(JobValidationError, match="max_message_bytes"):
        job.check_limits(SMALL)


def test_check_limits_refuses_a_past_not_after():
    """A not_after already passed is refused."""
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    job = parse_job(_job(not_after=past))
    with pytest.raises(JobValidationError) as info:
        job.check_limits(SMALL)
    assert info.value.field == "not_after"


def test_check_limits_accepts_a_future_not_after():
    """A not_after in the future passes check_limits."""
    future = datetime.now(timezone(timedelta(hours=-5))) + timedelta(hours=1)
    job = parse_job(_job(not_after=future.isoformat()))
    job.check_limits(SMALL)
    assert job.not_after == future


# ---------------------------------------------------------------- recipients and wire


def test_recipients_are_deduplicated_in_order():
    """recipients lists to, cc and bcc addresses once each, in order, without reply_to."""
    job = parse_job(
        _job(
            to=["a@example.com", "Bee <b@EXAMPLE.com>"],
            cc=["a@example.com"],
            bcc=["b@example.com", "c@example.com"],
            reply_to=["r@example.com"],
        )
    )
    assert job.recipients == ["a@example.com", "b@example.com", "c@example.com"]


def test_to_wire_round_trips_through_parse_job():
    """to_wire() is JSON with base64 attachments, and parse_job reads it back equal."""
    job = parse_job(
        _job(
            to=['"Doe, Jane" <jane@example.com>', "bob@bücher.example"],
            cc=[{"address": "carol@example.com", "name": "Carol"}],
            bcc=["dave@example.com"],
            reply_to=["help@example.com"],
            html="<p>Hi</p>",
            headers={"X-Workflow": "wf-1"},
            attachments=[
                {
                    "filename": "q3.pdf",
                    "content_type": "application/pdf",
                    "content": _b64(PDF),
                }
            ],
            priority="bulk",
            not_after="2031-05-01T09:00:00+02:00",
            metadata={"workflow": "wf-1", "step": 3, "ratio": 0.5, "done": False},
        )
    )
    wire = json.loads(json.dumps(job.to_wire()))
    assert wire["schema_version"] == SCHEMA_VERSION
    assert wire["attachments"][0]["content"] == _b64(PDF)
    again = parse_job(wire)
    assert again == job
    assert again.attachments[0].content == PDF


def test_attachment_content_is_bytes_in_python():
    """An attachment built in Python keeps bytes, and base64 text is decoded."""
    from_bytes = Attachment(filename="a.pdf", content=PDF)
    from_text = Attachment(filename="a.pdf", content=_b64(PDF))
    assert from_bytes.content == from_text.content == PDF
    job = Notification(
        to=["a@example.com"], subject="s", text="t", attachments=[from_bytes]
    )
    assert parse_job(job.to_wire()) == job


def test_to_wire_carries_binary_attachments():
    """Attachments with arbitrary (non-UTF-8) bytes travel as base64 and come back equal."""
    job = parse_job(
        _job(attachments=[{"filename": "logo.png", "content": _b64(BINARY)}])
    )
    wire = json.loads(json.dumps(job.to_wire()))
    assert wire["attachments"][0]["content"] == _b64(BINARY)
    assert parse_job(wire).attachments[0].content == BINARY
