"""Delivery outcomes through a real worker and real SMTP servers (docs/design.md §5)."""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest
import structlog.testing

from common.sockets import free_port
from producers import Notification, Producer
from tests.support.helpers import wait_for, wire_enqueue

NS_QUEUE = "mail"


def _enqueue(redis_client, settings, **fields) -> str:
    fields.setdefault("subject", "Approval needed")
    fields.setdefault("text", "Please approve.")
    producer = Producer(
        redis_client, namespace=settings.namespace, limits=settings.limits
    )
    return producer.enqueue(Notification(**fields))


def _dead_letters(redis_client, namespace) -> int:
    return int(redis_client.zcard(f"{namespace}:dead"))


def _states(record) -> dict[str, str]:
    return {r["address"]: r["state"] for r in record["recipients"]}


@pytest.mark.parametrize("pipelining", [True, False])
def test_partial_refusal_sends_to_the_rest_and_records_the_refused(
    pipelining, smtp_server, make_settings, run_worker, redis_client
):
    """A recipient refused with 5xx is recorded as refused; the others get the message once."""
    server = smtp_server()
    server.recorder.pipelining = pipelining
    server.recorder.rcpt_replies["gone@example.org"] = "550 5.1.1 User unknown"
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    job_id = _enqueue(
        redis_client, app.settings, to=["ok@example.org", "gone@example.org"]
    )
    app.broker.join(NS_QUEUE, timeout=10_000)
    [received] = server.recorder.messages
    assert received.rcpt_tos == ["ok@example.org"]
    record = app.status.get(job_id)
    assert record["state"] == "sent"
    assert _states(record) == {
        "ok@example.org": "accepted",
        "gone@example.org": "refused",
    }
    refused = next(r for r in record["recipients"] if r["state"] == "refused")
    assert refused["code"] == 550 and "User unknown" in refused["message"]
    # Partial at the top level: not a plain success
    assert record["partial"] is True and record["reason"] == "partial"
    assert record["counts"] == {"accepted": 1, "refused": 1, "deferred": 0}
    assert record["error"]["type"] == "recipient_refused"
    assert record["error"]["code"] == 550
    assert record["error"]["message"].startswith("1 of 2 recipient(s) refused: 550")


