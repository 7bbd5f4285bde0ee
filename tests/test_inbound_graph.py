"""The Graph inbound source reads a mailbox folder of the Microsoft stand-in with delta
queries, hands each message to a sink, and moves it to the processed or failed folder."""

from __future__ import annotations

import json
import threading
from collections.abc import MutableMapping
from typing import Any

import orjson
import pytest
import redis
import requests
import structlog.testing

from common.keys import history_key
from common.sockets import free_port
from producers import Notification, Producer
from tests.support.fake_microsoft import FakeMicrosoft
from tests.support.helpers import wait_for
from tests.support.mail import dsn, reply
from worker.inbound.graph import GraphSource
from worker.inbound.runner import build_inbound
from worker.inbound.store import InboundRecord, InboundStore
from worker.transports.oauth import HttpClient, TokenProvider

MAILBOX = "actions@contoso.com"


def _message(n: int) -> bytes:
    """An out-of-office answer: the handler ignores it, so it goes to processed."""
    return (
        f"From: ann@example.org\r\nTo: {MAILBOX}\r\nSubject: Out of office {n}\r\n"
        f"Auto-Submitted: auto-replied\r\nMessage-ID: <away-{n}@example.org>\r\n"
        "\r\nI am away until Monday.\r\n"
    ).encode()


UNPARSEABLE = b"\x00\xff this is not a message at all"


@pytest.fixture
def mailbox(fake_microsoft):
    return fake_microsoft.mailboxes.mailbox(MAILBOX)


@pytest.fixture
def settings(make_settings, fake_microsoft, ca_file):
    """A configuration with the stand-in as the integrated service and one graph source."""

    def make(*, extra=None, **source):
        section = {
            "name": "o365-actions",
            "kind": "graph",
            "integrated_service": "graph-mailer",
            "mailbox": MAILBOX,
            "poll_interval": "1s",
        }
        section.update(source)
        return make_settings(
            integrated_services={
                "graph-mailer": {
                    "account_type": "service",
                    "tenant_id": fake_microsoft.tenant,
                    "client_id": fake_microsoft.client_id,
                    "client_secret": fake_microsoft.client_secret,
                    "authority_host": fake_microsoft.url,
                    "graph_endpoint": fake_microsoft.url,
                    "ca_bundle": str(ca_file),
                }
            },
            inbound=[section],
            **(extra or {}),
        )

    return make


@pytest.fixture
def make_source(settings, redis_client, namespace):
    """``make_source(**inbound_keys)``: a GraphSource over the stand-in, handing to the
    real handler (``build_inbound``) on the test's Redis (``sink_client`` for another)."""
    clients: list[HttpClient] = []

    def make(*, options=None, own_http=False, sink_client=None, extra=None, **source):
        cfg = settings(extra=extra, **source)
        svc = cfg.integrated_services["graph-mailer"]
        http = HttpClient(verify=str(svc.ca_bundle), timeout=10)
        clients.append(http)
        tokens = TokenProvider("graph-mailer", svc, http)
        options = dict(options or {})
        if not own_http:  # else the source builds its own from the service's ca_bundle
            options["http"] = http
        return GraphSource(
            cfg.inbound[0],
            sink=build_inbound(cfg, sink_client or redis_client),
            tokens=tokens,
            service=svc,
            client=redis_client,
            namespace=namespace,
            **options,
        )

    yield make
    for http in clients:
        http.close()


@pytest.fixture
def records(redis_client, namespace):
    """``records()``: what the handler recorded, oldest first."""

    def read() -> list[InboundRecord]:
        store = InboundStore(redis_client, namespace=namespace, ttl=3600)
        return list(reversed(store.recent()))

    return read


def _events(
    logs: list[MutableMapping[str, Any]], name: str
) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def _ops(fake: FakeMicrosoft, since: int = 0) -> list[str]:
    return [r.op for r in fake.mailboxes.requests()[since:]]


# ---------------------------------------------------------------- handling and moving


