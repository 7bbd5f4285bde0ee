"""OpenAuth (Office 365 service account) delivery through the real MSAL and requests code,
against a stand-in identity provider and Graph on loopback, with SMTP as the failover."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from email import message_from_bytes, policy

import pytest
import structlog
import structlog.testing

from producers import Notification, Producer
from tests.support.smtp import Recorder

IDENTITY = "notifications@contoso.com"


def _openauth(fake, ca_file, **overrides):
    section = {
        "name": "o365",
        "client_type": "office365",
        "service": "graph-mailer",
        "service_identity": IDENTITY,
        "messages_per_minute": 0,
        "recipients_per_day": 0,
        "timeout": "5s",
    }
    section.update(overrides)
    return section


def _integrated(fake, ca_file, **overrides):
    svc = {
        "account_type": "service",
        "tenant_id": fake.tenant,
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "authority_host": fake.url,
        "graph_endpoint": fake.url,
        "ca_bundle": str(ca_file),
    }
    svc.update(overrides)
    return {"graph-mailer": {k: v for k, v in svc.items() if v is not None}}


@pytest.fixture
def o365(make_settings, fake_microsoft, ca_file):
    """Settings with the stand-in as an OpenAuth service, before the given SMTP servers."""

    def make(*, smtp=(), oa=None, svc=None, **extra):
        return make_settings(
            openauth=[_openauth(fake_microsoft, ca_file, **(oa or {}))],
            integrated_services=_integrated(fake_microsoft, ca_file, **(svc or {})),
            smtp=[s.smtp_section(f"smtp{i}") for i, s in enumerate(smtp)],
            **extra,
        )

    return make


def _send(redis_client, settings, count=1, **fields):
    fields.setdefault("to", ["ann@example.org"])
    fields.setdefault("subject", "Approval needed")
    fields.setdefault("text", "Please approve.")
    producer = Producer(
        redis_client, namespace=settings.namespace, limits=settings.limits
    )
    # One broker message per job: these tests are about concurrency across jobs.
    return producer.enqueue_many(
        (Notification(**fields) for _ in range(count)), bulk=False
    )


def test_one_token_serves_many_messages_sent_as_json(
    o365, fake_microsoft, run_worker, redis_client
):
    """Twenty notifications cost one token request; each is JSON without Sent Items."""
    settings = o365()
    app = run_worker(settings, threads=4)
    ids = _send(redis_client, settings, count=20)
    app.broker.join("mail", timeout=20_000)
    assert len(fake_microsoft.sent) == 20
    assert len(fake_microsoft.token_requests) == 1
    assert fake_microsoft.token_requests[0]["scope"] == f"{fake_microsoft.url}/.default"
    first = fake_microsoft.sent[0]
    assert first["mailbox"] == IDENTITY
    assert first["json"]["saveToSentItems"] is False
    headers = {
        h["name"]: h["value"]
        for h in first["json"]["message"]["internetMessageHeaders"]
    }
    assert headers["x-mailworker-job-id"] in ids
    record = app.status.get(ids[0])
    assert record["state"] == "sent" and record["service"] == "o365"


def test_expired_token_is_renewed(o365, fake_microsoft, run_worker, redis_client):
    """A token about to expire is not reused: the next message gets a new one."""
    fake_microsoft.expires_in = 1  # MSAL treats tokens with < 5 min left as expired
    settings = o365()
    app = run_worker(settings, threads=1)
    _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert len(fake_microsoft.sent) == 2
    assert len(fake_microsoft.token_requests) == 2
    assert (
        fake_microsoft.sent[0]["authorization_token"]
        != fake_microsoft.sent[1]["authorization_token"]
    )


def test_401_drops_the_token_and_reacquires_once(
    o365, fake_microsoft, run_worker, redis_client
):
    """A revoked token gets one 401, one new token, and the message goes through Graph."""
    settings = o365()
    app = run_worker(settings, threads=1)
    _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    fake_microsoft.revoke_all_tokens()
    [job_id] = _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert len(fake_microsoft.sent) == 2
    assert len(fake_microsoft.token_requests) == 2
    assert fake_microsoft.requests_seen == 3
    assert app.status.get(job_id)["service"] == "o365"


def test_429_with_retry_after_is_waited_out(
    o365, fake_microsoft, run_worker, redis_client
):
    """A 429 with a short Retry-After is retried in-process after that wait."""
    fake_microsoft.graph_responses.append(
        (
            429,
            {"Retry-After": "1"},
            {"error": {"code": "ApplicationThrottled", "message": "slow"}},
        )
    )
    settings = o365()
    app = run_worker(settings)
    started = time.monotonic()
    [job_id] = _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert time.monotonic() - started >= 1.0
    assert len(fake_microsoft.sent) == 1 and fake_microsoft.requests_seen == 2
    assert app.status.get(job_id)["attempts"] == 1


def test_long_retry_after_becomes_a_broker_retry_no_sooner(
    o365, fake_microsoft, run_worker, redis_client
):
    """A Retry-After beyond max_in_process_wait schedules a broker retry no sooner than it."""
    fake_microsoft.graph_responses.append(
        (429, {"Retry-After": "600"}, {"error": {"code": "x"}})
    )
    settings = o365(
        retry={"max_in_process_wait": "1s", "min_backoff": "1s", "max_backoff": "2s"}
    )
    app = run_worker(settings)
    [job_id] = _send(redis_client, settings)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        record = app.status.get(job_id)
        if record["state"] == "retrying":
            break
        time.sleep(0.05)
    assert record["state"] == "retrying"
    next_at = datetime.fromisoformat(record["next_attempt_at"])
    assert (next_at - datetime.now(UTC)).total_seconds() > 500
    assert fake_microsoft.requests_seen == 1


def test_503_then_success(o365, fake_microsoft, run_worker, redis_client):
    """A 503 is transient: the next try in the same attempt succeeds."""
    fake_microsoft.graph_responses.append(
        (503, {}, {"error": {"code": "serviceNotAvailable"}})
    )
    settings = o365()
    app = run_worker(settings)
    [job_id] = _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert len(fake_microsoft.sent) == 1
    assert app.status.get(job_id)["service"] == "o365"


def test_invalid_secret_fails_over_to_smtp_at_once(
    o365, fake_microsoft, smtp_server, run_worker, redis_client
):
    """A wrong client secret makes OpenAuth unavailable; SMTP delivers without Graph calls."""
    server = smtp_server()
    settings = o365(smtp=[server], svc={"client_secret": "not-the-secret"})
    app = run_worker(settings)
    [job_id] = _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert fake_microsoft.requests_seen == 0
    assert len(server.recorder.messages) == 1
    record = app.status.get(job_id)
    assert record["service"] == "smtp0"
    [skip] = record["skipped"]
    assert skip["service"] == "o365" and skip["reason"] == "unavailable"
    assert "invalid_client" in skip["message"]
    assert "not-the-secret" not in json.dumps(record)


def test_graph_down_fails_over_after_bounded_retries(
    o365, fake_microsoft, smtp_server, run_worker, redis_client
):
    """A Graph that keeps answering 503 is tried 1 + transport_retries times, then SMTP."""
    for _ in range(3):
        fake_microsoft.graph_responses.append(
            (503, {}, {"error": {"code": "serviceNotAvailable"}})
        )
    server = smtp_server()
    settings = o365(smtp=[server])
    app = run_worker(settings)
    [job_id] = _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert fake_microsoft.requests_seen == 3
    assert len(server.recorder.messages) == 1
    record = app.status.get(job_id)
    assert record["service"] == "smtp0"
    assert record["skipped"][0]["reason"] == "transient"


def test_same_content_through_graph_json_and_after_failover_through_smtp(
    o365, fake_microsoft, smtp_server, run_worker, redis_client
):
    """Attachments and html+text reach Graph as JSON and, after failover, SMTP as MIME."""
    server = smtp_server()
    settings = o365(smtp=[server])
    app = run_worker(settings)
    content = {
        "to": ["Ann <ann@example.org>"],
        "cc": ["cc@example.org"],
        "reply_to": ["desk@example.org"],
        "subject": "Invoice 7",
        "text": "See the attachment.",
        "html": "<p>See the <b>attachment</b>.</p>",
        "attachments": [
            {
                "filename": "inv.pdf",
                "content_type": "application/pdf",
                "content": b"%PDF\x00\xff",
            }
        ],
    }
    _send(redis_client, settings, **content)
    app.broker.join("mail", timeout=10_000)
    message = fake_microsoft.sent[0]["json"]["message"]
    assert message["subject"] == "Invoice 7"
    assert message["body"] == {
        "contentType": "HTML",
        "content": "<p>See the <b>attachment</b>.</p>",
    }
    assert message["toRecipients"] == [
        {"emailAddress": {"address": "ann@example.org", "name": "Ann"}}
    ]
    assert message["ccRecipients"] == [{"emailAddress": {"address": "cc@example.org"}}]
    assert message["replyTo"] == [{"emailAddress": {"address": "desk@example.org"}}]
    [attachment] = message["attachments"]
    assert (
        attachment["name"] == "inv.pdf"
        and base64.b64decode(attachment["contentBytes"]) == b"%PDF\x00\xff"
    )
    # Then Graph fails for good and the same notification goes through SMTP
    fake_microsoft.graph_responses.append(
        (400, {}, {"error": {"code": "ErrorMessageSizeExceeded"}})
    )
    [job_id] = _send(redis_client, settings, **content)
    app.broker.join("mail", timeout=10_000)
    [received] = server.recorder.messages
    msg = message_from_bytes(received.data, policy=policy.default)
    assert msg["Subject"] == "Invoice 7" and msg["Reply-To"] == "desk@example.org"
    assert msg["Message-ID"] == f"<{job_id}@example.com>"
    assert msg.get_body(("plain",)).get_content().strip() == "See the attachment."
    assert [a.get_content() for a in msg.iter_attachments()] == [b"%PDF\x00\xff"]
    assert app.status.get(job_id)["skipped"][0]["reason"] == "message_refused"


def test_non_x_headers_go_as_mime(o365, fake_microsoft, run_worker, redis_client):
    """A header JSON cannot carry sends the whole message as base64 MIME."""
    settings = o365()
    app = run_worker(settings)
    [job_id] = _send(
        redis_client,
        settings,
        bcc=["hidden@example.org"],
        headers={"List-Unsubscribe": "<mailto:unsubscribe@example.org>"},
    )
    app.broker.join("mail", timeout=10_000)
    [sent] = fake_microsoft.sent
    assert sent["content_type"].startswith("text/plain") and sent["json"] is None
    msg = message_from_bytes(sent["mime"], policy=policy.default)
    assert msg["List-Unsubscribe"] == "<mailto:unsubscribe@example.org>"
    assert msg["Message-ID"] == f"<{job_id}@contoso.com>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Bcc"] == "hidden@example.org"  # Graph takes recipients from the headers


def test_certificate_credential(
    o365, fake_microsoft, run_worker, redis_client, tmp_path
):
    """A private key and public certificate (MSAL's SHA-256 form) authenticate the app."""
    from tests.support.certificates import self_signed

    key_pem, cert_pem = self_signed()
    (tmp_path / "key.pem").write_text(key_pem)
    (tmp_path / "cert.pem").write_text(cert_pem)
    fake_microsoft.accept_certificate(cert_pem)
    settings = o365(
        svc={
            "client_secret": None,
            "certificate_file": str(tmp_path / "cert.pem"),
            "private_key_file": str(tmp_path / "key.pem"),
        }
    )
    app = run_worker(settings)
    _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert len(fake_microsoft.sent) == 1
    [assertion] = fake_microsoft.client_assertions
    assert assertion["header"]["alg"] == "PS256"


def test_budget_spent_by_two_workers_overflows_to_smtp(
    o365, fake_microsoft, smtp_server, run_worker, redis_client
):
    """messages_per_minute is shared: two workers together send 5 through Graph, the rest SMTP."""
    server = smtp_server()
    settings = o365(smtp=[server], oa={"messages_per_minute": 5})
    first, second = run_worker(settings), run_worker(settings)
    ids = _send(redis_client, settings, count=12)
    first.broker.join("mail", timeout=20_000)
    second.broker.join("mail", timeout=20_000)
    assert len(fake_microsoft.sent) == 5
    assert len(server.recorder.messages) == 7
    budget_skips = [first.status.get(i)["skipped"] for i in ids]
    assert sum(1 for s in budget_skips if s and s[0]["reason"] == "budget") == 7


def test_budget_wait_is_not_an_attempt(o365, fake_microsoft, run_worker, redis_client):
    """With overflow = "wait" a spent budget puts the job back without counting an attempt."""
    settings = o365(oa={"messages_per_minute": 1, "overflow": "wait"})
    app = run_worker(settings)
    ids = _send(redis_client, settings, count=2)
    time.sleep(1.0)
    records = [app.status.get(i) for i in ids]
    waiting = [r for r in records if r["state"] == "retrying"]
    assert len(fake_microsoft.sent) == 1 and len(waiting) == 1
    assert waiting[0]["reason"] == "budget" and waiting[0]["attempts"] == 1
    next_at = datetime.fromisoformat(waiting[0]["next_attempt_at"])
    assert 30 < (next_at - datetime.now(UTC)).total_seconds() <= 61
    assert [h["event"] for h in waiting[0]["history"]] == ["waiting"]


def test_breaker_opens_skips_probes_and_closes(
    o365, fake_microsoft, smtp_server, run_worker, redis_client
):
    """After `failures` failures Graph is skipped; after the cool-down one probe closes it.
    Opening and closing each write one line."""
    server = smtp_server()
    settings = o365(
        smtp=[server],
        breaker={"failures": 2, "cooldown": "1s"},
        retry={"transport_retries": 0, "min_backoff": "1s", "max_backoff": "2s"},
    )
    app = run_worker(settings, threads=1)
    with structlog.testing.capture_logs() as logs:
        _breaker_opens_and_closes(app, fake_microsoft, server, redis_client, settings)
    opened = [e for e in logs if e["event"] == "breaker_opened"]
    closed = [e for e in logs if e["event"] == "breaker_closed"]
    assert [(e["service"], e["log_level"]) for e in opened] == [("o365", "error")]
    assert opened[0]["failures"] == 2 and opened[0]["cooldown_s"] == 1.0
    assert [e["service"] for e in closed] == ["o365"]


def _breaker_opens_and_closes(app, fake_microsoft, server, redis_client, settings):
    for _ in range(2):
        fake_microsoft.graph_responses.append(
            (503, {}, {"error": {"code": "serviceNotAvailable"}})
        )
    _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert fake_microsoft.requests_seen == 2
    # Open: the third skips Graph entirely
    [skipped] = _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert fake_microsoft.requests_seen == 2
    assert app.status.get(skipped)["skipped"][0]["reason"] == "breaker_open"
    assert len(server.recorder.messages) == 3
    # After the cool-down one probe goes to Graph, succeeds and closes the breaker
    time.sleep(2.2)
    [probe] = _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert app.status.get(probe)["service"] == "o365"
    [after] = _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert app.status.get(after)["service"] == "o365"
    assert len(fake_microsoft.sent) == 2


class _Xoauth2Recorder(Recorder):
    """An SMTP server that offers AUTH XOAUTH2 and checks the SASL string."""

    def __init__(self, valid_tokens):
        super().__init__()
        self.valid_tokens = valid_tokens
        self.sasl: list[bytes] = []

    async def auth_XOAUTH2(self, server, args):
        from aiosmtpd.smtp import AuthResult

        blob = (
            args[1]
            if len(args) == 2
            else (await server.challenge_auth("", encode_to_b64=False))
        )
        decoded = base64.b64decode(blob)
        self.sasl.append(decoded)
        user, bearer = decoded.split(b"\x01")[:2]
        token = bearer.removeprefix(b"auth=Bearer ").decode()
        ok = user == b"user=svc@contoso.com" and token in self.valid_tokens
        return AuthResult(success=ok, handled=False, auth_data=user)


def test_smtp_xoauth2_uses_the_service_account_token(
    make_settings, fake_microsoft, smtp_server, ca_file, run_worker, redis_client
):
    """auth = "xoauth2" sends `user=…^Aauth=Bearer <token>^A^A` with an Outlook-scoped token."""
    recorder = _Xoauth2Recorder(fake_microsoft.tokens_issued)
    server = smtp_server("starttls", recorder=recorder)
    section = server.smtp_section(
        "o365smtp",
        ca_bundle=str(ca_file),
        auth="xoauth2",
        username="svc@contoso.com",
        integrated_service="graph-mailer",
    )
    settings = make_settings(
        smtp=[section], integrated_services=_integrated(fake_microsoft, ca_file)
    )
    app = run_worker(settings)
    _send(redis_client, settings, count=3)
    app.broker.join("mail", timeout=10_000)
    assert len(recorder.messages) == 3
    assert len(fake_microsoft.token_requests) == 1
    assert (
        fake_microsoft.token_requests[0]["scope"]
        == "https://outlook.office365.com/.default"
    )
    token = fake_microsoft.tokens_issued[0]
    assert (
        recorder.sasl[0]
        == f"user=svc@contoso.com\x01auth=Bearer {token}\x01\x01".encode()
    )


def test_openauth_is_preferred_over_smtp(
    o365, fake_microsoft, smtp_server, run_worker, redis_client
):
    """With an enabled OpenAuth service, SMTP gets nothing while Graph works."""
    server = smtp_server()
    settings = o365(smtp=[server])
    app = run_worker(settings)
    _send(redis_client, settings, count=3)
    app.broker.join("mail", timeout=10_000)
    assert len(fake_microsoft.sent) == 3 and server.recorder.messages == []


def test_disabled_openauth_leaves_smtp(
    o365, fake_microsoft, smtp_server, run_worker, redis_client
):
    """With the OpenAuth service disabled, the SMTP connection is used."""
    server = smtp_server()
    settings = o365(smtp=[server], oa={"enabled": False})
    app = run_worker(settings)
    _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert fake_microsoft.requests_seen == 0 and len(server.recorder.messages) == 1


def test_quota_reply_holds_the_breaker_open(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """Exchange's 554 5.2.0 daily-quota reply opens the service's breaker for an hour at once."""
    quota, backup = smtp_server(), smtp_server()
    quota.recorder.data_replies.append(
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
    )
    settings = make_settings(
        smtp=[quota.smtp_section("o365"), backup.smtp_section("backup")]
    )
    app = run_worker(settings)
    [job_id] = _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    record = app.status.get(job_id)
    assert record["service"] == "backup"
    assert record["skipped"][0]["reason"] == "unavailable"
    until = float(redis_client.hget(f"{namespace}:breaker:o365", "open_until"))
    assert until - time.time() > 3000
    _send(redis_client, settings)
    app.broker.join("mail", timeout=10_000)
    assert (
        quota.recorder.commands.count("MAIL noreply@example.com") == 1
    )  # skipped the 2nd time


def test_slots_never_overflow_and_a_dead_holder_expires(redis_client, namespace):
    """A slot set shared by two holders gives out `limit` slots; a lease that is not
    released frees itself after its lease time."""
    from worker.limits import Slots

    a = Slots(redis_client, f"{namespace}:slots:t", limit=1, lease=0.3)
    b = Slots(redis_client, f"{namespace}:slots:t", limit=1, lease=0.3)
    held = a.try_acquire()
    assert held is not None
    assert b.try_acquire() is None
    assert b.acquire(timeout=0.05) is None
    a.release(held)
    assert b.try_acquire() is not None  # and b now "dies" without releasing
    assert a.acquire(timeout=2.0) is not None  # after the lease expired


@pytest.mark.slow
def test_two_processes_never_exceed_max_concurrent_requests(
    fake_microsoft, ca_file, redis_url, namespace, tmp_path
):
    """2 worker processes x 8 threads never have more Graph requests in flight than allowed,
    and no log line holds the token or the client secret."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.support.config import write_toml
    from tests.support.helpers import wait_for

    fake_microsoft.delay = 0.15
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "openauth": [_openauth(fake_microsoft, ca_file, max_concurrent_requests=2)],
            "integrated_services": _integrated(fake_microsoft, ca_file),
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env["MAILWORKER_CONFIG"] = str(config)
    mailworker = str(Path(sys.executable).parent / "mailworker")
    log = tmp_path / "worker.log"
    with log.open("wb") as err:
        worker = subprocess.Popen(
            [mailworker, "worker", "-p", "2", "-t", "8"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            import redis as redis_lib

            client = redis_lib.Redis.from_url(redis_url)
            producer = Producer(client, namespace=namespace)
            producer.enqueue_many(
                (
                    Notification(to=[f"u{i}@example.org"], subject="s", text="t")
                    for i in range(24)
                ),
                bulk=False,  # one broker message per job: concurrency across jobs
            )
            wait_for(lambda: len(fake_microsoft.sent) == 24, timeout=60)
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
    assert fake_microsoft.max_in_flight == 2
    text = log.read_text()
    assert fake_microsoft.client_secret not in text
    assert not any(token in text for token in fake_microsoft.tokens_issued)


def test_test_connection_reports_the_token_never_shows_it(
    o365, fake_microsoft, tmp_path
):
    """`test-connection --service o365` reports tenant, app, expiry; sends; hides the token."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    settings = o365()
    del settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env["MAILWORKER_CONFIG"] = str(tmp_path / "mailworker.toml")
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "mailworker"),
            "test-connection",
            "--service",
            "o365",
            "--to",
            "ops@example.org",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "token" in out.stdout and fake_microsoft.tenant in out.stdout
    assert fake_microsoft.client_id in out.stdout and "expires in" in out.stdout
    assert "verdict  ok" in out.stdout
    assert len(fake_microsoft.sent) == 1
    assert fake_microsoft.sent[0]["json"]["message"]["toRecipients"][0]["emailAddress"][
        "address"
    ] == ("ops@example.org")
    assert not any(t in out.stdout + out.stderr for t in fake_microsoft.tokens_issued)
    assert fake_microsoft.client_secret not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"account_type": "user"}, "account_type"),
        ({"tenant_id": None}, "tenant_id"),
    ],
)
def test_integrated_service_that_is_not_a_service_account_is_refused(
    make_settings, fake_microsoft, ca_file, change, field
):
    """A definition that is no service account, or has no tenant, is a config error naming it."""
    from settings import ConfigError

    with pytest.raises(ConfigError) as caught:
        make_settings(
            openauth=[_openauth(fake_microsoft, ca_file)],
            integrated_services=_integrated(fake_microsoft, ca_file, **change),
        )
    assert field in str(caught.value)


def test_unknown_client_type_is_refused(make_settings, fake_microsoft, ca_file):
    """Only client_type = "office365" is supported; another is an error naming the key."""
    from settings import ConfigError

    with pytest.raises(ConfigError) as caught:
        make_settings(
            openauth=[_openauth(fake_microsoft, ca_file, client_type="gmail")],
            integrated_services=_integrated(fake_microsoft, ca_file),
        )
    assert "client_type" in str(caught.value)
