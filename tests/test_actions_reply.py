"""Replies to action keys (DESIGN §10): the rules, once, the events, in the real handler."""

from __future__ import annotations

import threading
import uuid

import orjson
import pytest
import structlog

from common.keys import action_key, events_key
from common.sockets import free_port
from producers import Notification, Producer
from tests.support.env import HOST
from tests.support.mail import dsn
from tests.support.replies import QUOTE_OUTLOOK, key_address, reply
from worker.actions.keys import ActionKeys
from worker.inbound.model import Received
from worker.inbound.runner import build_inbound

REPLY = "actions@workflow.example.com"
ACTIONS = [
    {"id": "approve", "label": "Approve"},
    {"id": "reject", "label": "Reject", "comment": "required"},
]
TRUSTED = "mx.workflow.example.com"


@pytest.fixture
def actions(make_settings, redis_client, namespace):
    """Settings with actions on, the real handler, and keys issued for a job."""

    class Actions:
        def __init__(self, smtp=(), graph=False, webhook=(), **options):
            receiver = {
                "name": "replies",
                "kind": "smtp",
                "listen": f"{HOST}:{free_port()}",
                "accept": [REPLY],
            }
            mailbox = {
                "name": "o365",
                "kind": "graph",
                "integrated_service": "graph-mailer",
                "mailbox": REPLY,
            }
            services = {
                "graph-mailer": {
                    "account_type": "service",
                    "tenant_id": "t",
                    "client_id": "c",
                    "client_secret": "s",
                }
            }
            self.settings = make_settings(
                smtp=list(smtp),
                webhook=list(webhook),
                integrated_services=services if graph else {},
                inbound=[receiver, mailbox] if graph else [receiver],
                email_actions={
                    "enabled": True,
                    "reply_address": REPLY,
                    "trusted_authserv_ids": [TRUSTED],
                    **options,
                },
            )
            self.handler = build_inbound(self.settings, redis_client)
            self.job_id = str(uuid.uuid4())

        def issue(self, recipients=("ann@example.org", "cy@example.org"), ttl=None):
            keys = ActionKeys(
                redis_client,
                namespace=namespace,
                key_ttl=self.settings.email_actions.key_ttl if ttl is None else ttl,
                keep=60,
            )
            job = Notification(
                to=[recipients[0]],
                cc=list(recipients[1:]),
                subject="Approve invoice 42",
                text="Invoice 42 waits for your approval.",
                actions=ACTIONS,
                action_context={"task": 42},
            )
            return keys.issue(self.job_id, job, list(recipients))

        def handle(self, raw, source="replies", **envelope):
            envelope.setdefault("mail_from", "ann@example.org")
            return self.handler.handle(Received(raw=raw, source=source, **envelope))

        def events(self):
            return [
                {k.decode(): v.decode() for k, v in fields.items()}
                for _, fields in redis_client.xrange(events_key(namespace))
            ]

    return Actions


def _data(event):
    return orjson.loads(event["data"])


def test_a_reply_from_the_recipient_is_accepted_with_its_new_text_as_comment(
    actions, redis_client, namespace
):
    """The key's recipient replying with the action in the subject is accepted once:
    the key is used, one action.accepted event carries action, context, actor and the
    comment without the quoted original."""
    a = actions()
    keys = a.issue()
    raw = reply(keys["ann@example.org"])
    with structlog.testing.capture_logs() as logs:
        handled = a.handle(raw)
    assert keys["ann@example.org"] not in repr(logs)
    assert [e["event"] for e in logs] == ["inbound_handled"]
    assert (handled.kind, handled.outcome, handled.reason) == ("action", "accepted", "")
    assert handled.job_id == a.job_id
    [event] = a.events()
    assert (event["type"], event["job_id"]) == ("action.accepted", a.job_id)
    data = _data(event)
    assert data["action"] == "approve"
    assert data["context"] == {"task": 42}
    assert data["actor"] == "ann@example.org"
    assert data["comment"] == "Looks fine, pay it."
    assert data["via"] == "replies"
    assert data["message_id"] == handled.message_id and data["received_at"]
    state = redis_client.hget(action_key(namespace, keys["ann@example.org"]), "state")
    assert state == b"used"


