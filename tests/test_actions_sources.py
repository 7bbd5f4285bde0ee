"""Replies to action keys read by the mailbox sources: a private Dovecot over IMAP, and
the Graph stand-in's Exchange mailbox; the engine reads the events from the stream."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser

from producers import Notification, Producer
from tests import test_inbound_graph as graph_tests
from tests import test_inbound_imap as imap_tests
from tests.support.dovecot import append, message_ids
from tests.support.helpers import wait_for
from tests.support.replies import reply
from worker.inbound.runner import build_inbound

MAILBOX, PROCESSED = graph_tests.MAILBOX, imap_tests.PROCESSED
# The sources' own fixtures: a Dovecot user and its imap source, the Graph stand-in.
user, imap_source = imap_tests.user, imap_tests.imap_source
mailbox, settings, make_source = (
    graph_tests.mailbox,
    graph_tests.settings,
    graph_tests.make_source,
)

IMAP_REPLY = "actions@workflow.example.com"


def _key_of(raw: bytes) -> tuple[str, str]:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    address = message["Reply-To"].addresses[0].addr_spec
    return address, address.split("+", 1)[1].split("@", 1)[0]


def _send(app, producer, to):
    job_id = producer.enqueue(
        Notification(
            to=[to],
            subject="Approve invoice 42",
            text="Invoice 42 waits.",
            actions=[{"id": "approve", "label": "Approve"}],
        )
    )
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    return job_id


def test_a_reply_read_over_imap_is_accepted(
    dovecot, user, imap_source, make_settings, smtp_server, run_worker, redis_client
):
    """A reply delivered to the Dovecot mailbox is read by the imap source, accepted,
    moved to the processed folder, and read by the engine as action.accepted."""
    server = smtp_server()
    address = user if "@" in user else IMAP_REPLY  # what the imap source receives
    actions = {"enabled": True, "reply_address": address}
    receiver = {"name": "forwarded", "kind": "smtp", "accept": [address]}
    settings_ = make_settings(
        smtp=[server.smtp_section()], inbound=[receiver], email_actions=actions
    )
    app = run_worker(settings_)
    producer = Producer.from_settings(settings_)
    job_id = _send(app, producer, "ann@example.org")
    address, key = _key_of(server.recorder.messages[0].data)
    with dovecot.client(user) as imap:
        append(imap, "INBOX", reply(key, to=address))
    source = imap_source(
        user,
        sink=build_inbound(settings_, redis_client),
        settings={"email_actions": actions},
    )
    assert source.poll_once() == 1
    [event] = [
        e
        for e in producer.read_events("engine", "e1")
        if e["type"].startswith("action")
    ]
    assert (event["type"], event["job_id"]) == ("action.accepted", job_id)
    assert event["data"]["via"] == "actions-imap"
    assert event["data"]["comment"] == "Looks fine, pay it."
    with dovecot.client(user) as imap:
        assert len(message_ids(imap, PROCESSED)) == 1


def test_replies_read_from_the_exchange_mailbox_need_the_tenants_proof(
    make_source, settings, mailbox, smtp_server, run_worker, redis_client, namespace
):
    """From the Graph mailbox, a reply marked intra-tenant (AuthAs: Internal) is
    accepted; one without any proof is refused `unauthenticated`."""
    server = smtp_server()
    extra = {
        "smtp": [server.smtp_section()],
        "email_actions": {"enabled": True, "reply_address": MAILBOX},
    }
    app = run_worker(settings(extra=extra))
    producer = Producer.from_settings(settings(extra=extra))
    source = make_source(extra=extra)
    _send(app, producer, "ann@example.org")
    _send(app, producer, "bob@example.org")
    by_recipient = {m.rcpt_tos[0]: m.data for m in server.recorder.messages}
    ann_address, ann = _key_of(by_recipient["ann@example.org"])
    bob_address, bob = _key_of(by_recipient["bob@example.org"])
    internal = {"X-MS-Exchange-Organization-AuthAs": "Internal"}
    mailbox.add(reply(ann, to=ann_address, headers=internal))
    mailbox.add(reply(bob, to=bob_address, sender="bob@example.org"))
    assert source.poll_once() == 2
    events = {
        e["data"]["actor"]: e
        for e in producer.read_events("engine", "e1")
        if e["type"].startswith("action")
    }
    assert events["ann@example.org"]["type"] == "action.accepted"
    assert events["ann@example.org"]["data"]["via"] == "o365-actions"
    assert events["bob@example.org"]["type"] == "action.refused"
    assert events["bob@example.org"]["data"]["reason"] == "unauthenticated"
