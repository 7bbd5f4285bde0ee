"""Notifications with actions (DESIGN §10): a message and a key of its own per recipient."""

from __future__ import annotations

import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
import structlog

from common.keys import action_key, actions_key
from producers import Notification, Producer
from tests.support.helpers import wait_for, wire_enqueue
from worker.actions.keys import KEY, new_key

REPLY = "actions@workflow.example.com"
RECEIVER = {"name": "replies", "kind": "smtp", "accept": [REPLY]}
ACTIONS = [
    {"id": "approve", "label": "Approve"},
    {"id": "reject", "label": "Reject & close", "comment": "required"},
]
ADDRESS = re.compile(r"^actions\+([a-z2-7]{26})@workflow\.example\.com$")


def _settings(make_settings, server, **actions):
    return make_settings(
        smtp=[server.smtp_section()],
        inbound=[RECEIVER],
        email_actions={"enabled": True, "reply_address": REPLY, **actions},
    )


def _job(**fields) -> Notification:
    fields.setdefault("to", ["Ann <ann@example.org>"])
    fields.setdefault("cc", ["cy@example.org"])
    fields.setdefault("bcc", ["bo@example.org"])
    fields.setdefault("subject", "Approve invoice 42 – Müller GmbH")
    fields.setdefault("text", "Invoice 42 waits for your approval.\n")
    fields.setdefault(
        "html", "<html><body><p>Invoice <b>42</b> waits.</p></body></html>"
    )
    fields.setdefault("actions", ACTIONS)
    fields.setdefault("action_context", {"task": 42})
    return Notification(**fields)


class _Links(HTMLParser):
    """The links of an html part, with their text; and whether it has a script."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.scripts = 0
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None and data.strip():
            self.links.append((self._href, data.strip()))
            self._href = None


def _parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def _mailto(href: str) -> tuple[str, str]:
    url = urlsplit(href)
    assert url.scheme == "mailto"
    [subject] = parse_qs(url.query)["subject"]
    return unquote(url.path), subject


def test_each_recipient_gets_its_own_message_and_key(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """To, cc and bcc each get a message of their own: envelope, Reply-To and key."""
    server = smtp_server()
    app = run_worker(_settings(make_settings, server))
    producer = Producer(redis_client, namespace=namespace, email_actions=True)
    with structlog.testing.capture_logs() as logs:
        job_id = producer.enqueue(_job())
        wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    received = server.recorder.messages
    assert sorted(m.rcpt_tos[0] for m in received) == [
        "ann@example.org", "bo@example.org", "cy@example.org",
    ]  # fmt: skip
    assert all(len(m.rcpt_tos) == 1 for m in received)
    keys = {}
    for item in received:
        message = _parse(item.data)
        [reply_to] = message["Reply-To"].addresses
        key = ADDRESS.match(reply_to.addr_spec).group(1)
        assert KEY.match(key)
        keys[item.rcpt_tos[0]] = key
        assert message["To"] == "Ann <ann@example.org>"
        assert message["Cc"] == "cy@example.org"
        assert message["Bcc"] is None
        assert message["Message-ID"].startswith(f"<{job_id}@")
    assert len(set(keys.values())) == 3
    assert {
        k.decode(): v.decode()
        for k, v in redis_client.hgetall(actions_key(namespace, job_id)).items()
    } == keys
    for recipient, key in keys.items():
        record = {
            k.decode(): v.decode()
            for k, v in redis_client.hgetall(action_key(namespace, key)).items()
        }
        assert record["job_id"] == job_id
        assert record["recipient"] == recipient
        assert record["state"] == "open"
        assert [a["id"] for a in orjson.loads(record["actions"])] == [
            "approve",
            "reject",
        ]
        assert orjson.loads(record["context"]) == {"task": 42}
        ttl = redis_client.ttl(action_key(namespace, key))
        assert 14 * 86400 < ttl <= 21 * 86400
    recipients = app.status.get(job_id)["recipients"]
    assert {r["address"]: r["state"] for r in recipients} == dict.fromkeys(
        keys, "accepted"
    )
    text = repr(logs)
    assert not any(key in text for key in keys.values())


def test_the_html_part_has_a_mailto_button_per_action_and_no_script(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """Each button is a mailto to the recipient's key with the action in the subject."""
    server = smtp_server()
    app = run_worker(_settings(make_settings, server))
    producer = Producer(redis_client, namespace=namespace, email_actions=True)
    job_id = producer.enqueue(_job(cc=[], bcc=[]))
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    [item] = server.recorder.messages
    message = _parse(item.data)
    address = message["Reply-To"].addresses[0].addr_spec
    html_part = message.get_body(("html",))
    parser = _Links()
    parser.feed(html_part.get_content())
    assert parser.scripts == 0
    assert "<p>Invoice <b>42</b> waits.</p>" in html_part.get_content()
    assert html_part.get_content().rstrip().endswith("</body></html>")
    buttons = [(_mailto(href), label) for href, label in parser.links]
    assert buttons == [
        ((address, "approve: Approve invoice 42 – Müller GmbH"), "Approve"),
        ((address, "reject: Approve invoice 42 – Müller GmbH"), "Reject & close"),
    ]
    assert all(len(href) < 1000 for href, _ in parser.links)
    text = message.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert text.startswith("Invoice 42 waits for your approval.\n")
    mailtos = re.findall(r"<(mailto:[^>]+)>", text)
    assert [_mailto(m) for m in mailtos] == [b[0] for b in buttons]
    assert "reject: Reject & close (write a comment)" in text