def test_a_replayed_reply_is_handled_once_and_a_second_reply_is_refused_used(actions):
    """The same message again changes nothing; another reply to the used key is
    refused `used`."""
    a = actions()
    key = a.issue()["ann@example.org"]
    raw = reply(key)
    assert a.handle(raw).outcome == "accepted"
    again = a.handle(raw)
    assert again.duplicate and again.outcome == "accepted"
    later = a.handle(reply(key, subject="Re: reject: Approve invoice 42"))
    assert (later.outcome, later.reason) == ("refused", "used")
    types = [e["type"] for e in a.events()]
    assert types == ["action.accepted", "action.refused"]
    assert _data(a.events()[1])["reason"] == "used"


def test_two_replies_racing_for_one_key_accept_exactly_one(actions):
    """Approve and reject handled at once for one key: exactly one is accepted."""
    a = actions()
    key = a.issue()["ann@example.org"]
    raws = [
        reply(key, subject="approve: Approve invoice 42"),
        reply(key, subject="reject: Approve invoice 42", text="No, wrong amount."),
    ]
    barrier = threading.Barrier(2)
    results = []

    def run(raw):
        barrier.wait()
        results.append(a.handle(raw))

    threads = [threading.Thread(target=run, args=(raw,)) for raw in raws]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = sorted((h.outcome, h.reason) for h in results)
    assert outcomes == [("accepted", ""), ("refused", "used")]
    events = a.events()
    assert sorted(e["type"] for e in events) == ["action.accepted", "action.refused"]


@pytest.mark.parametrize(
    ("options", "case", "reason"),
    [
        ({}, "forged-from", "sender_mismatch"),
        ({}, "cc-colleague", "sender_mismatch"),
        ({}, "sender-header", "sender_mismatch"),
        ({}, "two-from", "sender_mismatch"),
        ({}, "tampered", "unknown_key"),
        ({}, "truncated", "unknown_key"),
        ({}, "two-keys", "unknown_key"),
        ({}, "long-local-part", "unknown_key"),
        ({}, "unknown-action", "unknown_action"),
        ({}, "no-comment", "comment_required"),
        ({}, "out-of-office", "auto_reply"),
        ({}, "list", "auto_reply"),
        ({}, "null-sender", "auto_reply"),
        ({}, "dsn", "auto_reply"),
        ({"authentication": "require"}, "no-results", "unauthenticated"),
        ({"authentication": "require"}, "dmarc-fail", "unauthenticated"),
        ({"authentication": "require"}, "untrusted-id", "unauthenticated"),
        ({"authentication": "require"}, "unaligned-dkim", "unauthenticated"),
        ({"authentication": "auto"}, "dmarc-fail", "unauthenticated"),
    ],
)
def test_a_reply_breaking_a_rule_is_refused_with_its_reason(
    actions, options, case, reason
):
    """Each bad reply is refused with the reason of the rule it breaks, the key stays
    open, and an action.refused event names that reason."""
    a = actions(**options)
    keys = a.issue()
    key = keys["ann@example.org"]
    envelope = {}
    auth = {"Authentication-Results": f"{TRUSTED}; dmarc=fail header.from=example.org"}
    raw = {
        "forged-from": lambda: reply(key, sender="Mallory <ann@evil.example>"),
        "cc-colleague": lambda: reply(key, sender="cy@example.org"),
        "sender-header": lambda: reply(key, headers={"Sender": "mallory@evil.example"}),
        "two-from": lambda: reply(key, sender="ann@example.org, cy@example.org"),
        "tampered": lambda: reply(key[:-1] + ("a" if key[-1] != "a" else "b")),
        "truncated": lambda: reply(key[:-1]),
        "two-keys": lambda: reply(
            key, to=f"{key_address(key)}, {key_address(keys['cy@example.org'])}"
        ),
        "long-local-part": lambda: reply(key + "a" * 30),
        "unknown-action": lambda: reply(key, subject="Re: maybe later", text="Hmm."),
        "no-comment": lambda: reply(
            key, subject="Re: reject: Approve", text="reject\n"
        ),
        "out-of-office": lambda: reply(
            key,
            subject="Automatic reply: approve: Approve invoice 42",
            text="I am out of the office until Monday.",
            headers={"Auto-Submitted": "auto-replied"},
        ),
        "list": lambda: reply(key, headers={"List-Id": "<team.example.org>"}),
        "null-sender": lambda: reply(key),
        "dsn": lambda: dsn(
            to=key_address(key),
            original_message_id="<x@workflow.example.com>",
            recipient="ann@example.org",
        ),
        "no-results": lambda: reply(key),
        "dmarc-fail": lambda: reply(key, headers=auth),
        "untrusted-id": lambda: reply(
            key,
            headers={
                "Authentication-Results": "mx.evil.example; dmarc=pass "
                "header.from=example.org"
            },
        ),
        "unaligned-dkim": lambda: reply(
            key,
            headers={
                "Authentication-Results": f"{TRUSTED}; dkim=pass header.d=evil.example"
            },
        ),
    }[case]()
    if case == "null-sender":
        envelope["mail_from"] = ""
    handled = a.handle(raw, **envelope)
    assert (handled.kind, handled.outcome, handled.reason) == (
        "action",
        "refused",
        reason,
    )
    [event] = a.events()
    assert event["type"] == "action.refused"
    assert _data(event)["reason"] == reason
    assert a.handle(reply(key)).outcome == (
        "accepted" if options.get("authentication") != "require" else "refused"
    )


