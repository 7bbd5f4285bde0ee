"""E-mail actions end to end on loopback: sent through aiosmtpd, answered through the
real SMTP receiver as a mail client would, read back from the events stream."""

from __future__ import annotations

import smtplib
from email import policy
from email.parser import BytesParser
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
import pytest
import redis

from common.sockets import free_port
from producers import Notification, Producer
from tests.support.env import HOST, REDIS_URL
from tests.support.helpers import wait_for
from tests.support.replies import reply
from tests.test_cli import mailworker
from worker.inbound.receiver import SmtpReceiver
from worker.inbound.runner import build_inbound

REPLY = "actions@workflow.example.com"


@pytest.fixture
def system(smtp_server, make_settings, run_worker, redis_client):
    """The worker sending through aiosmtpd, and the real receiver for replies."""
    server = smtp_server()
    port = free_port()
    settings = make_settings(
        smtp=[server.smtp_section()],
        inbound=[
            {
                "name": "forwarded",
                "kind": "smtp",
                "listen": f"{HOST}:{port}",
                "accept": [REPLY],
            }
        ],
        email_actions={"enabled": True, "reply_address": REPLY},
    )
    app = run_worker(settings)
    rx = SmtpReceiver(
        settings.inbound[0],
        sink=build_inbound(settings, redis.Redis.from_url(REDIS_URL)),
    )
    rx.start()
    yield settings, app, server, port
    rx.stop()


def _button(raw: bytes, action: str) -> tuple[str, str]:
    """The address and subject of the mailto a recipient's client opens for ``action``."""
    message = BytesParser(policy=policy.default).parsebytes(raw)
    text = message.get_body(("plain",)).get_content()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("<mailto:"):
            url = urlsplit(line.strip("<>"))
            [subject] = parse_qs(url.query)["subject"]
            if subject.startswith(f"{action}:"):
                return unquote(url.path), subject
    raise AssertionError(f"no {action} line")


def test_a_reply_through_the_receiver_reaches_the_engine_as_action_accepted(
    system, redis_client, namespace
):
    """Given a notification with actions to Ann and Cy, when Cy answers with Ann's key
    and Ann answers "approve" through the mail server's forwarding, then the engine
    reads one action.refused (sender_mismatch) and one action.accepted (Ann's)."""
    settings, app, server, port = system
    producer = Producer.from_settings(settings)
    job_id = producer.enqueue(
        Notification(
            to=["ann@example.org"],
            cc=["cy@example.org"],
            subject="Approve invoice 42",
            text="Invoice 42 waits for your approval.",
            actions=[{"id": "approve", "label": "Approve"}],
            action_context={"task": 42},
        )
    )
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    by_recipient = {m.rcpt_tos[0]: m.data for m in server.recorder.messages}
    address, subject = _button(by_recipient["ann@example.org"], "approve")
    key = address.split("+", 1)[1].split("@", 1)[0]
    # When: Cy, who got Ann's mail forwarded, replies to it; then Ann's client replies.
    with smtplib.SMTP(HOST, port, timeout=10) as client:
        client.sendmail(
            "cy@example.org", [address], reply(key, sender="cy@example.org")
        )
        client.sendmail(
            "ann@example.org",
            [address],
            reply(key, subject=f"Re: {subject}", text="Paid today."),
        )
    # Then
    events = producer.read_events("engine", "e1", count=10)
    by_type = {e["type"]: e for e in events if e["type"].startswith("action.")}
    accepted = by_type["action.accepted"]
    assert accepted["job_id"] == job_id
    assert accepted["data"]["action"] == "approve"
    assert accepted["data"]["actor"] == "ann@example.org"
    assert accepted["data"]["comment"] == "Paid today."
    assert accepted["data"]["context"] == {"task": 42}
    assert accepted["data"]["via"] == "forwarded"
    assert by_type["action.refused"]["data"]["reason"] == "sender_mismatch"


def test_status_and_inspect_show_the_action_per_recipient(
    system, redis_client, namespace, tmp_path
):
    """`mailworker status` shows per recipient whether an action came (no key), and
    `mailworker inbound inspect` names key, action, actor and verdict of a reply."""
    settings, app, server, port = system
    producer = Producer.from_settings(settings)
    job_id = producer.enqueue(
        Notification(
            to=["ann@example.org"],
            cc=["cy@example.org"],
            subject="Approve invoice 42",
            text="Invoice 42 waits.",
            actions=[{"id": "approve", "label": "Approve"}],
        )
    )
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    by_recipient = {m.rcpt_tos[0]: m.data for m in server.recorder.messages}
    address, subject = _button(by_recipient["ann@example.org"], "approve")
    key = address.split("+", 1)[1].split("@", 1)[0]
    raw = reply(key, subject=f"Re: {subject}")
    (tmp_path / "reply.eml").write_bytes(raw)
    config = tmp_path / "mailworker.toml"
    inspected = mailworker("inbound", "inspect", "reply.eml", config=config)
    assert inspected.returncode == 0, inspected.stderr
    lines = dict(line.split(":", 1) for line in inspected.stdout.splitlines())
    assert {k: v.strip() for k, v in lines.items()}.items() >= {
        "kind": "action",
        "outcome": "accepted",
        "key": key,
        "action": "approve",
        "actor": "ann@example.org",
        "job": job_id,
    }.items()
    with smtplib.SMTP(HOST, port, timeout=10) as client:
        client.sendmail("ann@example.org", [address], raw)
    shown = mailworker("status", job_id, "--json", config=config)
    assert shown.returncode == 0, shown.stderr
    record = orjson.loads(shown.stdout)
    by_address = {a["address"]: a for a in record["actions"]}
    assert by_address["ann@example.org"]["state"] == "used"
    assert by_address["ann@example.org"]["action"] == "approve"
    assert by_address["ann@example.org"]["actor"] == "ann@example.org"
    assert by_address["cy@example.org"]["state"] == "open"
    assert key not in shown.stdout
    human = mailworker("status", job_id, config=config)
    assert "approve by ann@example.org" in human.stdout
    closed = mailworker("actions", "close", job_id, config=config)
    assert closed.returncode == 0
    assert "closed 1 of 2 keys" in closed.stdout