def test_new_messages_are_handled_and_moved(
    make_source, records, mailbox, fake_microsoft
):
    """Each message is recorded by the handler and moved to the processed folder, which
    is created once under the top of the mailbox; every call asks for immutable ids."""
    raws = [_message(n) for n in range(3)]
    for raw in raws:
        mailbox.add(raw)
    source = make_source()

    assert source.poll_once() == 3

    assert [(r["source"], r["kind"], r["outcome"]) for r in records()] == [
        ("o365-actions", "auto_reply", "ignored")
    ] * 3
    assert sorted(r["message_id"] for r in records()) == [
        f"<away-{n}@example.org>" for n in range(3)
    ]
    assert mailbox.contents("inbox") == []
    assert sorted(mailbox.contents("mailworker-processed")) == sorted(raws)
    assert mailbox.folder("mailworker-failed").parent_id == mailbox.root.id
    requests_seen = fake_microsoft.mailboxes.requests()
    assert [r.op for r in requests_seen].count("folders.create") == 2
    assert all(r.immutable_ids for r in requests_seen)
    assert all(r.status < 400 for r in requests_seen)


def test_unparseable_and_unmatched_messages_go_to_the_failed_folder(
    make_source, records, mailbox
):
    """What the handler fails (unparseable, or a reply while actions do not exist) is
    moved to failed_folder with its reason recorded; the rest to processed_folder."""
    human = reply(to=MAILBOX, in_reply_to="<job@example.com>")
    for raw in (UNPARSEABLE, human, _message(1)):
        mailbox.add(raw)

    assert make_source().poll_once() == 3

    assert mailbox.contents("mailworker-failed") == [UNPARSEABLE, human]
    assert mailbox.contents("mailworker-processed") == [_message(1)]
    reasons = {r["outcome"] + ": " + r["reason"] for r in records()}
    assert "failed: unparseable: no header fields" in reasons
    assert "failed: not a bounce or an auto-reply of ours" in reasons


def test_existing_folders_are_found_by_display_name(
    make_source, mailbox, fake_microsoft
):
    """A source folder given by display name is read, and existing processed and
    failed folders are used, not created again."""
    mailbox.create_folder("Actions")
    mailbox.create_folder("Done")
    mailbox.create_folder("Broken")
    mailbox.add(_message(1), folder="Actions")
    mailbox.add(_message(2))  # in the inbox: not this source's folder

    source = make_source(
        folder="Actions", processed_folder="Done", failed_folder="Broken"
    )
    assert source.poll_once() == 1

    assert mailbox.contents("Done") == [_message(1)]
    assert mailbox.contents("inbox") == [_message(2)]
    assert "folders.create" not in _ops(fake_microsoft)


def test_a_missing_source_folder_fails_the_poll_and_is_logged(make_source, mailbox):
    """A source folder that does not exist is not created: the poll logs and moves none."""
    source = make_source(folder="Nowhere")
    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 0
    failed = [e for e in logs if e["event"] == "inbound_poll_failed"]
    assert failed and "Nowhere" in failed[0]["error"]


def test_delta_pages_are_followed(make_source, mailbox, fake_microsoft):
    """A round of several delta pages is followed to its end and every message moved."""
    for n in range(5):
        mailbox.add(_message(n))
    source = make_source(options={"page_size": 2})

    assert source.poll_once() == 5

    assert _ops(fake_microsoft).count("delta") == 3  # 2 + 2 + 1
    assert len(mailbox.contents("mailworker-processed")) == 5


def test_the_next_poll_reads_only_what_is_new(make_source, mailbox):
    """With the stored delta link, a later poll sees only messages that arrived since."""
    mailbox.add(_message(1))
    source = make_source()
    assert source.poll_once() == 1
    mailbox.add(_message(2))

    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 1

    handled = _events(logs, "inbound_handled")
    assert [e["duplicate"] for e in handled] == [False]


