"""The IMAP source against a private Dovecot: TLS modes, login, moves, drops, outages."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import structlog

from producers import Notification, Producer
from settings import ConfigError, Settings
from tests.support.dovecot import NO_MOVE, NO_TLS, NO_UIDPLUS, append, message_ids
from tests.support.env import HOST
from tests.support.helpers import wait_for
from tests.support.mail import dsn
from tests.support.proxy import CuttingProxy
from worker.inbound.handler import Inbound
from worker.inbound.imap import ImapSource, state_key
from worker.inbound.imap_client import ImapError
from worker.inbound.model import Handled, InboundUnavailableError, Received
from worker.inbound.runner import build_inbound

PROCESSED, FAILED = "mailworker-processed", "mailworker-failed"


class Observed:
    """The real handler (``worker.inbound.handler.Inbound``); what it returned is kept."""

    def __init__(self, inbound: Inbound) -> None:
        self.inbound = inbound
        self.calls: list[Handled] = []
        self.raws: list[bytes] = []

    def handle(self, received: Received) -> Handled:
        handled = self.inbound.handle(received)
        self.calls.append(handled)
        self.raws.append(received.raw)
        return handled


def _mail(*, auto: bool = True, size: int = 0) -> tuple[str, bytes]:
    """A message with a fresh Message-ID, padded to about ``size`` bytes of body.

    The handler ignores an auto-reply (processed_folder) and fails a message that is
    neither a bounce nor an auto-reply of ours (failed_folder).
    """
    message_id = f"<{uuid.uuid4().hex}@example.org>"
    body = "I am away until Monday.\r\n" + ("x" * 70 + "\r\n") * (size // 72)
    raw = (
        "From: Bob <bob@example.org>\r\nTo: actions@example.test\r\n"
        f"Subject: Re: [Task 42] Approve?\r\nMessage-ID: {message_id}\r\n"
        + ("Auto-Submitted: auto-replied\r\n" if auto else "")
        + "Date: Tue, 24 Nov 2026 10:20:00 +0000\r\n\r\n"
        + body
    )
    return message_id, raw.encode()


@pytest.fixture
def handler(make_settings, redis_client):
    """The real handler on the test's Redis and namespace."""
    return Observed(build_inbound(make_settings(), redis_client))


@pytest.fixture
def user(dovecot: Any) -> str:
    """A mailbox of this test's own on the session's Dovecot."""
    return str(dovecot.add_user())


@pytest.fixture
def imap_source(make_settings, dovecot, redis_client, namespace, tmp_path):
    """``imap_source(user, sink=…, **keys)``: an ImapSource from a real mailworker.toml."""
    made: list[ImapSource] = []

    def make(
        user: str,
        *,
        sink: Any,
        settings: dict[str, Any] | None = None,
        tokens: Any = None,
        max_per_poll: int = 100,
        **keys: Any,
    ) -> ImapSource:
        """``tokens``: a callable that builds the token provider from the settings."""
        secret = tmp_path / f"imap-password-{len(made)}"
        secret.write_text(dovecot.users[user] + "\n")
        section = {
            "name": "actions-imap", "kind": "imap", "server": HOST,
            "port": dovecot.imap_port, "security": "none", "username": user,
            "password_file": str(secret), "folder": "INBOX",
            "processed_folder": PROCESSED, "failed_folder": FAILED,
            "poll_interval": "1s", "timeout": "10s",
        }  # fmt: skip
        section.update(keys)
        section = {k: v for k, v in section.items() if v is not None}
        loaded: Settings = make_settings(inbound=[section], **(settings or {}))
        source = ImapSource(
            loaded.inbound[0], sink=sink, client=redis_client, namespace=namespace,
            tokens=tokens(loaded) if tokens else None, max_per_poll=max_per_poll,
            backoff=0.05, max_backoff=0.2,
        )  # fmt: skip
        made.append(source)
        return source

    yield make
    for source in made:
        source.close()


@contextlib.contextmanager
def running(source: ImapSource) -> Iterator[threading.Event]:
    """``source.run`` in a thread; stopped and joined on the way out."""
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=15)
        assert not thread.is_alive(), "run() did not end after stop was set"


def _seen(imap: Any, folder: str) -> list[bytes]:
    imap.select(folder, readonly=True)
    _, data = imap.uid("FETCH", "1:*", "(FLAGS)")
    imap.close()
    return [d for d in data if isinstance(d, bytes)]


# ------------------------------------------------------------------ handling and moving


