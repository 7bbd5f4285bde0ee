"""What ``classify`` makes of bounces, auto-replies and other mail (tests/samples/bounces)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from worker.inbound.classify import BounceReport, Classification, classify

SAMPLES = Path(__file__).parent / "samples" / "bounces"
OURS = "<3f1c2a9e-7b5d-4c1e-9a8f-2d6b0e4c5a17@workflow.example.com>"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def message(*headers: str, body: str = "Hello.\n", content_type: str = "") -> bytes:
    """A message with a From and Message-ID, the given fields, and ``body``."""
    fields = ["From: Bob <bob@example.org>", "To: actions@workflow.example.com"]
    fields += ["Message-ID: <m1@example.org>", *headers]
    if content_type:
        fields += ["MIME-Version: 1.0", f"Content-Type: {content_type}"]
    return ("\n".join(fields) + "\n\n" + body).encode()


def dsn(recipients: str, *, original: str = OURS, report: str = "") -> bytes:
    """A minimal RFC 3464 report with ``recipients`` as its per-recipient blocks."""
    status = report or (
        "Content-Type: message/delivery-status\n\n"
        f"Reporting-MTA: dns; mail.example.net\n\n{recipients}\n"
    )
    body = (
        "--r\nContent-Type: text/plain\n\nDelivery report.\n\n"
        f"--r\n{status}\n"
        "--r\nContent-Type: text/rfc822-headers\n\n"
        f"From: noreply@workflow.example.com\nMessage-ID: {original}\n\n"
        "--r--\n"
    )
    return message(
        "Subject: Delivery report",
        "Auto-Submitted: auto-replied",
        content_type="multipart/report; report-type=delivery-status; boundary=r",
        body=body,
    )


def brief(result: Classification) -> list[tuple[str, str, str]]:
    return [(r.address, r.action, r.code) for r in result.reports]


SAMPLE_CASES = [
    # file, kind, reports, original Message-ID, original job id
    (
        "postfix-user-unknown.eml",
        "bounce",
        [("Gone@example.org", "failed", "5.1.1")],
        OURS,
        None,
    ),
    (
        "o365-recipient-not-found.eml",
        "bounce",
        [("nobody@contoso.com", "failed", "5.1.10")],
        "<PH0PR11MB5095A1B2C3D4E5F60718293A4B5C6D7E8@PH0PR11MB5095.namprd11.prod.outlook.com>",
        "8d0e6b52-1c3a-4f7e-b2d9-5a4c3e1f0b68",
    ),
    (
        "exim-plain.eml",
        "bounce",
        [("nosuchuser@example.net", "failed", "5.1.1")],
        "<c47a9f10-2e8b-4d6c-a1f3-9b7e5d2c8a04@workflow.example.com>",
        None,
    ),
    (
        "gmail-no-such-user.eml",
        "bounce",
        [("absent.person@gmail.com", "failed", "5.1.1")],
        "<5b9e3d71-8a2c-4f06-9e1d-7c3b2a6f4e95@workflow.example.com>",
        None,
    ),
    (
        "delayed-4.4.7.eml",
        "bounce",
        [("slow@example.net", "delayed", "4.4.7")],
        "<e2a61c8f-4b7d-4e9a-8c05-1f3d6b9a7e22@contoso.com>",
        "e2a61c8f-4b7d-4e9a-8c05-1f3d6b9a7e22",
    ),
    (
        "expired-4.4.7.eml",
        "bounce",
        [("stale@example.net", "failed", "4.4.7")],
        "<91d4b7e3-6c2a-4a8f-b5e1-3d7c9f0a2b46@workflow.example.com>",
        None,
    ),
    ("outlook-automatic-reply.eml", "auto_reply", [], None, None),
    ("mdn-read-receipt.eml", "auto_reply", [], None, None),
    ("mailing-list.eml", "auto_reply", [], None, None),
    ("human-reply.eml", "other", [], None, None),
]


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize(
    ("name", "kind", "reports", "original", "job"),
    SAMPLE_CASES,
    ids=[c[0] for c in SAMPLE_CASES],
)
def test_each_sample_is_classified(name, kind, reports, original, job, crlf):
    """Each sample gets its kind, its failed or delayed recipients and the original it quotes."""
    raw = sample(name)
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    result = classify(raw)
    assert (result.kind, result.unparseable) == (kind, False)
    assert brief(result) == reports
    assert (result.original_message_id, result.original_job_id) == (original, job)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "postfix-user-unknown.eml",
            "550 5.1.1 <gone@example.org>: Recipient address rejected: "
            "User unknown in local recipient table",
        ),
        (
            "o365-recipient-not-found.eml",
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient nobody@contoso.com "
            "not found by SMTP address lookup",
        ),
        ("delayed-4.4.7.eml", "400 4.4.7 Message delayed"),
    ],
)
def test_a_dsn_diagnostic_is_unfolded_without_its_type(name, message):
    """The Diagnostic-Code's folds become single spaces and its ``smtp`` type is dropped."""
    assert classify(sample(name)).reports[0].message == message