@pytest.mark.parametrize(
    ("status", "code"), [(410, "SyncStateNotFound"), (400, "SyncStateInvalid")]
)
def test_expired_delta_token_gives_a_full_resync(
    make_source, records, mailbox, fake_microsoft, status, code
):
    """A delta token Graph no longer knows is dropped, and the folder is read afresh:
    what is still there (pending) is handled, nothing else."""
    mailbox.add(_message(1))
    source = make_source()
    assert source.poll_once() == 1
    mailbox.add(_message(2))
    fake_microsoft.mailboxes.expire_delta_tokens(status=status, code=code)
    before = len(fake_microsoft.mailboxes.requests())

    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 1

    deltas = fake_microsoft.mailboxes.requests("delta")[-2:]
    assert [d.status for d in deltas] == [status, 200]
    assert "$deltatoken" in deltas[0].query and "$deltatoken" not in deltas[1].query
    assert _ops(fake_microsoft, before).count("delta") == 2
    assert len(_events(logs, "inbound_delta_reset")) == 1
    assert [e["duplicate"] for e in _events(logs, "inbound_handled")] == [False]
    assert len(records()) == 2
    assert source.poll_once() == 0  # the new link works


def test_a_link_for_another_folder_is_not_used(make_source, records, mailbox):
    """When the configured folder changes, the stored delta link (of the old folder) is
    not used: the new folder is read from the start."""
    mailbox.create_folder("Actions")
    mailbox.add(_message(1))
    assert make_source().poll_once() == 1
    mailbox.add(_message(2), folder="Actions")

    assert make_source(folder="Actions").poll_once() == 1

    assert mailbox.contents("mailworker-processed") == [_message(1), _message(2)]
    assert len(records()) == 2


def test_a_stored_link_to_another_host_gets_no_token(
    make_source, mailbox, fake_microsoft, redis_client, namespace
):
    """A delta link in Redis that points outside the Graph endpoint is refused, so the
    token is never sent there; the poll fails and says why."""
    mailbox.add(_message(1))
    source = make_source()
    assert source.poll_once() == 1
    key = f"{namespace}:inbound:o365-actions:delta"
    stored = json.loads(redis_client.get(key))
    stored["link"] = (
        "https://attacker.example/v1.0/users/x/messages/delta?$deltatoken=1"
    )
    redis_client.set(key, json.dumps(stored))
    before = len(fake_microsoft.mailboxes.requests())

    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 0

    failed = [e for e in logs if e["event"] == "inbound_poll_failed"]
    assert "refusing a link outside" in failed[0]["error"]
    assert "deltatoken" not in failed[0]["error"]
    assert len(fake_microsoft.mailboxes.requests()) == before


# ---------------------------------------------------------------- throttling and tokens


@pytest.mark.parametrize(
    ("status", "op"), [(429, "delta"), (503, "mime"), (429, "move")]
)
def test_throttling_with_retry_after_is_waited_out(
    make_source, mailbox, fake_microsoft, status, op
):
    """A 429 or 503 with Retry-After is asked again after that many seconds, and the
    message is handled in the same poll."""
    mailbox.add(_message(1))
    source = make_source()
    source.poll_once()  # folders resolved, nothing pending
    mailbox.add(_message(2))
    fake_microsoft.mailboxes.inject(status, count=2, op=op, retry_after=1)

    assert source.poll_once() == 1

    tries = fake_microsoft.mailboxes.requests(op)[-3:]
    assert [t.status for t in tries] == [status, status, 200 if op != "move" else 201]
    assert tries[1].at - tries[0].at >= 0.95  # no sooner than Retry-After
    assert tries[2].at - tries[1].at >= 0.95
    assert mailbox.contents("mailworker-processed") == [_message(1), _message(2)]


def test_throttling_past_the_retries_gives_up_the_poll(
    make_source, records, mailbox, fake_microsoft
):
    """When throttling outlasts the bounded retries the poll logs and gives up; nothing
    is lost and the next poll handles the message."""
    mailbox.add(_message(1))
    source = make_source(options={"retries": 1})
    fake_microsoft.mailboxes.inject(429, count=2, op="delta", retry_after=1)

    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 0

    assert [r.status for r in fake_microsoft.mailboxes.requests("delta")] == [429, 429]
    failed = [e for e in logs if e["event"] == "inbound_poll_failed"]
    assert failed[0]["http_status"] == 429
    assert records() == [] and mailbox.contents("inbox") == [_message(1)]
    assert source.poll_once() == 1