def test_an_expired_key_is_refused_expired(actions):
    """A key past its key_ttl is refused `expired`."""
    a = actions()
    key = a.issue(ttl=-1.0)["ann@example.org"]
    handled = a.handle(reply(key))
    assert (handled.outcome, handled.reason) == ("refused", "expired")


def test_a_closed_task_refuses_later_replies(actions, redis_client, namespace):
    """close_actions closes every key of the job: a reply after it is refused `closed`."""
    a = actions()
    keys = a.issue()
    producer = Producer(redis_client, namespace=namespace, email_actions=True)
    assert producer.close_actions(a.job_id) == (2, 2)
    handled = a.handle(reply(keys["ann@example.org"]))
    assert (handled.outcome, handled.reason) == ("refused", "closed")
    assert producer.close_actions(a.job_id) == (2, 0)


@pytest.mark.parametrize(
    ("fields", "comment"),
    [
        ({"text": "Fine by me." + QUOTE_OUTLOOK}, "Fine by me."),
        (
            {
                "text": "Passt so, bitte zahlen. Grüße\n\nAm Di., 1. Dez. 2026 um 10:00 "
                "schrieb Example Notifications <noreply@example.com>:\n> Invoice 42\n",
                "charset": "iso-8859-1",
            },
            "Passt so, bitte zahlen. Grüße",
        ),
        (
            {
                "text": None,
                "html": "<div dir='ltr'>Approved &amp; done<br></div><div "
                "class='gmail_quote'><blockquote>Invoice 42 waits</blockquote></div>",
            },
            "Approved & done",
        ),
        (
            {"subject": "Re: Approve invoice 42", "text": "Approve\nGo ahead.\n> old"},
            "Go ahead.",
        ),
    ],
    ids=["outlook-separator", "latin-1-german", "html-only", "action-on-first-line"],
)
def test_the_comment_is_only_the_new_text(actions, fields, comment):
    """Outlook's separator, German quoting in Latin-1, an html-only reply and an action
    word on the first line all leave just the new text as the comment."""
    a = actions()
    key = a.issue()["ann@example.org"]
    handled = a.handle(reply(key, **fields))
    assert handled.outcome == "accepted", handled.reason
    [event] = a.events()
    assert _data(event)["comment"] == comment
    assert _data(event)["action"] == "approve"


def test_a_required_comment_given_is_accepted(actions):
    """A reject with a comment is accepted with that comment."""
    a = actions()
    key = a.issue()["ann@example.org"]
    handled = a.handle(reply(key, subject="Re: reject: x", text="Amount is wrong."))
    assert handled.outcome == "accepted"
    assert _data(a.events()[0])["comment"] == "Amount is wrong."


@pytest.mark.parametrize(
    "results",
    [
        f"{TRUSTED}; spf=pass smtp.mailfrom=example.org; dmarc=pass header.from=example.org",
        f"{TRUSTED}; dkim=pass header.d=example.org",
    ],
    ids=["dmarc", "dkim"],
)
def test_require_accepts_a_trusted_aligned_pass(actions, results):
    """With authentication = "require", a trusted DMARC or aligned DKIM pass is proof."""
    a = actions(authentication="require")
    key = a.issue()["ann@example.org"]
    raw = reply(key, headers={"Authentication-Results": results})
    assert a.handle(raw).outcome == "accepted"