def test_handled_mail_is_moved_to_processed_unread(dovecot, user, imap_source, handler):
    """Appended messages are handed over once each and land in processed_folder, unread."""
    sink = handler
    ids = []
    with dovecot.client(user) as imap:
        for _ in range(2):
            message_id, raw = _mail()
            append(imap, "INBOX", raw)
            ids.append(message_id)
    source = imap_source(user, sink=sink)
    # When
    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 2
    # Then
    assert [h.message_id for h in sink.calls] == ids
    assert all(not h.duplicate for h in sink.calls)
    with dovecot.client(user) as imap:
        assert message_ids(imap, "INBOX") == []
        assert sorted(message_ids(imap, PROCESSED)) == sorted(ids)
        assert message_ids(imap, FAILED) == []  # created, empty
        assert all(b"\\Seen" not in flags for flags in _seen(imap, PROCESSED))
    assert source.poll_once() == 0  # nothing is pending any more
    assert [e["move"] for e in logs if e["event"] == "inbound_source_connected"] == [
        True
    ]


def test_failed_mail_goes_to_failed_folder_with_a_non_ascii_name(
    dovecot, user, imap_source, handler
):
    """A message the sink fails goes to failed_folder, here one named in modified UTF-7."""
    sink = handler
    good_id, good = _mail()
    bad_id, bad = _mail(auto=False)
    with dovecot.client(user) as imap:
        append(imap, "INBOX", good)
        append(imap, "INBOX", bad)
    source = imap_source(user, sink=sink, failed_folder="Fehlgeschlagen ü")
    assert source.poll_once() == 2
    with dovecot.client(user) as imap:
        assert message_ids(imap, PROCESSED) == [good_id]
        assert message_ids(imap, '"Fehlgeschlagen &APw-"') == [bad_id]


def test_existing_folders_are_kept(dovecot, user, imap_source, handler):
    """Folders that already exist (ALREADYEXISTS) keep their mail; a new session works."""
    with dovecot.client(user) as imap:
        kept_id, kept = _mail()
        append(imap, PROCESSED, kept)
        append(imap, FAILED, _mail()[1])
        message_id, raw = _mail()
        append(imap, "INBOX", raw)
    assert imap_source(user, sink=handler).poll_once() == 1
    with dovecot.client(user) as imap:
        assert sorted(message_ids(imap, PROCESSED)) == sorted([kept_id, message_id])


def test_a_missing_source_folder_is_a_clear_error(user, imap_source, handler):
    """A folder that does not exist is named in the error; nothing is created for it."""
    source = imap_source(user, sink=handler, folder="no-such-folder")
    with pytest.raises(
        ImapError, match=r"inbound\[actions-imap\]: (STATUS|SELECT) no-such-folder"
    ):
        source.poll_once()


def test_an_idle_poll_is_one_status_command(dovecot, user, imap_source, handler):
    """With UNSELECT, a poll of an empty folder sends STATUS alone; mail still comes."""
    proxy = CuttingProxy(dovecot.imap_port)
    proxy.start()
    try:
        source = imap_source(user, sink=handler, port=proxy.port)
        try:
            assert source.poll_once() == 0  # connects, logs in, makes the folders
            before = len(proxy.commands())
            for _ in range(3):
                assert source.poll_once() == 0
            idle = proxy.commands()[before:]
            message_id, raw = _mail()
            with dovecot.client(user) as imap:
                append(imap, "INBOX", raw)
            assert source.poll_once() == 1
            busy = proxy.commands()[before + len(idle) :]
        finally:
            source.close()
    finally:
        proxy.stop()
    assert [c.split()[1] for c in idle] == ["STATUS"] * 3
    verbs = [" ".join(c.split()[1:3]).upper() for c in busy]
    assert verbs[0].startswith("STATUS") and verbs[-1] == "UNSELECT"
    assert any(v.startswith("SELECT") for v in verbs)
    assert "UID MOVE" in verbs
    assert [h.message_id for h in handler.calls] == [message_id]


def test_work_per_poll_is_bounded(dovecot, user, imap_source, handler):
    """With max_per_poll = 3, five messages take two polls, oldest first."""
    with dovecot.client(user) as imap:
        ids = []
        for _ in range(5):
            message_id, raw = _mail()
            append(imap, "INBOX", raw)
            ids.append(message_id)
    sink = handler
    source = imap_source(user, sink=sink, max_per_poll=3)
    assert source.poll_once() == 3
    assert source.poll_once() == 2
    assert [h.message_id for h in sink.calls] == ids


