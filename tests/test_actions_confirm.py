"""confirm_by_email (DESIGN §10): a short auto-replied answer, never to automatic mail."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser

import pytest

from tests.support.helpers import wait_for
from tests.support.replies import reply
from tests.test_actions_reply import actions  # noqa: F401  (a fixture)


@pytest.fixture
def confirming(actions, smtp_server, run_worker):  # noqa: F811
    """Actions with confirm_by_email on, and a worker that sends the confirmations."""
    server = smtp_server()

    def start():
        a = actions(smtp=[server.smtp_section()], confirm_by_email=True)
        a.app = run_worker(a.settings)
        return a

    return start, server


def _received(server):
    return [
        BytesParser(policy=policy.default).parsebytes(m.data)
        for m in server.recorder.messages
    ]


def test_an_accepted_reply_is_confirmed_to_its_actor(confirming):
    """The actor gets one short reply naming the action and the subject, marked
    auto-replied and threaded under their reply."""
    start, server = confirming
    a = start()
    key = a.issue()["ann@example.org"]
    raw = reply(key)
    handled = a.handle(raw)
    assert handled.outcome == "accepted"
    wait_for(lambda: len(server.recorder.messages) == 1)
    [message] = _received(server)
    assert server.recorder.messages[0].rcpt_tos == ["ann@example.org"]
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["In-Reply-To"] == handled.message_id
    assert (
        "approve" in message["Subject"] and "Approve invoice 42" in message["Subject"]
    )
    assert "accepted" in message.get_content()


def test_a_refusal_is_confirmed_naming_the_reason_in_words(confirming):
    """A reply refused for another reason than auto_reply gets a reply saying why."""
    start, server = confirming
    a = start()
    key = a.issue()["ann@example.org"]
    assert (
        a.handle(reply(key, subject="Re: maybe", text="Hmm.")).reason
        == "unknown_action"
    )
    wait_for(lambda: len(server.recorder.messages) == 1)
    [message] = _received(server)
    assert "names none of the offered actions" in message.get_content()
    assert message["Auto-Submitted"] == "auto-replied"


def test_auto_replies_are_never_answered(confirming):
    """An out-of-office reply and a list message are refused and get no answer, while a
    later real reply does (so the worker was running all along)."""
    start, server = confirming
    a = start()
    key = a.issue()["ann@example.org"]
    ooo = reply(
        key, subject="Out of office", headers={"Auto-Submitted": "auto-replied"}
    )
    listed = reply(key, headers={"List-Id": "<team.example.org>"})
    assert a.handle(ooo).reason == "auto_reply"
    assert a.handle(listed).reason == "auto_reply"
    assert a.handle(reply(key)).outcome == "accepted"
    a.app.broker.join("mail", timeout=20_000)
    [message] = _received(server)
    assert "accepted" in message.get_content()
