"""``[[webhook]]``: each event POSTed, signed (Standard Webhooks), retried, dead-lettered."""

from __future__ import annotations

import base64
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis
import structlog
import structlog.testing

from common.keys import events_key
from producers import Notification, Producer
from settings import ConfigError, Settings
from settings.models import EventType
from tests.support.helpers import wait_for
from tests.support.processes import MAILWORKER, WorkerProcess, clean_env
from tests.support.webhooks import HANG, REDIRECT, Receiver
from worker.deadletter import DeadLetters, RequeueRefusedError
from worker.events.deliverer import WebhookDeliverer
from worker.events.model import group_name, retry_key
from worker.events.runner import WebhookDelivery, build_deliverers
from worker.events.sender import WebhookSender
from worker.events.signing import signer_for
from worker.events.store import DeliveryStore
from worker.status import StatusStore

KEY = b"0123456789abcdef0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
FAST_RETRY = {"min_backoff": "100ms", "max_backoff": "200ms", "max_attempts": 3}


@pytest.fixture
def receiver(server_tls):
    """``receiver(tls=True, secret=SECRET)``: a started receiver, stopped afterwards."""
    started = []

    def start(*, tls=True, secret=SECRET):
        rx = Receiver(secret, server_tls if tls else None).start()
        started.append(rx)
        return rx

    yield start
    for rx in started:
        rx.stop()


@pytest.fixture
def hook_settings(make_settings, ca_file):
    """Settings with one webhook ``engine`` to ``rx``: ``hook_settings(rx, **keys)``."""

    def make(rx, *, retry=None, smtp=None, status=None, **keys):
        hook = {"name": "engine", "url": rx.url, "secret": SECRET, "timeout": "2s"}
        if rx.scheme == "https":
            hook["ca_bundle"] = str(ca_file)
        hook.update(keys)
        hook = {k: v for k, v in hook.items() if v is not None}
        data = {"webhook": [hook], "retry": retry or FAST_RETRY}
        if smtp:
            data["smtp"] = smtp
        if status:
            data["status"] = status
        return make_settings(**data)

    return make


@pytest.fixture
def started(redis_client):
    """Deliverers running in threads: ``started(settings, n=1)``; stopped afterwards."""
    running = []

    def start(settings, n=1):
        group = [
            build_deliverers(settings, redis_client, poll=0.05)[0] for _ in range(n)
        ]
        for deliverer in group:
            deliverer.start()
        running.extend(group)
        return group

    yield start
    for deliverer in running:
        deliverer.stop()
    for deliverer in running:
        deliverer.join(timeout=10)


def _deliverer(
    settings: Settings, redis_client: redis.Redis, **options: Any
) -> WebhookDeliverer:
    [deliverer] = build_deliverers(settings, redis_client, poll=0.05)
    for name, value in options.items():
        setattr(deliverer, name, value)
    deliverer.store.ensure_group()
    return deliverer


def _drive(
    deliverer: WebhookDeliverer, until: Callable[[], object], timeout: float = 15.0
) -> None:
    """Run the deliverer's passes until ``until()`` holds (at most ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliverer.run_once(block_ms=50)
        if until():
            return
    raise AssertionError(f"not reached within {timeout}s")


def _emit(
    redis_client: redis.Redis,
    namespace: str,
    job_id: str,
    kind: EventType = "delivery.sent",
    **data: Any,
) -> dict[str, str]:
    StatusStore(redis_client, namespace=namespace, ttl=600).write(
        job_id, {"id": job_id, "state": "sent"}, outcome=(kind, data)
    )
    entries = cast(
        "list[tuple[bytes, dict[bytes, bytes]]]",
        redis_client.xrevrange(events_key(namespace), count=1),
    )
    return {k.decode(): v.decode() for k, v in entries[0][1].items()}


def _pending(redis_client: redis.Redis, namespace: str) -> int:
    summary = redis_client.xpending(events_key(namespace), group_name("engine"))
    return int(summary["pending"])


def _shown(
    redis_client: redis.Redis, settings: Settings, letter: str
) -> dict[str, Any]:
    """``dead show``'s object of a dead letter that must exist."""
    shown = _letters(redis_client, settings).show(letter)
    assert shown is not None
    return shown