def test_a_dsn_read_over_imap_bounces_the_recipient_of_a_real_job(
    dovecot,
    user,
    imap_source,
    make_settings,
    smtp_server,
    run_worker,
    redis_client,
    namespace,
):
    """End to end: a job is sent, its DSN arrives by IMAP, the recipient is bounced."""
    settings = make_settings(smtp=[smtp_server().smtp_section()])
    app = run_worker(settings)
    job_id = Producer(redis_client, namespace=namespace).enqueue(
        Notification(to="gone@example.org", subject="Task assigned", text="A task.")
    )
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    bounce = dsn(
        to="actions@example.test",
        original_message_id=f"<{job_id}@example.com>",
        recipient="gone@example.org",
    )
    with dovecot.client(user) as imap:
        append(imap, "INBOX", bounce)
    sink = Observed(build_inbound(settings, redis_client))
    # When
    assert imap_source(user, sink=sink).poll_once() == 1
    # Then
    [handled] = sink.calls
    assert (handled.kind, handled.outcome, handled.job_id) == (
        "bounce",
        "bounced",
        job_id,
    )
    record = app.status.get(job_id)
    assert record is not None
    [gone] = record["recipients"]
    assert (gone["state"], gone["code"]) == ("bounced", "5.1.1")
    with dovecot.client(user) as imap:
        assert len(message_ids(imap, PROCESSED)) == 1


# ------------------------------------------------------------------ TLS and login


def test_starttls_with_the_ca_bundle(dovecot, user, imap_source, ca_file, handler):
    """security = "starttls" upgrades the plain port and verifies against ca_bundle."""
    with dovecot.client(user) as imap:
        append(imap, "INBOX", _mail()[1])
    source = imap_source(
        user, sink=handler, security="starttls", ca_bundle=str(ca_file)
    )
    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 1
    [connected] = [e for e in logs if e["event"] == "inbound_source_connected"]
    assert connected["tls"].startswith("STARTTLS, TLSv1.")
    assert "certificate verified" in connected["tls"]


def test_implicit_tls_with_the_ca_bundle(dovecot, user, imap_source, ca_file, handler):
    """security = "tls" speaks TLS from the first byte (IMAPS)."""
    with dovecot.client(user) as imap:
        append(imap, "INBOX", _mail()[1])
    source = imap_source(
        user,
        sink=handler,
        security="tls",
        port=dovecot.imaps_port,
        ca_bundle=str(ca_file),
    )
    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 1
    [connected] = [e for e in logs if e["event"] == "inbound_source_connected"]
    assert connected["tls"].startswith("implicit TLS, TLSv1.")


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_an_untrusted_certificate_is_refused(
    dovecot, user, imap_source, security, handler
):
    """Without the CA in ca_bundle, both TLS modes refuse the server, naming why."""
    port = dovecot.imaps_port if security == "tls" else dovecot.imap_port
    sink = handler
    with dovecot.client(user) as imap:
        append(imap, "INBOX", _mail()[1])
    source = imap_source(user, sink=sink, security=security, port=port)
    with pytest.raises(ImapError) as caught:
        source.poll_once()
    assert str(caught.value).startswith(
        f"inbound[actions-imap]: TLS failed at {HOST}:{port}: certificate not trusted"
    )
    assert sink.calls == []


def test_verify_certificates_false_accepts_the_certificate(
    dovecot, user, imap_source, handler
):
    """verify_certificates = false connects to a server no CA vouches for, and says so."""
    source = imap_source(
        user,
        sink=handler,
        security="tls",
        port=dovecot.imaps_port,
        verify_certificates=False,
    )
    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 0
    [connected] = [e for e in logs if e["event"] == "inbound_source_connected"]
    assert "certificate NOT verified" in connected["tls"]


def test_starttls_not_offered_is_refused_before_login(
    dovecot, user, imap_source, handler
):
    """A server without STARTTLS is refused: nothing, not even the login, goes in clear."""
    source = imap_source(user, sink=handler, server=NO_TLS, security="starttls")
    with pytest.raises(ImapError) as caught:
        source.poll_once()
    assert str(caught.value) == (
        f"inbound[actions-imap]: {NO_TLS}:{dovecot.imap_port} does not offer STARTTLS; "
        "nothing is sent in plaintext (security = starttls)"
    )
    assert f"user=<{user}>" not in dovecot.log.read_text()  # no login was tried