def test_every_recipient_refused_is_dead_lettered_at_once(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """When every recipient is refused for good the job is dead at once, not retried."""
    server = smtp_server()
    server.recorder.rcpt_replies["gone@example.org"] = "550 5.1.1 User unknown"
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    job_id = _enqueue(redis_client, app.settings, to=["gone@example.org"])
    app.broker.join(NS_QUEUE, timeout=10_000)
    record = app.status.get(job_id)
    assert record["state"] == "dead"
    assert record["reason"] == "permanent"
    assert record["attempts"] == 1
    assert _states(record) == {"gone@example.org": "refused"}
    assert record["partial"] is False
    assert record["counts"] == {"accepted": 0, "refused": 1, "deferred": 0}
    assert server.recorder.messages == []
    assert _dead_letters(redis_client, namespace) == 1


def test_deferred_recipient_is_retried_alone_and_accepted_ones_never_again(
    smtp_server, make_settings, run_worker, redis_client
):
    """A 4xx recipient is retried by the broker; the accepted one is not sent twice."""
    server = smtp_server()
    server.recorder.rcpt_replies["busy@example.org"] = "451 4.3.0 Mailbox busy"
    settings = make_settings(
        smtp=[server.smtp_section()],
        retry={"max_attempts": 2, "min_backoff": "0.2s", "max_backoff": "0.5s"},
    )
    app = run_worker(settings)
    job_id = _enqueue(redis_client, settings, to=["ok@example.org", "busy@example.org"])
    app.broker.join(NS_QUEUE, timeout=20_000)
    assert [m.rcpt_tos for m in server.recorder.messages] == [["ok@example.org"]]
    assert server.recorder.commands.count("RCPT busy@example.org") == 2
    assert server.recorder.commands.count("RCPT ok@example.org") == 1
    record = app.status.get(job_id)
    assert record["state"] == "dead"
    assert record["reason"] == "retries_exhausted"
    assert record["attempts"] == 2
    assert _states(record) == {
        "ok@example.org": "accepted",
        "busy@example.org": "deferred",
    }
    assert [h["event"] for h in record["history"]] == ["retrying", "dead"]
    # Dead, but someone got it: partial at the top level
    assert record["partial"] is True
    assert record["counts"] == {"accepted": 1, "refused": 0, "deferred": 1}


def test_transient_reply_is_retried_in_process(
    smtp_server, make_settings, run_worker, redis_client
):
    """A 451 after DATA is retried at once in the same attempt and then delivered."""
    server = smtp_server()
    server.recorder.data_replies.append("451 4.3.0 Try again")
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    job_id = _enqueue(redis_client, app.settings, to=["ok@example.org"])
    app.broker.join(NS_QUEUE, timeout=10_000)
    assert len(server.recorder.messages) == 1
    record = app.status.get(job_id)
    assert record["state"] == "sent" and record["attempts"] == 1


def test_message_refused_fails_over_to_the_next_connection(
    smtp_server, make_settings, run_worker, redis_client
):
    """A 552 from the first connection hands the same message to the second one."""
    first, second = smtp_server(), smtp_server()
    first.recorder.data_replies.append("552 5.3.4 Message too big")
    settings = make_settings(
        smtp=[first.smtp_section("first"), second.smtp_section("second")]
    )
    app = run_worker(settings)
    job_id = _enqueue(redis_client, settings, to=["ok@example.org"])
    app.broker.join(NS_QUEUE, timeout=10_000)
    assert first.recorder.messages == []
    [received] = second.recorder.messages
    assert message_from_bytes(received.data, policy=policy.default)["Message-ID"] == (
        f"<{job_id}@example.com>"
    )
    record = app.status.get(job_id)
    assert record["state"] == "sent" and record["service"] == "second"
    assert [(s["service"], s["reason"]) for s in record["skipped"]] == [
        ("first", "message_refused")
    ]


def test_unreachable_connection_fails_over_at_once(
    smtp_server, make_settings, run_worker, redis_client
):
    """A connection that refuses TCP is skipped as unavailable and the next one delivers."""
    server = smtp_server()
    dead = {
        "name": "down",
        "from_address": "a@example.com",
        "server": "127.0.0.1",
        "port": free_port(),
        "timeout": "2s",
    }
    settings = make_settings(smtp=[dead, server.smtp_section("up")])
    app = run_worker(settings)
    job_id = _enqueue(redis_client, settings, to=["ok@example.org"])
    app.broker.join(NS_QUEUE, timeout=10_000)
    record = app.status.get(job_id)
    assert record["state"] == "sent" and record["service"] == "up"
    assert record["skipped"][0]["service"] == "down"
    assert record["skipped"][0]["reason"] == "unavailable"
    assert "cannot connect" in record["skipped"][0]["message"]


def test_all_services_down_retries_then_dead_letters(
    make_settings, run_worker, redis_client, namespace
):
    """With every service unavailable the broker retries up to max_attempts, then dead-letters."""
    down = {
        "name": "down",
        "from_address": "a@example.com",
        "server": "127.0.0.1",
        "port": free_port(),
        "timeout": "2s",
    }
    settings = make_settings(
        smtp=[down],
        retry={"max_attempts": 2, "min_backoff": "0.2s", "max_backoff": "0.5s"},
    )
    app = run_worker(settings)
    job_id = _enqueue(redis_client, settings, to=["ok@example.org"])
    app.broker.join(NS_QUEUE, timeout=20_000)
    record = app.status.get(job_id)
    assert record["state"] == "dead"
    assert record["reason"] == "retries_exhausted"
    assert record["attempts"] == 2
    assert record["error"]["type"] == "unavailable"
    assert record["error"]["service"] == "down"
    assert [h["event"] for h in record["history"]] == ["retrying", "dead"]
    assert _dead_letters(redis_client, namespace) == 1


def test_jobs_that_fail_together_retry_spread_out(
    smtp_server, make_settings, run_worker, redis_client
):
    """The first broker retry is jittered too (it was always exactly min_backoff, so
    jobs that failed in one outage all came back in the same instant)."""
    server = smtp_server()
    server.recorder.data_replies = ["451 4.3.0 try again later"] * 12
    settings = make_settings(
        smtp=[server.smtp_section()],
        breaker={"failures": 100},
        retry={"min_backoff": "10s", "max_backoff": "1h", "transport_retries": 0},
    )
    app = run_worker(settings)
    with structlog.testing.capture_logs() as logs:
        ids = [
            _enqueue(redis_client, settings, to=[f"u{i}@example.org"])
            for i in range(12)
        ]
        wait_for(lambda: all(app.status.get(i)["state"] == "retrying" for i in ids))
    delays = [e["delay_s"] for e in logs if e["event"] == "job_retry_scheduled"]
    assert len(delays) == 12
    assert all(10.0 <= d <= 15.0 for d in delays)
    assert len(set(delays)) > 1


def test_starttls_required_never_sends_in_plaintext(
    smtp_server, make_settings, run_worker, redis_client
):
    """security = starttls against a server without STARTTLS fails closed: no MAIL is sent."""
    server = smtp_server("plain")
    section = server.smtp_section(security="starttls")
    settings = make_settings(smtp=[section], retry={"max_attempts": 1})
    app = run_worker(settings)
    job_id = _enqueue(redis_client, settings, to=["ok@example.org"])
    app.broker.join(NS_QUEUE, timeout=10_000)
    assert server.recorder.commands == []
    record = app.status.get(job_id)
    assert record["state"] == "dead"
    assert "STARTTLS" in record["error"]["message"]


def test_untrusted_certificate_is_refused(
    smtp_server, make_settings, run_worker, redis_client
):
    """Certificates are verified by default: a server signed by an unknown CA is unavailable."""
    server = smtp_server("tls")
    settings = make_settings(smtp=[server.smtp_section()], retry={"max_attempts": 1})
    app = run_worker(settings)
    job_id = _enqueue(redis_client, settings, to=["ok@example.org"])
    app.broker.join(NS_QUEUE, timeout=10_000)
    assert server.recorder.messages == []
    record = app.status.get(job_id)
    assert record["error"]["type"] == "unavailable"
    assert "certificate" in record["error"]["message"]


def test_verification_opt_out_is_per_connection(
    smtp_server, make_settings, run_worker, redis_client
):
    """verify_certificates = false on a connection lets it use a self-signed server."""
    server = smtp_server("tls")
    settings = make_settings(smtp=[server.smtp_section(verify_certificates=False)])
    app = run_worker(settings)
    _enqueue(redis_client, settings, to=["ok@example.org"])
    app.broker.join(NS_QUEUE, timeout=10_000)
    assert len(server.recorder.messages) == 1


def test_wrong_password_is_unavailable(
    smtp_server, make_settings, run_worker, redis_client, ca_file
):
    """AUTH 535 marks the connection unavailable; the password never reaches the record;
    one error-level line says the service cannot authenticate, however many jobs fail."""
    server = smtp_server("starttls", auth=True)
    section = server.smtp_section(ca_bundle=str(ca_file), password="wrong-password-123")
    settings = make_settings(smtp=[section], retry={"max_attempts": 1})
    app = run_worker(settings)
    with structlog.testing.capture_logs() as logs:
        job_id = _enqueue(redis_client, settings, to=["ok@example.org"])
        _enqueue(redis_client, settings, to=["other@example.org"])
        app.broker.join(NS_QUEUE, timeout=10_000)
    said = [e for e in logs if e["event"] == "service_cannot_authenticate"]
    assert [(e["service"], e["log_level"], e["code"]) for e in said] == [
        ("primary", "error", 535)
    ]
    assert "wrong-password-123" not in str(logs)
    record = app.status.get(job_id)
    assert record["error"]["type"] == "unavailable"
    assert record["error"]["code"] == 535
    assert "wrong-password-123" not in str(record)


def test_sessions_are_reused_across_messages(
    smtp_server, make_settings, run_worker, redis_client
):
    """Many jobs travel over at most one SMTP session per worker thread."""
    server = smtp_server()
    settings = make_settings(smtp=[server.smtp_section()])
    app = run_worker(settings, threads=2)
    producer = Producer(redis_client, namespace=settings.namespace)
    producer.enqueue_many(
        Notification(to=[f"user{i}@example.org"], subject=f"n{i}", text="x")
        for i in range(30)
    )
    app.broker.join(NS_QUEUE, timeout=20_000)
    assert len(server.recorder.messages) == 30
    assert 1 <= server.recorder.ehlos <= 2


def test_malformed_job_on_the_queue_is_dead_lettered_and_the_worker_goes_on(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A wire-format job with a bad address is dead as `validation`; the next job is delivered."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    bad = wire_enqueue(
        redis_client, namespace, {"to": ["not-an-address"], "subject": "s", "text": "t"}
    )
    odd = wire_enqueue(redis_client, namespace, None, kwargs={"job": {}, "surprise": 1})
    good = wire_enqueue(
        redis_client, namespace, {"to": ["ok@example.org"], "subject": "s", "text": "t"}
    )
    app.broker.join(NS_QUEUE, timeout=10_000)
    bad_record, odd_record = app.status.get(bad), app.status.get(odd)
    assert bad_record["state"] == "dead" and bad_record["reason"] == "validation"
    assert bad_record["error"]["field"] == "to[0].address"
    assert odd_record["state"] == "dead" and odd_record["error"]["field"] == "kwargs"
    assert app.status.get(good)["state"] == "sent"
    assert len(server.recorder.messages) == 1


def test_expired_job_is_not_sent(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A job whose not_after has passed is dead-lettered as `expired` and never sent."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    job = {
        "to": ["ok@example.org"],
        "subject": "s",
        "text": "t",
        "not_after": "2020-01-01T00:00:00Z",
    }
    job_id = wire_enqueue(redis_client, namespace, job)
    app.broker.join(NS_QUEUE, timeout=10_000)
    assert app.status.get(job_id)["reason"] == "expired"
    assert server.recorder.messages == []


def test_pinned_sender_naming_no_service_is_a_validation_error(
    smtp_server, make_settings, run_worker, redis_client
):
    """A `sender` that names no enabled service is dead as `validation`, naming `sender`."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    job_id = _enqueue(
        redis_client, app.settings, to=["ok@example.org"], sender="nosuch"
    )
    app.broker.join(NS_QUEUE, timeout=10_000)
    record = app.status.get(job_id)
    assert record["reason"] == "validation" and record["error"]["field"] == "sender"


def test_redirect_all_to_sends_only_to_the_staging_address(
    smtp_server, make_settings, run_worker, redis_client
):
    """With redirect_all_to set, every message goes only there and names the original recipients."""
    server = smtp_server()
    settings = make_settings(
        smtp=[server.smtp_section()], redirect_all_to="staging@example.net"
    )
    app = run_worker(settings)
    _enqueue(redis_client, settings, to=["ann@example.org"], bcc=["boss@example.org"])
    app.broker.join(NS_QUEUE, timeout=10_000)
    [received] = server.recorder.messages
    assert received.rcpt_tos == ["staging@example.net"]
    msg = message_from_bytes(received.data, policy=policy.default)
    assert msg["X-Mailworker-Redirected-From"] == "ann@example.org, boss@example.org"


def test_priorities_have_their_own_queues(
    smtp_server, make_settings, run_worker, redis_client
):
    """high, normal and bulk notifications are each taken from their own queue and delivered."""
    server = smtp_server()
    settings = make_settings(smtp=[server.smtp_section()])
    app = run_worker(settings)
    for priority in ("high", "normal", "bulk"):
        _enqueue(
            redis_client, settings, to=[f"{priority}@example.org"], priority=priority
        )
    for queue in ("mail-high", "mail", "mail-bulk"):
        app.broker.join(queue, timeout=10_000)
    assert sorted(m.rcpt_tos[0] for m in server.recorder.messages) == [
        "bulk@example.org",
        "high@example.org",
        "normal@example.org",
    ]
