"""Many messages on one SMTP session, pipelined across messages (the bulk path), against
real aiosmtpd servers: each message's outcome is its own, and nothing is lost when the
session fails or the worker stops half-way."""

from __future__ import annotations

from email import message_from_bytes, policy
from typing import Any

import pytest

from producers.job import Mailbox, Notification
from tests.support.smtp import Recorder
from worker.errors import MessageRefusedError, TransientDeliveryError
from worker.mime import render
from worker.transports.base import OutgoingMessage, Receipt
from worker.transports.smtp import SmtpTransport

FROM = Mailbox(address="noreply@example.com", name="Example Notifications")


class Picky(Recorder):
    """Refuses or defers a message by a word in its subject; can drop the connection."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or b""
        if b"Subject: refuse" in content:
            return "554 5.6.0 Content refused"
        if b"Subject: later" in content:
            return "451 4.3.0 Try again later"
        if b"Subject: drop" in content:
            server.transport.close()
            return "421 4.4.2 Closing"
        return await super().handle_DATA(server, session, envelope)


def _message(
    index: int, subject: str = "Notice", text: str = "Please act."
) -> OutgoingMessage:
    notification = Notification(
        to=[f"user{index}@example.org"], subject=subject, text=text
    )
    job_id = f"job-{index}"
    return OutgoingMessage(
        job_id=job_id,
        sender=FROM.address,
        recipients=tuple(notification.recipients),
        data=render(notification, job_id=job_id, from_box=FROM),
        notification=notification,
    )


def _envelopes(
    messages: list[OutgoingMessage],
) -> list[tuple[str, tuple[str, ...], bytes]]:
    return [(m.sender, m.recipients, m.data) for m in messages]


def _subjects(recorder: Recorder) -> list[str]:
    return [
        str(message_from_bytes(m.data, policy=policy.default)["Subject"])
        for m in recorder.messages
    ]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
def test_many_messages_arrive_in_order_on_one_session(smtp_server, connect, pipelining):
    server = smtp_server(recorder=Recorder(pipelining=pipelining))
    client = connect(server)
    assert client.pipelining is pipelining
    messages = [_message(i, subject=f"n{i}") for i in range(6)]
    messages[2] = _message(2, subject="n2", text="line one\n.leading dot\n..two dots")
    results = client.send_many(_envelopes(messages))
    assert all(isinstance(r, Receipt) for r in results)
    assert [r.accepted for r in results] == [[f"user{i}@example.org"] for i in range(6)]
    assert _subjects(server.recorder) == [f"n{i}" for i in range(6)]
    assert server.recorder.ehlos == 1
    body = message_from_bytes(server.recorder.messages[2].data, policy=policy.default)
    assert body.get_content().splitlines() == ["line one", ".leading dot", "..two dots"]


def test_each_message_gets_its_own_refusal_and_the_session_goes_on(
    smtp_server, connect
):
    """A refused recipient, refused content and deferred content touch only their own
    message; the messages after them are delivered on the same session."""
    recorder = Picky()
    recorder.rcpt_replies["user1@example.org"] = "550 5.1.1 No such user"
    server = smtp_server(recorder=recorder)
    client = connect(server)
    subjects = ["ok0", "ok1", "refuse", "ok3", "later", "ok5"]
    results = client.send_many(
        _envelopes([_message(i, subject=s) for i, s in enumerate(subjects)])
    )
    assert isinstance(results[0], Receipt) and results[0].accepted
    assert isinstance(results[1], Receipt)
    assert (
        results[1].accepted == [] and results[1].refused["user1@example.org"][0] == 550
    )
    assert isinstance(results[2], MessageRefusedError) and results[2].code == 554
    assert isinstance(results[3], Receipt) and results[3].accepted
    assert isinstance(results[4], TransientDeliveryError) and results[4].code == 451
    assert isinstance(results[5], Receipt) and results[5].accepted
    assert _subjects(recorder) == ["ok0", "ok3", "ok5"]
    assert not client.broken
    # The session is clean for the next run.
    [again] = client.send_many(_envelopes([_message(9, subject="after")]))
    assert isinstance(again, Receipt) and again.accepted == ["user9@example.org"]


def test_stop_leaves_the_rest_unsent(smtp_server, connect):
    server = smtp_server()
    client = connect(server)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    results = client.send_many(
        _envelopes([_message(i, subject=f"n{i}") for i in range(5)]), stop=stop
    )
    assert [isinstance(r, Receipt) for r in results[:2]] == [True, True]
    assert results[2:] == [None, None, None]
    assert _subjects(server.recorder) == ["n0", "n1"]


def test_a_lost_session_fails_the_message_in_flight_and_the_rest_go_on_a_new_one(
    smtp_server, make_settings
):
    """The server drops the connection after one message's content: that message is in
    doubt (a transient error), the ones before it are delivered, and the transport sends
    the ones after it on a new session."""
    server = smtp_server(recorder=Picky())
    conn = make_settings(smtp=[server.smtp_section()]).smtp[0]
    transport = SmtpTransport(conn, password=lambda: None)
    try:
        messages = [
            _message(i, subject=s) for i, s in enumerate(["a", "b", "drop", "c", "d"])
        ]
        results = transport.send_many(messages)
    finally:
        transport.close()
    assert [type(r).__name__ for r in results] == [
        "Receipt",
        "Receipt",
        "TransientDeliveryError",
        "Receipt",
        "Receipt",
    ]
    assert _subjects(server.recorder) == ["a", "b", "c", "d"]
    assert server.recorder.ehlos >= 2