def test_a_wrong_password_is_a_clear_error_without_the_password(
    user, imap_source, tmp_path, handler
):
    """A refused login names source, server and the server's words, never the password."""
    wrong = "Wr0ng-" + uuid.uuid4().hex
    source = imap_source(user, sink=handler, password=wrong, password_file=None)
    with structlog.testing.capture_logs() as logs, running(source):
        wait_for(lambda: any(e["event"] == "inbound_source_failed" for e in logs))
    failed = next(e for e in logs if e["event"] == "inbound_source_failed")
    assert failed["error"].startswith(
        f"inbound[actions-imap]: login refused at {HOST}:"
    )
    assert "AUTHENTICATIONFAILED" in failed["error"]
    assert wrong not in repr(logs) and wrong not in repr(source)


# ------------------------------------------------------------------ without MOVE


def test_without_move_copy_then_uid_expunge(dovecot, user, imap_source, handler):
    """A server without MOVE gets COPY, \\Deleted and UID EXPUNGE of that message alone."""
    message_id, raw = _mail()
    with dovecot.client(user) as imap:
        append(imap, "INBOX", raw)
        other_uid = append(imap, "INBOX", _mail()[1])
        imap.select("INBOX")
        imap.uid("STORE", str(other_uid), "+FLAGS.SILENT", r"(\Deleted)")
        # LOGOUT, not CLOSE: CLOSE would expunge it
    sink = handler
    source = imap_source(user, sink=sink, server=NO_MOVE)
    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 1
    assert [e["move"] for e in logs if e["event"] == "inbound_source_connected"] == [
        False
    ]
    with dovecot.client(user) as imap:
        assert message_ids(imap, PROCESSED) == [message_id]
        # Only our message was expunged: the one a person flagged is still there.
        assert len(message_ids(imap, "INBOX")) == 1
    assert [h.message_id for h in sink.calls] == [message_id]


def test_without_uidplus_the_copied_message_stays_flagged_and_is_not_repeated(
    dovecot, user, imap_source, handler
):
    """Without UIDPLUS the copied message keeps \\Deleted and later polls skip it."""
    message_id, raw = _mail()
    with dovecot.client(user) as imap:
        append(imap, "INBOX", raw)
    sink = handler
    source = imap_source(user, sink=sink, server=NO_UIDPLUS)
    assert source.poll_once() == 1
    assert source.poll_once() == 0
    with dovecot.client(user) as imap:
        assert message_ids(imap, PROCESSED) == [message_id]
        assert b"\\Deleted" in _seen(imap, "INBOX")[0]
    assert len(sink.calls) == 1


# ------------------------------------------------------------------ state and faults


def test_a_new_uidvalidity_is_noticed_and_kept(
    dovecot, user, imap_source, redis_client, namespace, handler
):
    """A folder deleted and re-made under a kept session: reconnect, note it, handle it."""
    with dovecot.client(user) as imap:
        imap.create("requests")
    sink = handler
    source = imap_source(user, sink=sink, folder="requests")
    assert source.poll_once() == 0
    key = state_key(namespace, "actions-imap")
    before = int(redis_client.hget(key, "uidvalidity"))
    # Given the folder is re-created while the source keeps its session
    message_id, raw = _mail()
    with dovecot.client(user) as imap:
        assert imap.delete("requests")[0] == "OK"
        append(imap, "requests", raw)
    # When
    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 1
    # Then
    after = int(redis_client.hget(key, "uidvalidity"))
    assert after != before
    [changed] = [e for e in logs if e["event"] == "inbound_uidvalidity_changed"]
    assert (changed["old"], changed["new"], changed["folder"]) == (
        before,
        after,
        "requests",
    )
    assert [h.message_id for h in sink.calls] == [message_id]


def test_a_connection_dropped_mid_fetch_is_reconnected_and_handled_once(
    dovecot, user, imap_source, handler
):
    """The server's FETCH reply is cut: run() reconnects and the message is handled once."""
    message_id, raw = _mail(size=20_000)
    with dovecot.client(user) as imap:
        append(imap, "INBOX", raw)
    proxy = CuttingProxy(dovecot.imap_port)
    proxy.cut_reply(b"BODY[] {", after=500)
    proxy.start()
    sink = handler
    try:
        source = imap_source(user, sink=sink, port=proxy.port)
        with structlog.testing.capture_logs() as logs, running(source):
            wait_for(lambda: sink.calls)
            with dovecot.client(user) as imap:
                wait_for(lambda: message_ids(imap, PROCESSED) == [message_id])
    finally:
        proxy.stop()
    assert proxy.cuts == 1
    assert [(h.message_id, h.duplicate) for h in sink.calls] == [(message_id, False)]
    assert sink.raws == [raw]  # the whole message, not the part before the cut
    [failed] = [e for e in logs if e["event"] == "inbound_source_failed"]
    assert "failed during UID FETCH 1: " in failed["error"]