def _letters(redis_client: redis.Redis, settings: Settings) -> DeadLetters:
    return DeadLetters(
        redis_client, namespace=settings.namespace, ttl=settings.status.ttl
    )


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILWORKER, *args],
        env=clean_env(MAILWORKER_CONFIG=str(tmp_path / "mailworker.toml")),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("secret", [SECRET, "a plain secret, ünïcode"])
def test_an_event_is_posted_once_with_a_signature_the_receiver_verifies(
    receiver, hook_settings, redis_client, namespace, secret
):
    """The POST carries the event's five fields (data decoded) and the Standard Webhooks
    headers; the receiver recomputes the signature (``whsec_`` base64 keys and plain
    secrets alike) and it matches."""
    rx = receiver(secret=secret)
    deliverer = _deliverer(hook_settings(rx, secret=secret), redis_client)
    event = _emit(redis_client, namespace, "job-1", service="primary", n=1)
    _drive(deliverer, rx.delivered)
    [got] = rx.received
    assert got.verified
    assert got.path == "/hooks/mail"
    assert list(got.json) == ["id", "type", "job_id", "at", "data"]
    assert got.json == {
        "id": event["id"],
        "type": "delivery.sent",
        "job_id": "job-1",
        "at": event["at"],
        "data": {"service": "primary", "n": 1},
    }
    assert got.headers["webhook-id"] == event["id"]
    assert got.headers["content-type"] == "application/json"
    assert got.headers["webhook-signature"].startswith("v1,")
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 300
    assert _pending(redis_client, namespace) == 0


def test_a_new_webhook_starts_at_the_end_of_the_stream(
    receiver, hook_settings, redis_client, namespace
):
    """Events written before the webhook's group existed are not replayed; later ones are
    delivered."""
    rx = receiver()
    settings = hook_settings(rx)
    _emit(redis_client, namespace, "old-job")
    deliverer = _deliverer(settings, redis_client)  # makes the group, at "$"
    new = _emit(redis_client, namespace, "new-job")
    _drive(deliverer, rx.delivered)
    deliverer.run_once(block_ms=100)
    assert [r.json["id"] for r in rx.received] == [new["id"]]


def test_events_not_of_the_webhooks_types_are_acknowledged_unsent(
    receiver, hook_settings, redis_client, namespace
):
    """With ``types = ["delivery.dead"]`` a sent job's event is acknowledged without a POST."""
    rx = receiver()
    deliverer = _deliverer(hook_settings(rx, types=["delivery.dead"]), redis_client)
    _emit(redis_client, namespace, "job-sent")
    dead = _emit(redis_client, namespace, "job-dead", "delivery.dead", reason="x")
    _drive(deliverer, rx.delivered)
    deliverer.run_once(block_ms=100)
    assert [r.json["id"] for r in rx.received] == [dead["id"]]
    assert _pending(redis_client, namespace) == 0


def test_a_500_is_retried_with_backoff_by_the_next_deliverer_after_a_restart(
    receiver, hook_settings, redis_client, namespace
):
    """A 500 puts the delivery on the retry schedule in Redis, off the stream's pending
    list; a deliverer built anew (a restarted worker) delivers it once it is due."""
    rx = receiver()
    rx.plan = [500]
    settings = hook_settings(rx)
    first = _deliverer(settings, redis_client)
    event = _emit(redis_client, namespace, "job-1")
    _drive(first, lambda: rx.received)
    first.join(timeout=1)
    assert redis_client.zcard(retry_key(namespace, "engine")) == 1
    assert _pending(redis_client, namespace) == 0
    # Given a new process
    second = _deliverer(settings, redis_client)
    _drive(second, rx.delivered)
    assert [(r.answer, r.json["id"]) for r in rx.received] == [
        (500, event["id"]),
        (200, event["id"]),
    ]
    assert all(r.verified for r in rx.received)
    assert redis_client.zcard(retry_key(namespace, "engine")) == 0