def test_a_401_drops_the_token_and_asks_again_once(
    make_source, mailbox, fake_microsoft
):
    """A revoked token is replaced once and the call is repeated; no log line holds it."""
    source = make_source()
    source.poll_once()
    revoked = list(fake_microsoft.tokens_issued)
    fake_microsoft.revoke_all_tokens()
    mailbox.add(_message(1))

    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 1

    assert len(fake_microsoft.tokens_issued) == len(revoked) + 1
    statuses = [r.status for r in fake_microsoft.mailboxes.requests("delta")[-2:]]
    assert statuses == [401, 200]
    text = repr(logs)
    assert not any(token in text for token in fake_microsoft.tokens_issued)


def test_a_token_graph_keeps_refusing_fails_the_poll_without_showing_it(
    make_source, mailbox, fake_microsoft
):
    """Two 401s in a row end the poll; the error names the call, never the token."""
    mailbox.add(_message(1))
    source = make_source()
    fake_microsoft.mailboxes.inject(401, count=2)

    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 0

    failed = [e for e in logs if e["event"] == "inbound_poll_failed"]
    assert failed[0]["http_status"] == 401
    assert "/v1.0/users/" in failed[0]["error"]
    text = repr(logs)
    assert fake_microsoft.client_secret not in text
    assert not any(token in text for token in fake_microsoft.tokens_issued)


def test_an_idle_poll_costs_one_request(make_source, mailbox, fake_microsoft):
    """Once folders are known and a token is cached, a poll with nothing new is one
    delta request to Graph and none to the identity provider."""
    mailbox.add(_message(1))
    source = make_source()
    source.poll_once()
    token_requests = len(fake_microsoft.token_requests)

    per_poll = []
    for _ in range(3):
        before = len(fake_microsoft.mailboxes.requests())
        assert source.poll_once() == 0
        per_poll.append(_ops(fake_microsoft, before))

    assert per_poll == [["delta"]] * 3
    assert len(fake_microsoft.token_requests) == token_requests


def test_two_sources_never_exceed_four_concurrent_requests(
    make_source, records, mailbox, fake_microsoft
):
    """Two sources on one mailbox (two threads, four workers each) never have more than
    4 requests to it in flight, and each message is handled once."""
    fake_microsoft.mailboxes.delay = 0.05
    raws = [_message(n) for n in range(24)]
    for raw in raws:
        mailbox.add(raw)
    sources = [make_source(), make_source()]
    stop = threading.Event()
    threads = [threading.Thread(target=s.run, args=(stop,)) for s in sources]
    for thread in threads:
        thread.start()
    try:
        wait_for(
            lambda: len(mailbox.contents("mailworker-processed")) == 24, timeout=60
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert fake_microsoft.mailboxes.max_in_flight[MAILBOX] == 4
    recorded = sorted(r["message_id"] for r in records())
    assert recorded == sorted(f"<away-{n}@example.org>" for n in range(24))
    assert mailbox.contents("inbox") == []


def test_run_stops_while_waiting_out_a_retry_after(
    make_source, mailbox, fake_microsoft
):
    """Setting stop ends run() even in the middle of a long Retry-After."""
    mailbox.add(_message(1))
    source = make_source(own_http=True)
    fake_microsoft.mailboxes.inject(503, count=1, op="delta", retry_after=30)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,))
    thread.start()
    wait_for(lambda: fake_microsoft.mailboxes.requests("delta"))
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert mailbox.contents("inbox") == [_message(1)]


# ---------------------------------------------------------------- once


def test_a_failed_move_is_handled_as_a_duplicate_and_moved_next_poll(
    make_source, records, mailbox, fake_microsoft
):
    """A message recorded but not moved (Graph answers 500 to the move) is seen again at
    the next poll, handled as a duplicate, and moved."""
    mailbox.add(_message(1))
    source = make_source()
    fake_microsoft.mailboxes.inject(500, count=1, op="move")

    assert source.poll_once() == 0
    assert mailbox.contents("inbox") == [_message(1)]
    assert [r["message_id"] for r in records()] == ["<away-1@example.org>"]

    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 1

    moved = _events(logs, "inbound_message_moved")
    assert [e["duplicate"] for e in moved] == [True]
    assert len(records()) == 1
    assert mailbox.contents("mailworker-processed") == [_message(1)]


