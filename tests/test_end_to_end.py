"""From enqueue to the message the SMTP server received, through a real worker."""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest

from producers import Notification, Producer


def _producer(redis_client, settings) -> Producer:
    return Producer(redis_client, namespace=settings.namespace, limits=settings.limits)


@pytest.mark.parametrize(
    ("mode", "auth"), [("plain", False), ("starttls", True), ("tls", True)]
)
def test_enqueued_job_arrives_with_headers_and_bodies(
    mode, auth, smtp_server, make_settings, ca_file, run_worker, redis_client
):
    """A job enqueued by a producer arrives over plain, STARTTLS and implicit TLS with AUTH."""
    # Given a server and a worker configured for it
    server = smtp_server(mode, auth=auth)
    settings = make_settings(smtp=[server.smtp_section(ca_bundle=str(ca_file))])
    app = run_worker(settings)
    producer = _producer(redis_client, settings)
    # When a text+html notification with an attachment is enqueued
    job_id = producer.enqueue(
        Notification(
            to=["Ann Example <ann@example.org>"],
            cc=["cc@example.org"],
            bcc=["hidden@example.org"],
            subject="Task 42 is waiting for your approval – Grüße",
            text="Please approve task 42.",
            html="<p>Please approve <b>task 42</b>.</p>",
            attachments=[
                {
                    "filename": "task.pdf",
                    "content_type": "application/pdf",
                    "content": b"%PDF-1.4 test",
                }
            ],
            metadata={"workflow": "wf-7", "task": 42},
        )
    )
    app.broker.join("mail", timeout=10_000)
    # Then the server received it once, for every recipient, and it parses back
    [received] = server.recorder.messages
    assert received.mail_from == "noreply@example.com"
    assert sorted(received.rcpt_tos) == [
        "ann@example.org",
        "cc@example.org",
        "hidden@example.org",
    ]
    msg = message_from_bytes(received.data, policy=policy.default)
    assert msg["Message-ID"] == f"<{job_id}@example.com>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Subject"] == "Task 42 is waiting for your approval – Grüße"
    assert msg["From"] == "Example Notifications <noreply@example.com>"
    assert msg["To"] == "Ann Example <ann@example.org>"
    assert msg["Cc"] == "cc@example.org"
    assert msg["Bcc"] is None and b"hidden@" not in received.data
    assert msg.get_body(("plain",)).get_content().strip() == "Please approve task 42."
    assert "<b>task 42</b>" in msg.get_body(("html",)).get_content()
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_filename() == "task.pdf"
    assert attachment.get_content() == b"%PDF-1.4 test"
    # And the status record says it was sent
    record = app.status.get(job_id)
    assert record is not None
    assert record["state"] == "sent"
    assert record["service"] == "primary"
    assert record["attempts"] == 1
    assert record["message_id"] == f"<{job_id}@example.com>"
    assert record["metadata"] == {"workflow": "wf-7", "task": 42}
    assert {r["address"]: r["state"] for r in record["recipients"]} == {
        "ann@example.org": "accepted",
        "cc@example.org": "accepted",
        "hidden@example.org": "accepted",
    }