def test_an_endpoint_that_hangs_times_out_and_is_retried(
    receiver, hook_settings, redis_client, namespace
):
    """A receiver that does not answer within ``timeout`` fails that attempt; the retry
    is delivered."""
    rx = receiver()
    rx.plan = [HANG]
    deliverer = _deliverer(hook_settings(rx, timeout="500ms"), redis_client)
    event = _emit(redis_client, namespace, "job-1")
    _drive(deliverer, rx.delivered)
    assert [r.answer for r in rx.received] == [HANG, 200]
    assert {r.json["id"] for r in rx.received} == {event["id"]}


def test_a_redirect_is_not_followed_and_fails_the_attempt(
    receiver, hook_settings, redis_client, namespace
):
    """A 302 is a failure whose error says the redirect was not followed; nothing is
    sent to its Location."""
    rx = receiver()
    rx.plan = [REDIRECT]
    settings = hook_settings(rx, retry={**FAST_RETRY, "max_attempts": 1})
    deliverer = _deliverer(settings, redis_client)
    event = _emit(redis_client, namespace, "job-1")
    letter = f"webhook:engine:{event['id']}"
    _drive(deliverer, lambda: _letters(redis_client, settings).show(letter))
    assert [r.path for r in rx.received] == ["/hooks/mail"]
    error = _shown(redis_client, settings, letter)["error"]
    assert error["code"] == 302
    assert "redirect, not followed" in error["message"]


def test_a_certificate_that_does_not_verify_fails_the_delivery(
    receiver, hook_settings, redis_client, namespace
):
    """Without ``ca_bundle`` the test CA is not trusted: nothing reaches the receiver and
    the dead letter names the certificate."""
    rx = receiver()
    settings = hook_settings(
        rx, ca_bundle=None, retry={**FAST_RETRY, "max_attempts": 1}
    )
    deliverer = _deliverer(settings, redis_client)
    event = _emit(redis_client, namespace, "job-1")
    letter = f"webhook:engine:{event['id']}"
    _drive(deliverer, lambda: _letters(redis_client, settings).show(letter))
    assert rx.received == []
    message = _shown(redis_client, settings, letter)["error"]["message"]
    assert "the certificate did not verify" in message
    assert "/hooks/mail" not in message  # the URL's path may hold a token


def test_http_is_refused_unless_the_webhook_allows_it(
    receiver, hook_settings, redis_client, namespace
):
    """An http:// URL is a configuration error naming the webhook; with
    ``allow_http = true`` it is delivered, signed."""
    rx = receiver(tls=False)
    with pytest.raises(ConfigError) as caught:
        hook_settings(rx)
    assert caught.value.field == "webhook[engine]"
    assert "https" in str(caught.value)
    deliverer = _deliverer(hook_settings(rx, allow_http=True), redis_client)
    _emit(redis_client, namespace, "job-1")
    _drive(deliverer, rx.delivered)
    assert rx.received[0].verified