def test_a_plain_text_bounce_takes_its_diagnostic_from_the_text_at_the_address():
    """Exim's text names the address and, below it, the remote server's reply."""
    (report,) = classify(sample("exim-plain.eml")).reports
    assert report.message.startswith("nosuchuser@example.net host mail.example.net")
    assert (
        "550 5.1.1 <nosuchuser@example.net>: Recipient address rejected"
        in report.message
    )
    assert "This is a copy of the message" not in report.message


def test_the_common_fields_are_read_from_the_header():
    """Message-ID is the key, and addresses come in Delivered-To, To, Cc order, lower case."""
    result = classify(sample("human-reply.eml"))
    assert result.key == result.message_id == "<CAF=x7ZbQm3k9V2w@mail.example.org>"
    assert result.addressed_to == (
        "actions+3f1c2a9e.k2jd8s@workflow.example.com",
        "finance@example.org",
    )
    assert result.sender == "Bob@example.org"
    assert result.subject == "Re: Invoice 42 awaits your approval"
    assert result.in_reply_to == OURS
    assert result.references == (OURS,)
    assert (result.reason, result.reports) == ("", ())


def test_a_message_without_message_id_is_keyed_by_its_digest():
    """Without a Message-ID the key is the SHA-256 of the raw bytes."""
    raw = b"From: a@example.org\nSubject: hi\n\nbody\n"
    result = classify(raw)
    assert result.message_id is None
    assert result.key == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_delivered_to_and_x_original_to_come_first_and_once():
    """Every Delivered-To, then X-Original-To, To and Cc, a repeated address listed once."""
    raw = message(
        "Delivered-To: Bounces+Tok@Workflow.Example.com",
        "X-Original-To: actions@workflow.example.com",
        "Cc: ACTIONS@workflow.example.com, c@example.org",
        "Delivered-To: second@workflow.example.com",
    )
    assert classify(raw).addressed_to == (
        "bounces+tok@workflow.example.com",
        "second@workflow.example.com",
        "actions@workflow.example.com",
        "c@example.org",
    )


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (["Auto-Submitted: auto-replied"], "Auto-Submitted: auto-replied"),
        (
            ["Auto-Submitted: auto-notified; owner-email=x@example.org"],
            "Auto-Submitted: auto-notified",
        ),
        (["Return-Path: <>"], "null sender (Return-Path: <>)"),
        (["Precedence: bulk"], "Precedence: bulk"),
        (["Precedence: JUNK"], "Precedence: junk"),
        (["Precedence: auto_reply"], "Precedence: auto_reply"),
        (["X-Autoreply: yes"], "X-Autoreply header"),
        (["X-Autorespond: vacation"], "X-Autorespond header"),
        (["X-Auto-Response: yes"], "X-Auto-Response header"),
        (
            ["List-Unsubscribe: <mailto:leave@lists.example.org>"],
            "mailing list (List-Unsubscribe)",
        ),
        (
            ["Subject: Out of Office: back Monday"],
            "subject starts with 'out of office'",
        ),
        (["Subject: Autoreply: away"], "subject starts with 'autoreply'"),
        (
            ["Subject: =?utf-8?q?Abwesenheitsnotiz=3A_Rechnung_42?="],
            "subject starts with 'abwesenheitsnotiz'",
        ),
        (
            ["Subject: =?iso-8859-1?q?R=E9ponse_automatique_=3A_Facture?="],
            "subject starts with 'réponse automatique'",
        ),
        # The order of the signals decides the reason when there are several.
        (["Precedence: list", "List-Id: <dev.lists.example.org>"], "Precedence: list"),
    ],
)
def test_each_auto_reply_signal_is_named(fields, reason):
    """Each signal alone makes an auto-reply, and the reason names it."""
    result = classify(message(*fields))
    assert (result.kind, result.reason) == ("auto_reply", reason)


@pytest.mark.parametrize(
    "fields",
    [
        ["X-Auto-Response-Suppress: All"],
        ["Auto-Submitted: no"],
        ["Precedence: normal"],
        ["Subject: Re: Out of office tomorrow?"],
        ["Return-Path: <bob@example.org>"],
    ],
)
def test_what_is_not_an_auto_reply_signal(fields):
    """X-Auto-Response-Suppress, ``Auto-Submitted: no`` and a quoted OOF subject are not signals."""
    result = classify(message(*fields))
    assert (result.kind, result.reason) == ("other", "")


