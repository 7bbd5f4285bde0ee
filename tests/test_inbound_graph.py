"""The Graph inbound source reads a mailbox folder of the Microsoft stand-in with delta
queries, hands each message to a sink, and moves it to the processed or failed folder."""

from __future__ import annotations

import hashlib
import json
import threading
from email import message_from_bytes, policy

import pytest
import requests
import structlog.testing

from tests.support.fake_microsoft import FakeMicrosoft
from tests.support.helpers import wait_for
from worker.inbound.graph import GraphSource
from worker.inbound.model import Handled, InboundUnavailableError, Received
from worker.transports.oauth import HttpClient, TokenProvider

MAILBOX = "actions@contoso.com"


def _message(n: int, *, message_id: str | None = None) -> bytes:
    mid = message_id or f"<reply-{n}@example.org>"
    return (
        f"From: ann@example.org\r\nTo: {MAILBOX}\r\nSubject: Re: task {n}\r\n"
        f"Message-ID: {mid}\r\n\r\nAPPROVE\r\n"
    ).encode()


UNPARSEABLE = b"\x00\xff this is not a message at all"


class RecordingSink:
    """A stand-in for the handler: dedups by Message-ID, fails what has none."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.first: dict[str, Handled] = {}
        self.unavailable = 0  # refuse this many calls with InboundUnavailableError

    def handle(self, received: Received) -> Handled:
        with self.lock:
            self.received.append(received)
            if self.unavailable:
                self.unavailable -= 1
                raise InboundUnavailableError("Redis away")
            mid = message_from_bytes(received.raw, policy=policy.default)["Message-ID"]
            key = mid or hashlib.sha256(received.raw).hexdigest()
            if key in self.first:
                first = self.first[key]
                return Handled(first.key, first.kind, first.outcome, duplicate=True)
            outcome = "ignored" if mid else "failed"
            handled = Handled(key, "other", outcome, message_id=mid)  # type: ignore[arg-type]
            self.first[key] = handled
            return handled


@pytest.fixture
def sink():
    return RecordingSink()


@pytest.fixture
def mailbox(fake_microsoft):
    return fake_microsoft.mailboxes.mailbox(MAILBOX)


@pytest.fixture
def settings(make_settings, fake_microsoft, ca_file):
    """A configuration with the stand-in as the integrated service and one graph source."""

    def make(**source):
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
        )

    return make


@pytest.fixture
def make_source(settings, sink, redis_client, namespace):
    """``make_source(**inbound_keys, options=...)``: a GraphSource over the stand-in."""
    clients: list[HttpClient] = []

    def make(*, options=None, target=None, own_http=False, **source):
        cfg = settings(**source)
        svc = cfg.integrated_services["graph-mailer"]
        http = HttpClient(verify=str(svc.ca_bundle), timeout=10)
        clients.append(http)
        tokens = TokenProvider("graph-mailer", svc, http)
        options = dict(options or {})
        if not own_http:  # else the source builds its own from the service's ca_bundle
            options["http"] = http
        return GraphSource(
            cfg.inbound[0],
            sink=target or sink,
            tokens=tokens,
            service=svc,
            client=redis_client,
            namespace=namespace,
            **options,
        )

    yield make
    for http in clients:
        http.close()


def _ops(fake: FakeMicrosoft, since: int = 0) -> list[str]:
    return [r.op for r in fake.mailboxes.requests()[since:]]


# ---------------------------------------------------------------- handling and moving


def test_new_messages_are_handled_and_moved(make_source, sink, mailbox, fake_microsoft):
    """Each message reaches the sink as raw MIME and is moved to the processed folder,
    which is created once under the top of the mailbox; every call asks for immutable ids."""
    raws = [_message(n) for n in range(3)]
    for raw in raws:
        mailbox.add(raw)
    source = make_source()

    assert source.poll_once() == 3

    assert sorted(r.raw for r in sink.received) == sorted(raws)
    assert {r.source for r in sink.received} == {"o365-actions"}
    assert mailbox.contents("inbox") == []
    assert sorted(mailbox.contents("mailworker-processed")) == sorted(raws)
    assert mailbox.folder("mailworker-failed").parent_id == mailbox.root.id
    requests_seen = fake_microsoft.mailboxes.requests()
    assert [r.op for r in requests_seen].count("folders.create") == 2
    assert all(r.immutable_ids for r in requests_seen)
    assert all(r.status < 400 for r in requests_seen)


def test_unparseable_message_goes_to_the_failed_folder(make_source, mailbox):
    """A message the sink cannot handle (outcome failed) is moved to failed_folder."""
    mailbox.add(UNPARSEABLE)
    mailbox.add(_message(1))

    assert make_source().poll_once() == 2

    assert mailbox.contents("mailworker-failed") == [UNPARSEABLE]
    assert mailbox.contents("mailworker-processed") == [_message(1)]


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


def test_the_next_poll_reads_only_what_is_new(make_source, sink, mailbox):
    """With the stored delta link, a later poll sees only messages that arrived since."""
    mailbox.add(_message(1))
    source = make_source()
    assert source.poll_once() == 1
    mailbox.add(_message(2))

    assert source.poll_once() == 1

    assert [r.raw for r in sink.received] == [_message(1), _message(2)]


@pytest.mark.parametrize(
    ("status", "code"), [(410, "SyncStateNotFound"), (400, "SyncStateInvalid")]
)
def test_expired_delta_token_gives_a_full_resync(
    make_source, sink, mailbox, fake_microsoft, status, code
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
    assert [e["event"] for e in logs].count("inbound_delta_reset") == 1
    assert [r.raw for r in sink.received] == [_message(1), _message(2)]
    assert source.poll_once() == 0  # the new link works


def test_a_link_for_another_folder_is_not_used(make_source, sink, mailbox):
    """When the configured folder changes, the stored delta link (of the old folder) is
    not used: the new folder is read from the start."""
    mailbox.create_folder("Actions")
    mailbox.add(_message(1))
    assert make_source().poll_once() == 1
    mailbox.add(_message(2), folder="Actions")

    assert make_source(folder="Actions").poll_once() == 1

    assert [r.raw for r in sink.received] == [_message(1), _message(2)]


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
    make_source, sink, mailbox, fake_microsoft
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
    assert sink.received == [] and mailbox.contents("inbox") == [_message(1)]
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
    make_source, sink, mailbox, fake_microsoft
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
    assert sorted(sink.first) == sorted(f"<reply-{n}@example.org>" for n in range(24))
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
    make_source, sink, mailbox, fake_microsoft
):
    """A message recorded but not moved (Graph answers 500 to the move) is seen again at
    the next poll, handled as a duplicate, and moved."""
    mailbox.add(_message(1))
    source = make_source()
    fake_microsoft.mailboxes.inject(500, count=1, op="move")

    assert source.poll_once() == 0
    assert mailbox.contents("inbox") == [_message(1)]
    assert list(sink.first) == ["<reply-1@example.org>"]

    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 1

    moved = [e for e in logs if e["event"] == "inbound_message_moved"]
    assert [e["duplicate"] for e in moved] == [True]
    assert len(sink.received) == 2 and len(sink.first) == 1
    assert mailbox.contents("mailworker-processed") == [_message(1)]


def test_a_duplicate_delivered_twice_is_handled_once(make_source, sink, mailbox):
    """The same message delivered twice is handled once; both copies leave the inbox."""
    mailbox.add(_message(1))
    mailbox.add(_message(1))

    with structlog.testing.capture_logs() as logs:
        assert make_source().poll_once() == 2

    moved = [e for e in logs if e["event"] == "inbound_message_moved"]
    assert sorted(e["duplicate"] for e in moved) == [False, True]
    assert len(sink.first) == 1
    assert mailbox.contents("mailworker-processed") == [_message(1)] * 2


def test_an_unrecorded_message_stays_for_the_next_poll(make_source, sink, mailbox):
    """When the sink cannot record (InboundUnavailableError) the message stays in the
    folder and the next poll hands it over again."""
    mailbox.add(_message(1))
    sink.unavailable = 1
    source = make_source()

    assert source.poll_once() == 0
    assert mailbox.contents("inbox") == [_message(1)]

    assert source.poll_once() == 1
    assert mailbox.contents("mailworker-processed") == [_message(1)]


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