def test_after_max_attempts_a_dead_letter_the_dead_commands_handle(
    receiver, hook_settings, redis_client, namespace, tmp_path
):
    """After ``max_attempts`` failures the delivery is a dead letter with reason
    ``webhook``: ``dead list --reason webhook`` lists it, ``dead show`` shows the event
    (no secret), ``dead requeue`` delivers it again to that webhook, and ``dead purge``
    removes another."""
    rx = receiver()
    rx.default = 500
    settings = hook_settings(rx)
    deliverer = _deliverer(settings, redis_client)
    event = _emit(redis_client, namespace, "job-1", service="primary")
    letter = f"webhook:engine:{event['id']}"
    _drive(deliverer, lambda: _letters(redis_client, settings).show(letter))
    assert [r.answer for r in rx.received] == [500, 500, 500]
    # When the operator lists and inspects the dead letters
    listed = _cli(tmp_path, "dead", "list", "--reason", "webhook", "--json")
    assert listed.returncode == 0, listed.stderr
    [line] = [orjson.loads(x) for x in listed.stdout.splitlines()]
    assert (line["id"], line["reason"], line["service"]) == (
        letter,
        "webhook",
        "engine",
    )
    assert line["attempts"] == 3 and line["error"]["code"] == 500
    assert _cli(tmp_path, "dead", "list", "--reason", "validation").stdout == ""
    shown = _cli(tmp_path, "dead", "show", letter, "--json")
    assert shown.returncode == 0, shown.stderr
    assert SECRET not in shown.stdout and KEY.decode() not in shown.stdout
    record = orjson.loads(shown.stdout)
    assert record["message"]["webhook"] == "engine"
    assert record["message"]["event"] == rx.received[0].json
    assert [h["event"] for h in record["history"]] == ["failed"] * 3 + ["dead"]
    # Then a requeue delivers it once the receiver is back
    rx.default = 200
    requeued = _cli(tmp_path, "dead", "requeue", letter)
    assert (requeued.returncode, requeued.stdout.strip()) == (0, f"requeued {letter}")
    _drive(deliverer, rx.delivered)
    assert rx.delivered()[0].json["id"] == event["id"]
    status = StatusStore(redis_client, namespace=namespace, ttl=600).get(letter)
    assert status is not None and status["state"] == "sent"
    assert _cli(tmp_path, "dead", "list", "--reason", "webhook").stdout == ""
    # And purge removes a dead letter for good
    rx.default = 500
    other = _emit(redis_client, namespace, "job-2")
    second = f"webhook:engine:{other['id']}"
    _drive(deliverer, lambda: _letters(redis_client, settings).show(second))
    purged = _cli(tmp_path, "dead", "purge", second)
    assert (purged.returncode, purged.stdout.strip()) == (0, "purged 1 dead letter(s)")
    assert _cli(tmp_path, "dead", "show", second).returncode == 3


def test_webhook_dead_letters_count_toward_max_dead_letters(
    receiver, hook_settings, redis_client, namespace
):
    """A webhook delivery's dead letter past status.max_dead_letters trims the oldest
    dead letter in the same script, with its log line and count."""
    rx = receiver()
    rx.plan = [REDIRECT, REDIRECT]
    settings = hook_settings(
        rx,
        retry={**FAST_RETRY, "max_attempts": 1},
        status={"max_dead_letters": 1},
    )
    deliverer = _deliverer(settings, redis_client)
    first = f"webhook:engine:{_emit(redis_client, namespace, 'job-1')['id']}"
    _drive(deliverer, lambda: _letters(redis_client, settings).show(first))
    second = f"webhook:engine:{_emit(redis_client, namespace, 'job-2')['id']}"
    with structlog.testing.capture_logs() as logs:
        _drive(deliverer, lambda: _letters(redis_client, settings).show(second))
    letters = _letters(redis_client, settings)
    assert letters.show(first) is None and letters.trimmed() == 1
    assert [e["job_ids"] for e in logs if e["event"] == "dead_letters_trimmed"] == [
        [first]
    ]


def test_requeue_refuses_a_letter_of_a_webhook_that_is_not_enabled(
    receiver, hook_settings, redis_client, namespace
):
    """A webhook dead letter goes back only to its own webhook: with that webhook not
    enabled, requeue is refused and the letter stays."""
    rx = receiver()
    rx.default = 500
    settings = hook_settings(rx, retry={**FAST_RETRY, "max_attempts": 1})
    deliverer = _deliverer(settings, redis_client)
    event = _emit(redis_client, namespace, "job-1")
    letter = f"webhook:engine:{event['id']}"
    letters = _letters(redis_client, settings)
    _drive(deliverer, lambda: letters.show(letter))
    with pytest.raises(RequeueRefusedError, match="webhook engine is not enabled"):
        letters.requeue(letter, settings.limits, webhooks=["other"])
    assert letters.show(letter) is not None