def test_a_text_only_job_gets_lines_and_no_html_part(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A notification without html stays text-only, with a line per action."""
    server = smtp_server()
    app = run_worker(_settings(make_settings, server))
    producer = Producer(redis_client, namespace=namespace, email_actions=True)
    job_id = producer.enqueue(_job(cc=[], bcc=[], html=None))
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    message = _parse(server.recorder.messages[0].data)
    assert message.get_content_type() == "text/plain"
    assert message.get_content().count("mailto:actions+") == 2


def test_a_retry_sends_the_same_key_to_a_recipient_deferred_before(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A recipient deferred (4xx) gets the key it was issued on the first attempt."""
    server = smtp_server()
    server.recorder.rcpt_replies["cy@example.org"] = "451 4.3.0 try later"
    settings = _settings(make_settings, server)
    app = run_worker(settings)
    producer = Producer(redis_client, namespace=namespace, email_actions=True)
    job_id = producer.enqueue(_job(bcc=[]))
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "retrying")
    record = app.status.get(job_id)
    states = {r["address"]: r["state"] for r in record["recipients"]}
    assert states == {"ann@example.org": "accepted", "cy@example.org": "deferred"}
    issued = redis_client.hget(actions_key(namespace, job_id), "cy@example.org")
    del server.recorder.rcpt_replies["cy@example.org"]
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent", timeout=30)
    last = _parse(server.recorder.messages[-1].data)
    assert server.recorder.messages[-1].rcpt_tos == ["cy@example.org"]
    assert issued.decode() in last["Reply-To"]
    assert len(server.recorder.messages) == 2


def test_a_refused_recipient_is_refused_and_the_others_sent(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A 550 for one recipient's message refuses that one only; the job is sent."""
    server = smtp_server()
    server.recorder.rcpt_replies["cy@example.org"] = "550 5.1.1 no such user"
    app = run_worker(_settings(make_settings, server))
    producer = Producer(redis_client, namespace=namespace, email_actions=True)
    job_id = producer.enqueue(_job())
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    record = app.status.get(job_id)
    states = {r["address"]: r["state"] for r in record["recipients"]}
    assert states == {
        "ann@example.org": "accepted",
        "cy@example.org": "refused",
        "bo@example.org": "accepted",
    }
    assert record["reason"] == "partial"


def test_a_bulk_enqueue_with_actions_splits_each_job(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """Jobs with actions in a bulk message are each sent one message per recipient."""
    server = smtp_server()
    app = run_worker(_settings(make_settings, server))
    producer = Producer(redis_client, namespace=namespace, email_actions=True)
    ids = producer.enqueue_many([_job(bcc=[]), _job(actions=[], action_context={})])
    wait_for(lambda: all(app.status.get(i)["state"] == "sent" for i in ids))
    envelopes = sorted(tuple(sorted(m.rcpt_tos)) for m in server.recorder.messages)
    assert envelopes == [
        ("ann@example.org",),
        ("ann@example.org", "bo@example.org", "cy@example.org"),
        ("cy@example.org",),
    ]


def test_a_wire_job_with_actions_on_a_worker_without_them_is_dead(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A wire-format job with actions, on a worker with [email_actions] off, is dead
    as `validation` naming `actions`, and nothing is sent."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    job = _job().to_wire()
    job_id = wire_enqueue(redis_client, namespace, job)
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "dead")
    record = app.status.get(job_id)
    assert record["reason"] == "validation"
    assert record["error"]["field"] == "actions"
    assert server.recorder.messages == []


def test_keys_are_26_lowercase_base32_characters_and_differ():
    """new_key gives 128 random bits as 26 base32 characters, never the same twice."""
    keys = {new_key() for _ in range(1000)}
    assert len(keys) == 1000
    assert all(KEY.match(k) for k in keys)