def test_a_duplicate_delivered_twice_is_handled_once(make_source, records, mailbox):
    """The same message delivered twice is handled once; both copies leave the inbox."""
    mailbox.add(_message(1))
    mailbox.add(_message(1))

    with structlog.testing.capture_logs() as logs:
        assert make_source().poll_once() == 2

    moved = [e for e in logs if e["event"] == "inbound_message_moved"]
    assert sorted(e["duplicate"] for e in moved) == [False, True]
    assert len(records()) == 1
    assert mailbox.contents("mailworker-processed") == [_message(1)] * 2


def test_an_unrecorded_message_stays_for_the_next_poll(make_source, records, mailbox):
    """When the handler cannot record (its Redis is away) the message stays in the
    folder, and the next poll (here by a source whose handler can) hands it over."""
    mailbox.add(_message(1))
    away = redis.Redis(host="127.0.0.1", port=free_port(), socket_timeout=2)

    with structlog.testing.capture_logs() as logs:
        assert make_source(sink_client=away).poll_once() == 0

    left = _events(logs, "inbound_message_left")
    assert [e["step"] for e in left] == ["handle"]
    assert mailbox.contents("inbox") == [_message(1)]
    assert make_source().poll_once() == 1
    assert mailbox.contents("mailworker-processed") == [_message(1)]
    assert len(records()) == 1


def test_a_dsn_read_from_the_mailbox_bounces_the_recipient(
    make_source, settings, mailbox, smtp_server, run_worker, redis_client, namespace
):
    """End to end: a job sent over SMTP, its DSN delivered to the Graph mailbox, one
    poll later the recipient is bounced and the DSN is in the processed folder."""
    extra = {"smtp": [smtp_server().smtp_section()]}
    app = run_worker(settings(extra=extra))
    source = make_source(extra=extra)
    job_id = Producer(redis_client, namespace=namespace).enqueue(
        Notification(to=["gone@example.org"], subject="Task", text="A task.")
    )
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    report = dsn(
        to=MAILBOX,
        original_message_id=f"<{job_id}@example.com>",
        recipient="gone@example.org",
    )
    mailbox.add(report)

    assert source.poll_once() == 1

    record = app.status.get(job_id)
    assert record is not None
    assert record["recipients"][0]["state"] == "bounced"
    history = [
        orjson.loads(h)
        for h in redis_client.lrange(history_key(namespace, job_id), 0, -1)
    ]
    assert [h["event"] for h in history].count("bounced") == 1
    assert mailbox.contents("mailworker-processed") == [report]


# ---------------------------------------------------------------- the stand-in


def test_the_stand_in_refuses_mailbox_calls_without_immutable_ids(
    fake_microsoft, ca_file, mailbox
):
    """Without Prefer: IdType="ImmutableId" the stand-in answers 400; without a token 401."""
    url = f"{fake_microsoft.url}/v1.0/users/{MAILBOX}/mailFolders/inbox/messages/delta"
    token = fake_microsoft.issue_token()
    plain = requests.get(
        url,
        headers={"Authorization": f"Bearer {token}"},
        verify=str(ca_file),
        timeout=10,
    )
    anonymous = requests.get(
        url, headers={"Prefer": 'IdType="ImmutableId"'}, verify=str(ca_file), timeout=10
    )
    good = requests.get(
        url,
        headers={"Authorization": f"Bearer {token}", "Prefer": 'IdType="ImmutableId"'},
        verify=str(ca_file),
        timeout=10,
    )
    assert plain.status_code == 400
    assert plain.json()["error"]["code"] == "FakeImmutableIdRequired"
    assert anonymous.status_code == 401
    assert good.status_code == 200 and "@odata.deltaLink" in good.json()