def test_a_dsn_is_a_bounce_before_it_is_an_auto_reply():
    """A DSN also carries Auto-Submitted and a null sender, but it is a bounce."""
    raw = dsn("Final-Recipient: rfc822; x@example.net\nAction: failed\nStatus: 5.2.2\n")
    result = classify(raw.replace(b"Subject:", b"Return-Path: <>\nSubject:"))
    assert result.kind == "bounce"
    assert brief(result) == [("x@example.net", "failed", "5.2.2")]


def test_a_delivery_report_without_failures_is_other_and_names_the_original():
    """Only failed and delayed recipients are bounces: a report of deliveries is ``other``."""
    raw = dsn(
        "Final-Recipient: rfc822; a@example.net\nAction: delivered\nStatus: 2.0.0\n\n"
        "Final-Recipient: rfc822; b@example.net\nAction: relayed\nStatus: 2.0.0\n"
    )
    result = classify(raw)
    assert (result.kind, result.reports) == ("other", ())
    assert result.reason == "delivery report without failures"
    assert result.original_message_id == OURS


def test_a_dsn_whose_status_part_is_garbage_is_other_with_a_reason():
    """Unreadable delivery status and no detector finding: ``other``, the original still named."""
    raw = dsn(
        "",
        report="Content-Type: message/delivery-status\n\n\x00\x01 ::: \xff garbage\n",
    )
    result = classify(raw)
    assert (result.kind, result.unparseable, result.reports) == ("other", False, ())
    assert result.reason == (
        "looks like a bounce (a delivery status notification) but names no failed recipient"
    )
    assert result.original_message_id == OURS


def test_each_failed_and_delayed_recipient_is_reported_once():
    """Several blocks: failed and delayed kept in order, delivered dropped, repeats merged."""
    raw = dsn(
        "Final-Recipient: rfc822; a@example.net\nAction: failed\nStatus: 5.1.1\n\n"
        "Final-Recipient: rfc822; b@example.net\nAction: delivered\nStatus: 2.0.0\n\n"
        "Final-Recipient: rfc822; c@example.net\nAction: delayed (retrying)\nStatus: 4.2.0\n\n"
        "Final-Recipient: rfc822; a@example.net\nAction: failed\nStatus: 5.1.1\n"
    )
    assert brief(classify(raw)) == [
        ("a@example.net", "failed", "5.1.1"),
        ("c@example.net", "delayed", "4.2.0"),
    ]


@pytest.mark.parametrize(
    ("fields", "action", "code"),
    [
        (
            "Action: failed\nDiagnostic-Code: smtp; 550 5.7.1 Relaying denied",
            "failed",
            "5.7.1",
        ),
        (
            "Action: failed\nDiagnostic-Code: smtp; 554 Transaction failed",
            "failed",
            "5.0.0",
        ),
        (
            "Action: delayed\nDiagnostic-Code: smtp; 451 Try again later",
            "delayed",
            "4.0.0",
        ),
        ("Action: failed\nStatus: garbage", "failed", "5.0.0"),
        ("Action: delayed", "delayed", "4.0.0"),
        ("Action: error\nStatus: 5.1.2", "failed", "5.1.2"),
    ],
)
def test_the_code_falls_back_from_status_to_diagnostic_to_the_action(
    fields, action, code
):
    """Status first, then an enhanced code or a reply's class in the diagnostic, then X.0.0."""
    raw = dsn(f"Final-Recipient: rfc822; a@example.net\n{fields}\n")
    assert brief(classify(raw)) == [("a@example.net", action, code)]


def test_original_recipient_is_preferred_and_its_domain_lowered():
    """Original-Recipient (what we sent to) wins over Final-Recipient (an alias's target)."""
    raw = dsn(
        "Final-Recipient: rfc822; mailbox-17@store.example.net\n"
        "Original-Recipient: rfc822; <Info@Example.NET>\nAction: failed\nStatus: 5.2.1\n"
    )
    assert brief(classify(raw)) == [("Info@example.net", "failed", "5.2.1")]


def test_a_long_diagnostic_is_cut_at_500_characters():
    """The diagnostic keeps at most 500 characters."""
    long = "smtp; 550 5.1.1 " + "word " * 300
    raw = dsn(
        f"Final-Recipient: rfc822; a@example.net\nAction: failed\nDiagnostic-Code: {long}\n"
    )
    (report,) = classify(raw).reports
    assert len(report.message) <= 500 and report.message.startswith(
        "550 5.1.1 word word"
    )


def test_an_encoded_delivery_status_part_is_decoded():
    """A delivery-status sent in base64 (against RFC 3464) is still read."""
    fields = b"Reporting-MTA: dns; x\n\nFinal-Recipient: rfc822; a@example.net\n"
    fields += b"Action: failed\nStatus: 5.1.1\n"
    report = (
        "Content-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(fields).decode()
    )
    assert brief(classify(dsn("", report=report))) == [
        ("a@example.net", "failed", "5.1.1")
    ]