def test_none_skips_the_authentication_check(actions):
    """With authentication = "none", a trusted dmarc=fail does not refuse the reply."""
    a = actions(authentication="none")
    key = a.issue()["ann@example.org"]
    results = f"{TRUSTED}; dmarc=fail header.from=example.org"
    assert a.handle(
        reply(key, headers={"Authentication-Results": results})
    ).outcome == ("accepted")


def test_inspect_names_key_action_actor_and_verdict_and_writes_nothing(actions):
    """inspect says what a reply would do, and a later handle still accepts it."""
    a = actions()
    key = a.issue()["ann@example.org"]
    plan = a.handler.inspect(Received(raw=reply(key), source="inspect"))
    handled = plan.handled
    assert (handled.kind, handled.outcome) == ("action", "accepted")
    assert handled.details == {
        "key": key,
        "action": "approve",
        "actor": "ann@example.org",
    }
    assert a.events() == []
    assert a.handle(reply(key)).outcome == "accepted"


def test_a_reply_to_the_plain_reply_address_is_not_an_action(actions):
    """Mail to the reply address without a key tag takes the usual inbound path."""
    a = actions()
    handled = a.handle(reply("x", to=REPLY))
    assert handled.kind == "other"
    assert a.events() == []


EOP = (
    "spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=example.org; dkim=pass (signature "
    "was verified) header.d=example.org;dmarc={dmarc} action=none "
    "header.from=example.org;compauth={compauth} reason=100"
)


@pytest.mark.parametrize(
    ("authentication", "headers", "outcome"),
    [
        ("auto", {"X-MS-Exchange-Organization-AuthAs": "Internal"}, "accepted"),
        ("require", {"X-MS-Exchange-Organization-AuthAs": "Internal"}, "accepted"),
        ("auto", {"Authentication-Results": EOP.format(dmarc="pass", compauth="pass")}, "accepted"),
        ("auto", {"Authentication-Results": EOP.format(dmarc="fail", compauth="pass")}, "accepted"),
        ("auto", {"Authentication-Results": EOP.format(dmarc="fail", compauth="fail")}, "refused"),
        ("auto", {"X-MS-Exchange-Organization-AuthAs": "Anonymous"}, "refused"),
        ("auto", {}, "refused"),
        ("none", {}, "accepted"),
    ],
    ids=[
        "internal", "internal-require", "eop-pass", "eop-compauth", "eop-fail",
        "anonymous", "nothing", "none",
    ],
)  # fmt: skip
def test_a_reply_read_from_an_exchange_mailbox_must_prove_its_sender(
    actions, authentication, headers, outcome
):
    """From a graph source, `auto` requires proof, since the mailbox can show it:
    Exchange's intra-tenant mark, or the topmost EOP Authentication-Results (which
    carries no authserv-id) with DMARC or compauth pass."""
    a = actions(graph=True, authentication=authentication)
    key = a.issue()["ann@example.org"]
    handled = a.handle(reply(key, headers=headers), source="o365", mail_from=None)
    assert handled.outcome == outcome, handled.reason
    if outcome == "refused":
        assert handled.reason == "unauthenticated"


def test_an_accepted_action_reaches_a_real_webhook_receiver(
    actions, redis_client, server_tls
):
    """The engine's webhook gets action.accepted, signed, with the action's data."""
    from tests.support.webhooks import Receiver
    from tests.test_webhooks import SECRET, _drive
    from worker.events.runner import build_deliverers

    rx = Receiver(SECRET, None).start()
    try:
        hook = {"name": "engine", "url": rx.url, "secret": SECRET, "allow_http": True}
        a = actions(webhook=[hook])
        [deliverer] = build_deliverers(a.settings, redis_client, poll=0.05)
        deliverer.store.ensure_group()
        key = a.issue()["ann@example.org"]
        assert a.handle(reply(key)).outcome == "accepted"
        _drive(deliverer, rx.delivered)
        [got] = rx.received
        assert got.verified
        assert got.json["type"] == "action.accepted"
        assert got.json["data"]["action"] == "approve"
        assert got.json["data"]["context"] == {"task": 42}
    finally:
        rx.stop()