def test_two_deliverers_sharing_the_group_deliver_each_event_once(
    receiver, hook_settings, started, redis_client, namespace
):
    """Two deliverers (two worker processes' threads) read one group: every event is
    delivered, and none twice."""
    rx = receiver()
    started(hook_settings(rx), n=2)
    ids = [_emit(redis_client, namespace, f"job-{n}")["id"] for n in range(30)]
    wait_for(lambda: len(rx.delivered()) >= 30, timeout=30)
    time.sleep(0.3)  # room for a duplicate to show up
    assert sorted(r.json["id"] for r in rx.received) == sorted(ids)


def test_worker_processes_deliver_each_job_outcome_once_and_stop_cleanly(
    receiver, hook_settings, smtp_server, redis_client, namespace, tmp_path
):
    """``mailworker worker -p 2`` posts each job's ``delivery.sent`` once, signed, never
    logs the secret, and exits 0 on SIGTERM."""
    rx = receiver()
    hook_settings(rx, smtp=[smtp_server().smtp_section()])
    worker = WorkerProcess(
        tmp_path / "mailworker.toml", tmp_path / "worker.log", "-p", "2", "-t", "2"
    )
    try:
        wait_for(
            lambda: len(worker.events("Worker process is ready for action.")) == 2,
            timeout=30,
        )
        # The groups are made as the deliverers start: wait for it before enqueueing.
        wait_for(
            lambda: (
                redis_client.exists(events_key(namespace))
                and redis_client.xinfo_groups(events_key(namespace))
            ),
            timeout=30,
        )
        producer = Producer(redis_client, namespace=namespace)
        jobs = [
            producer.enqueue(Notification(to=["a@example.org"], subject="s", text="t"))
            for _ in range(10)
        ]
        wait_for(lambda: len(rx.delivered()) >= 10, timeout=30)
    finally:
        assert worker.stop() == 0
    assert sorted(r.json["job_id"] for r in rx.received) == sorted(jobs)
    assert all(r.verified and r.json["type"] == "delivery.sent" for r in rx.received)
    log = worker.log.read_text()
    assert SECRET not in log and base64.b64encode(KEY).decode() not in log
    assert len(worker.events("webhook_delivered")) == 10


def test_an_event_held_by_a_worker_that_died_is_claimed_by_another(
    receiver, hook_settings, smtp_server, redis_client, namespace, tmp_path
):
    """A worker killed (-9) mid-POST leaves its event pending in the group; another
    deliverer claims it after the claim timeout and delivers it."""
    rx = receiver()
    rx.plan = [HANG]
    settings = hook_settings(rx, timeout="20s", smtp=[smtp_server().smtp_section()])
    worker = WorkerProcess(
        tmp_path / "mailworker.toml", tmp_path / "worker.log", "-p", "1", "-t", "1"
    )
    try:
        wait_for(lambda: redis_client.exists(events_key(namespace)), timeout=30)
        producer = Producer(redis_client, namespace=namespace)
        job = producer.enqueue(
            Notification(to=["a@example.org"], subject="s", text="t")
        )
        assert rx.hanging.wait(timeout=30)
    finally:
        worker.kill()
    assert _pending(redis_client, namespace) == 1
    # When another deliverer runs with a short claim timeout
    [hook] = settings.webhook
    other = WebhookDeliverer(
        hook,
        store=DeliveryStore(
            redis_client, namespace=namespace, webhook="engine", ttl=600
        ),
        sender=WebhookSender(hook, signer_for(hook)),
        retry=settings.retry,
        claim_timeout=1.0,
        poll=0.05,
    )
    _drive(other, rx.delivered)
    other.join(timeout=1)
    first, again = rx.received
    assert (first.answer, again.answer) == (HANG, 200)
    assert first.json["job_id"] == again.json["job_id"] == job
    assert again.headers["webhook-id"] == first.headers["webhook-id"]
    assert _pending(redis_client, namespace) == 0