def test_a_global_dsn_reports_a_utf8_address():
    """message/global-delivery-status (RFC 6533) with a utf-8 address type is read."""
    report = (
        "Content-Type: message/global-delivery-status\n\n"
        "Reporting-MTA: dns; mail.example.net\n\n"
        "Final-Recipient: utf-8; j\\x{00F6}rg@Example.NET\nAction: failed\nStatus: 5.1.1\n"
    )
    assert brief(classify(dsn("", report=report))) == [
        ("jörg@example.net", "failed", "5.1.1")
    ]


QMAIL = """\
Hi. This is the qmail-send program at mx.example.net.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<missing@example.net>:
192.0.2.30 does not like recipient.
Remote host said: 550 5.1.1 <missing@example.net>... User unknown
Giving up on 192.0.2.30.

--- Below this line is a copy of the message.

Return-Path: <bounces+91d4b7e3@workflow.example.com>
Message-ID: <0a1b2c3d@workflow.example.com>
X-Mailworker-Job-Id: 0a1b2c3d-0000-4000-8000-000000000001
Subject: Hello

Hello.
"""


def test_a_qmail_bounce_is_found_by_the_detectors_and_quotes_its_original():
    """flufl.bounce finds the address, and the code and the quoted ids come from the text."""
    raw = message("Subject: failure notice", body=QMAIL).replace(
        b"From: Bob <bob@example.org>", b"From: MAILER-DAEMON@mx.example.net"
    )
    result = classify(raw)
    assert brief(result) == [("missing@example.net", "failed", "5.1.1")]
    assert result.original_message_id == "<0a1b2c3d@workflow.example.com>"
    assert result.original_job_id == "0a1b2c3d-0000-4000-8000-000000000001"


def test_a_bounce_without_from_still_reaches_every_detector(caplog):
    """No From (one detector trips on that and would stop the rest): qmail's text is read."""
    raw = b"Return-Path: <>\nSubject: failure notice\n\n" + QMAIL.encode()
    result = classify(raw)
    assert brief(result) == [("missing@example.net", "failed", "5.1.1")]
    assert "Exception in detector" not in caplog.text


def test_a_bounce_with_8bit_bytes_in_from_still_reaches_every_detector(caplog):
    """Raw 8-bit bytes in From read as text, so no detector trips on them."""
    head = b"From: Mail Syst\xe8me <MAILER-DAEMON@mx.example.net>\nSubject: failure notice\n\n"
    result = classify(head + QMAIL.encode())
    assert brief(result) == [("missing@example.net", "failed", "5.1.1")]
    assert result.sender == "MAILER-DAEMON@mx.example.net"
    assert "Exception in detector" not in caplog.text


def test_a_mail_system_message_without_a_failure_is_other():
    """From MAILER-DAEMON but no failed recipient anywhere: ``other``, not an auto-reply."""
    raw = message(
        "Subject: Mail system notice",
        "Auto-Submitted: auto-generated",
        body="Your mailbox is 91% full.\n",
    ).replace(
        b"From: Bob <bob@example.org>",
        b"From: Mailer-Daemon <MAILER-DAEMON@example.net>",
    )
    result = classify(raw)
    assert (result.kind, result.reports) == ("other", ())
    assert (
        result.reason
        == "looks like a bounce (from MAILER-DAEMON) but names no failed recipient"
    )


def test_a_bounce_subject_alone_is_not_a_bounce():
    """A person writing "Undeliverable" in a subject is read for auto-reply signals as usual."""
    result = classify(message("Subject: Undeliverable parcel, please call"))
    assert (result.kind, result.reason) == ("other", "")


def test_a_forwarded_bounce_from_a_person_is_not_a_bounce():
    """Someone forwarding an Exim bounce (subject ``Fwd: Mail delivery failed``) sends ``other``."""
    quoted = sample("exim-plain.eml").split(b"\n\n", 1)[1].decode()
    body = "FYI, see below.\n\n---------- Forwarded message ---------\n" + quoted
    result = classify(
        message("Subject: Fwd: Mail delivery failed: returning message", body=body)
    )
    assert (result.kind, result.reports, result.reason) == ("other", (), "")


def test_a_bounce_report_is_the_documented_shape():
    """BounceReport and Classification carry the fields the handler reads."""
    report = BounceReport(
        address="a@example.net", action="failed", code="5.1.1", message="x"
    )
    result = Classification(kind="bounce", key="<k@x>", reports=(report,))
    assert result.reports[0].code == "5.1.1" and not result.unparseable
