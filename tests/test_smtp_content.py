"""What the SMTP client writes is what a real server receives, byte for byte: rendered
messages whose large attachments are encoded while they are written, and dot-stuffing
that holds wherever the chunks of a message begin and end."""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest

from producers.job import Mailbox, Notification
from worker.mime import Mime, render_message
from worker.transports.base import Receipt

FROM = Mailbox(address="noreply@example.com", name="Example Notifications")
RCPT = ("ann@example.org",)
BIG = bytes(range(256)) * 1200  # 300 KiB: encoded block by block on the way out


def _rendered(index: int = 0) -> tuple[Notification, Mime]:
    notification = Notification(
        to=list(RCPT),
        subject=f"Report {index}",
        text=".leading dot\n.\n..\nGrüße\n",
        html="<p>\n.</p>",
        attachments=[
            {"filename": "big.bin", "content": BIG},
            {"filename": "small.txt", "content": b".x\r\n.\r\n"},
        ],
    )
    return notification, render_message(
        notification, job_id=f"job-{index}", from_box=FROM
    )


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
def test_a_rendered_message_arrives_byte_identical(smtp_server, connect, pipelining):
    """A message with text, html and a large and a small attachment arrives exactly as
    rendered (aiosmtpd undoes the dot-stuffing), and the stdlib parses it back."""
    server = smtp_server()
    server.recorder.pipelining = pipelining
    client = connect(server)
    notification, mime = _rendered()
    receipt = client.send(FROM.address, RCPT, mime)
    assert receipt.accepted == list(RCPT)
    [received] = server.recorder.messages
    assert received.data == bytes(mime)
    parsed = message_from_bytes(received.data, policy=policy.default)
    plain = parsed.get_body(("plain",))
    assert plain is not None
    assert plain.get_content().replace("\r\n", "\n") == notification.text
    big, small = parsed.iter_attachments()
    assert big.get_content() == BIG
    assert small.get_content() == b".x\r\n.\r\n"


def test_rendered_messages_arrive_byte_identical_on_one_pipelined_session(
    smtp_server, connect
):
    """Through ``send_many`` (the bulk path) each message arrives exactly as rendered."""
    server = smtp_server()
    client = connect(server)
    mimes = [_rendered(i)[1] for i in range(3)]
    results = client.send_many([(FROM.address, RCPT, m) for m in mimes])
    assert all(isinstance(r, Receipt) and r.accepted for r in results)
    assert [r.data for r in server.recorder.messages] == [bytes(m) for m in mimes]


_CHUNKINGS = {
    # a line starting with "." right at the start of a chunk
    "dot-at-chunk-start": [b"Subject: a\r\n\r\nline\r\n", b".dot\r\nend\r\n"],
    # the CRLF before a "." split across two chunks
    "crlf-split": [b"Subject: a\r\n\r\nline\r", b"\n.dot\r\nend\r\n"],
    # a chunk that is one "." (a lone dot would end the message if not stuffed)
    "lone-dot-chunk": [b"Subject: a\r\n\r\nx\r\n", b".", b"\r\nafter\r\n"],
    # CR, LF and "." each a chunk of its own
    "one-byte-chunks": [b"Subject: a\r\n\r\nx", b"\r", b"\n", b".", b"y\r\n"],
    # an empty chunk between a line end and its dot
    "empty-chunk": [b"Subject: a\r\n\r\nx\r\n", b"", b"..two\r\n"],
    # dots inside chunks, at line starts and not
    "dots-inside": [b"Subject: a\r\n\r\n.a\r\nb.c\r\n..\r\n.\r\n", b"end.\r\n"],
    # a message whose first line starts with "."
    "dot-first": [b".first line\r\n", b"\r\nbody\r\n"],
    # a "." at the end of a chunk that is not at a line start
    "dot-at-chunk-end": [b"Subject: a\r\n\r\nend.", b"\r\n.\r\n", b"x\r\n"],
}


@pytest.mark.parametrize("chunks", list(_CHUNKINGS.values()), ids=list(_CHUNKINGS))
@pytest.mark.parametrize("many", [False, True], ids=["send", "send_many"])
def test_dot_stuffing_holds_across_chunk_boundaries(smtp_server, connect, chunks, many):
    """Lines starting with "." are stuffed wherever a chunk boundary falls (a "." at a
    chunk's start, a CRLF split between chunks, one-byte chunks), so the server gets
    the message unchanged and never an early end of data."""
    server = smtp_server()
    client = connect(server)
    mime = Mime(chunks)
    if many:
        [result] = client.send_many([(FROM.address, RCPT, mime)])
        assert isinstance(result, Receipt)
    else:
        result = client.send(FROM.address, RCPT, mime)
    assert result.accepted == list(RCPT)
    [received] = server.recorder.messages
    assert received.data == b"".join(chunks)


def test_a_message_without_a_final_line_end_gets_one(smtp_server, connect):
    """A message that does not end with CRLF gets one before the final dot."""
    server = smtp_server()
    client = connect(server)
    client.send(FROM.address, RCPT, Mime([b"Subject: a\r\n\r\nno line end", b"."]))
    [received] = server.recorder.messages
    assert received.data == b"Subject: a\r\n\r\nno line end.\r\n"