def test_a_drop_between_handling_and_moving_is_a_duplicate_then_moved(
    dovecot, user, imap_source, handler
):
    """Cut as MOVE is sent: the message is fetched again, found a duplicate, then moved."""
    message_id, raw = _mail()
    with dovecot.client(user) as imap:
        append(imap, "INBOX", raw)
    proxy = CuttingProxy(dovecot.imap_port)
    proxy.cut_request(b"UID MOVE")
    proxy.start()
    sink = handler
    try:
        source = imap_source(user, sink=sink, port=proxy.port)
        with pytest.raises(ImapError, match="failed during UID MOVE 1: "):
            source.poll_once()
        assert source.poll_once() == 1
    finally:
        proxy.stop()
    assert [(h.message_id, h.duplicate) for h in sink.calls] == [
        (message_id, False),
        (message_id, True),
    ]
    with dovecot.client(user) as imap:
        assert message_ids(imap, PROCESSED) == [message_id]
        assert message_ids(imap, "INBOX") == []


def test_redis_away_at_handling_leaves_the_message_in_the_folder(
    dovecot, user, imap_source, make_settings, private_redis
):
    """The handler's Redis is down: nothing is recorded or moved until it is back."""
    records = redis.Redis.from_url(private_redis.url)
    sink = Observed(build_inbound(make_settings(), records))
    message_id, raw = _mail()
    with dovecot.client(user) as imap:
        append(imap, "INBOX", raw)
    source = imap_source(user, sink=sink)
    # Given Redis stopped
    private_redis.stop()
    # When
    with pytest.raises(InboundUnavailableError):
        source.poll_once()
    # Then
    with dovecot.client(user) as imap:
        assert message_ids(imap, "INBOX") == [message_id]
        assert message_ids(imap, PROCESSED) == []
    # When Redis is back
    private_redis.start()
    assert source.poll_once() == 1
    assert [(h.message_id, h.duplicate) for h in sink.calls] == [(message_id, False)]
    with dovecot.client(user) as imap:
        assert message_ids(imap, PROCESSED) == [message_id]
    records.close()


# ------------------------------------------------------------------ XOAUTH2


def test_xoauth2_logs_in_with_an_outlook_scoped_app_token(
    dovecot, imap_source, fake_microsoft, ca_file, handler
):
    """auth = "xoauth2" asks the service account for an Outlook token and sends it."""
    from worker.transports.oauth import HttpClient, TokenProvider

    token = "fake-at-" + uuid.uuid4().hex
    fake_microsoft.token_responses.append(
        (200, None, {"token_type": "Bearer", "expires_in": 3599, "access_token": token})
    )
    user = dovecot.add_user(password=token)  # Dovecot checks the bearer like a password
    with dovecot.client(user) as imap:
        append(imap, "INBOX", _mail()[1])
    services = {"graph-mailer": {
        "account_type": "service", "tenant_id": fake_microsoft.tenant,
        "client_id": fake_microsoft.client_id,
        "client_secret": fake_microsoft.client_secret,
        "authority_host": fake_microsoft.url, "ca_bundle": str(ca_file),
    }}  # fmt: skip

    def tokens(settings: Settings) -> TokenProvider:
        svc = settings.integrated_services["graph-mailer"]
        return TokenProvider(
            "graph-mailer", svc, HttpClient(verify=str(ca_file), timeout=10)
        )

    source = imap_source(
        user, sink=handler, settings={"integrated_services": services},
        tokens=tokens, auth="xoauth2", integrated_service="graph-mailer",
        password_file=None,
    )  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        assert source.poll_once() == 1
    assert [r["scope"] for r in fake_microsoft.token_requests] == [
        "https://outlook.office365.com/.default"
    ]
    assert token not in repr(logs)


# ------------------------------------------------------------------ configuration


def test_an_unreadable_password_file_fails_at_construction(
    user, imap_source, tmp_path, handler
):
    """A password_file that cannot be read is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=r"inbound\[actions-imap\]\.password_file"):
        imap_source(user, sink=handler, password_file=str(tmp_path / "absent"))