def test_no_secret_in_logs_reprs_or_dead_letters(
    receiver, hook_settings, redis_client, namespace
):
    """Failing and dead-lettered deliveries log, keep and show nothing of the secret."""
    rx = receiver()
    rx.default = 503
    settings = hook_settings(rx, retry={**FAST_RETRY, "max_attempts": 2})
    deliverer = _deliverer(settings, redis_client)
    event = _emit(redis_client, namespace, "job-1")
    letter = f"webhook:engine:{event['id']}"
    with structlog.testing.capture_logs() as logs:
        _drive(deliverer, lambda: _letters(redis_client, settings).show(letter))
    assert [e["event"] for e in logs] == [
        "webhook_retry_scheduled",
        "webhook_dead_lettered",
    ]
    assert logs[0]["http_status"] == 503 and logs[0]["webhook"] == "engine"
    kept = redis_client.get(f"{namespace}:dead:{letter}")
    seen = [
        repr(logs),
        repr(deliverer),
        repr(deliverer.sender),
        repr(deliverer.sender._signer),
        repr(settings.webhook),
        repr(_letters(redis_client, settings).show(letter)),
        kept.decode(),
    ]
    for text in seen:
        assert SECRET not in text
        assert base64.b64encode(KEY).decode() not in text


def test_the_worker_runs_webhooks_only_when_one_is_enabled(
    receiver, hook_settings, make_settings, smtp_server, redis_client
):
    """``build`` adds the webhook middleware for an enabled webhook, and none otherwise."""
    from worker.app import build

    rx = receiver()
    smtp = [smtp_server().smtp_section()]
    for settings, expected in (
        (make_settings(smtp=smtp), 0),
        (hook_settings(rx, smtp=smtp, enabled=False), 0),
        (hook_settings(rx, smtp=smtp), 1),
    ):
        app = build(settings, client=redis_client)
        found = [m for m in app.broker.middleware if isinstance(m, WebhookDelivery)]
        app.close()
        assert len(found) == expected


def test_an_unreadable_secret_file_stops_the_worker_with_exit_2(
    receiver, hook_settings, smtp_server, tmp_path
):
    """``mailworker worker`` refuses a webhook whose secret file cannot be read, naming
    the key."""
    rx = receiver()
    smtp = [smtp_server().smtp_section()]
    hook_settings(rx, smtp=smtp, secret=None, secret_file=str(tmp_path / "missing"))
    done = subprocess.run(
        [MAILWORKER, "worker"],
        env=clean_env(MAILWORKER_CONFIG=str(tmp_path / "mailworker.toml")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "webhook[engine].secret_file" in done.stderr


def test_a_whsec_secret_that_is_not_base64_is_a_configuration_error(
    receiver, hook_settings
):
    """A secret that starts with ``whsec_`` must be base64 after it."""
    rx = receiver()
    settings = hook_settings(rx, secret="whsec_not base64!")
    with pytest.raises(ConfigError) as caught:
        signer_for(settings.webhook[0])
    assert caught.value.field == "webhook[engine].secret"


def test_a_secret_from_the_environment_replaces_the_files_secret_file(tmp_path):
    """``MAILWORKER_WEBHOOK__NAME__SECRET`` wins over the file's ``secret_file``, as the
    other secrets' variables do."""
    from settings import load_settings
    from tests.support.config import write_toml

    path = write_toml(
        tmp_path / "mailworker.toml",
        {
            "webhook": [
                {
                    "name": "my-hook",
                    "url": "https://hooks.example.org/in",
                    "secret_file": str(tmp_path / "missing"),
                }
            ]
        },
    )
    settings = load_settings(
        path, environ={"MAILWORKER_WEBHOOK__MY_HOOK__SECRET": SECRET}
    )
    [hook] = settings.webhook
    assert hook.secret is not None and hook.secret.get_secret_value() == SECRET
    assert hook.secret_file is None
    assert repr(signer_for(hook)) == "Signer(key=***)"
