"""The /ops/ console over real HTTP: sessions, CSRF, escaping, ids, the pages' contents."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from common.keys import minute_counts_key
from producers import Notification, Producer
from tests.support.console import Visitor, serve_console
from tests.support.helpers import wait_for, wire_enqueue
from worker.api.keys import ApiKeys
from worker.broker.heartbeats import beat
from worker.deadletter import DeadLetters
from worker.inbound.suppression import SuppressionList
from worker.limits import Breaker

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
def console(make_settings, redis_client, redis_url) -> Iterator[tuple[str, object]]:
    """The console on a real server, for a namespace with no worker."""
    settings = make_settings(api={"session_ttl": "1h"})
    with serve_console(settings, redis_client) as base:
        yield base, settings


@pytest.fixture
def visitor(console) -> Iterator[Visitor]:
    person = Visitor(console[0])
    yield person
    person.close()


@pytest.fixture
def ops_key(redis_client, namespace) -> str:
    return ApiKeys(redis_client, namespace).create("oncall", ["ops", "read"])[1]


def _sessions(redis_client, namespace) -> list[bytes]:
    return list(redis_client.scan_iter(match=f"{namespace}:console:session:*"))


def test_login_sets_a_strict_session_cookie_and_logout_ends_it(
    visitor, ops_key, redis_client, namespace
):
    """An ops key logs in (Secure, HttpOnly, SameSite=Strict cookie under /ops, kept in
    Redis for session_ttl); logout deletes the session, so the old cookie is refused."""
    assert visitor.get("/").headers["location"] == "/ops/login"
    response = visitor.login(ops_key)
    assert response.status_code == 303 and response.headers["location"] == "/ops/"
    [cookie] = [
        c for c in response.headers.get_list("set-cookie") if "mailworker_ops=" in c
    ]
    for attribute in ("Secure", "HttpOnly", "SameSite=strict", "Path=/ops"):
        assert attribute in cookie
    [key] = _sessions(redis_client, namespace)
    assert 3500 < redis_client.ttl(key) <= 3600
    overview = visitor.get("/")
    assert (
        overview.status_code == 200 and "key <strong>oncall</strong>" in overview.text
    )
    assert ops_key not in overview.text
    assert 'href="/ops/" aria-current="page"' in overview.text
    assert 'href="/ops/letters/" aria-current' not in overview.text
    stolen = dict(visitor.cookies)
    assert visitor.post("/logout").headers["location"] == "/ops/login"
    assert _sessions(redis_client, namespace) == []
    visitor.cookies = stolen  # the cookie kept from before: its session is gone
    assert visitor.get("/").status_code == 303


def test_wrong_keys_are_refused_without_naming_any(visitor, redis_client, namespace):
    """An unknown key → 401, a key without ops → 403 saying so; no key name is shown."""
    keys = ApiKeys(redis_client, namespace)
    _, sender = keys.create("billing-sender", ["send", "read"])
    unknown = visitor.login("mwk_" + "A" * 43)
    assert unknown.status_code == 401 and "not a valid API key" in unknown.text
    wrong = visitor.login(sender)
    assert wrong.status_code == 403 and "does not carry the ops scope" in wrong.text
    for page in (unknown, wrong):
        assert "billing-sender" not in page.text and sender not in page.text
    assert "mailworker_ops" not in visitor.cookies
    assert _sessions(redis_client, namespace) == []


def test_forged_and_expired_sessions_are_refused(
    visitor, ops_key, redis_client, namespace
):
    """A cookie with a changed id or signature, or one whose session expired in Redis,
    leads to the login form."""
    visitor.login(ops_key)
    good = visitor.cookies["mailworker_ops"]
    session_id, signature = good.split(".")
    forgeries = [
        f"{session_id[:-1]}{'A' if session_id[-1] != 'A' else 'B'}.{signature}",
        f"{session_id}.{signature[:-2]}xx",
        session_id,
        "x" * 5000,
        f"{good}.{signature}",
    ]
    for forged in forgeries:
        visitor.cookies["mailworker_ops"] = forged
        assert visitor.get("/letters/").headers.get("location") == "/ops/login"
    visitor.cookies["mailworker_ops"] = good
    assert visitor.get("/letters/").status_code == 200
    [key] = _sessions(redis_client, namespace)
    redis_client.pexpire(key, 1)  # Redis's own expiry, shortened
    wait_for(lambda: not redis_client.exists(key))
    assert visitor.get("/letters/").headers.get("location") == "/ops/login"


def test_a_revoked_key_ends_its_sessions_at_the_next_request(
    visitor, ops_key, redis_client, namespace
):
    """Revoking the key (or revoking it and creating another of the same name) ends the
    session it opened."""
    keys = ApiKeys(redis_client, namespace)
    visitor.login(ops_key)
    assert visitor.get("/").status_code == 200
    keys.revoke("oncall")
    keys.create("oncall", ["ops"])  # same name, another key
    assert visitor.get("/").headers.get("location") == "/ops/login"
    assert _sessions(redis_client, namespace) == []


def _dead_letter(redis_client, namespace, app=None) -> str:
    """A job that fails validation in a real worker: dead with reason `validation`."""
    job = {"to": ["nope"], "subject": HOSTILE, "text": "t"}
    return wire_enqueue(redis_client, namespace, job)


@pytest.fixture
def hostile_letters(smtp_server, make_settings, run_worker, redis_client, namespace):
    """Two dead letters made by a real worker: one refused by an SMTP server whose reply
    carries HTML, one invalid; both with HTML in the subject."""
    server = smtp_server()
    server.recorder.rcpt_replies["gone@example.org"] = f"550 5.1.1 {HOSTILE}"
    settings = make_settings(
        smtp=[server.smtp_section()], retry={"max_attempts": 1, "min_backoff": "1s"}
    )
    app = run_worker(settings)
    refused = Producer(redis_client, namespace=namespace).enqueue(
        Notification(to=["gone@example.org"], subject=HOSTILE, text="hello")
    )
    invalid = _dead_letter(redis_client, namespace)
    app.broker.join("mail", timeout=10_000)
    store = DeadLetters(redis_client, namespace=namespace, ttl=3600)
    wait_for(lambda: len(store.entries(store_filters())) == 2)
    return refused, invalid, server, app


def store_filters():
    from worker.deadletter import Filters

    return Filters()


def test_html_in_subjects_and_errors_is_shown_as_text(
    hostile_letters, visitor, ops_key
):
    """A subject and an SMTP error holding HTML and script appear escaped on every page."""
    refused, invalid, *_ = hostile_letters
    visitor.login(ops_key)
    listing = visitor.get("/letters/")
    assert refused in listing.text and invalid in listing.text
    pages = [
        listing,
        visitor.get(f"/letters/{refused}"),
        visitor.get(f"/letters/{invalid}"),
    ]
    pages.append(visitor.get(f"/letters/{refused}/requeue"))
    for response in pages:
        assert response.status_code == 200
        assert "<script>" not in response.text and "<img" not in response.text
    assert "&lt;script&gt;alert(" in pages[1].text  # the SMTP reply, as text
    assert "retries_exhausted" in pages[1].text or "permanent" in pages[1].text


def test_csrf_tokens_guard_every_change(
    hostile_letters, visitor, ops_key, redis_client, namespace
):
    """Requeue, purge, requeue by filter, suppression removal and logout without the
    token, or with a wrong one, are refused 403 and change nothing."""
    refused, invalid, *_ = hostile_letters
    SuppressionList(redis_client, namespace=namespace).add(
        "x@example.org", reason="bounce"
    )
    visitor.login(ops_key)
    good = visitor.token
    changes = [
        (f"/letters/{refused}/requeue", {}),
        (f"/letters/{invalid}/purge", {}),
        ("/letters/requeue", {"before": str(time.time() + 60)}),
        ("/suppressed/remove", {"address": "x@example.org"}),
        ("/logout", {}),
    ]
    for path, form in changes:
        for token in (None, "0" * 128, good[:-4] + "abcd"):
            data = dict(form) if token is None else {**form, "_csrf_token": token}
            response = visitor.post(path, data, token=False)
            assert response.status_code == 403, path
            assert "token is missing or wrong" in response.text
    store = DeadLetters(redis_client, namespace=namespace, ttl=3600)
    assert {e[0] for e in store.entries(store_filters())} == {refused, invalid}
    assert SuppressionList(redis_client, namespace=namespace).size() == 1
    assert visitor.get("/").status_code == 200  # still logged in
    # A login without the token is refused as well (a forged login form)
    other = Visitor(visitor.base)
    assert other.post("/login", {"key": ops_key}, token=False).status_code == 403
    other.close()


@pytest.mark.parametrize(
    "path",
    [
        "/letters/..%2F..%2Fetc%2Fpasswd",
        "/letters/%2e%2e",
        "/letters/a%0aHSET",
        "/letters/*",
        "/letters/x%00y",
        "/jobs/..%2F*",
        "/letters/" + "a" * 300,
    ],
)
def test_path_tricks_in_ids_find_nothing(visitor, ops_key, path):
    """Ids with slashes, dots, newlines, NULs, globs or too many characters are no
    dead letter: 404, and a POST to them changes nothing."""
    visitor.login(ops_key)
    response = visitor.get(path)
    assert response.status_code == 404 and "There is no such page" in response.text
    assert visitor.post(path + "/purge").status_code in (404, 405)


def test_requeue_and_purge_one_after_confirming(
    hostile_letters, visitor, ops_key, redis_client, namespace
):
    """Requeue asks first, then puts the job back and the worker delivers it (its status
    page says sent); an invalid job is refused with the reason; purge asks first."""
    refused, invalid, server, app = hostile_letters
    server.recorder.rcpt_replies.clear()  # the mailbox exists again
    visitor.login(ops_key)
    confirm = visitor.get(f"/letters/{refused}/requeue")
    assert confirm.status_code == 200
    assert f'action="/ops/letters/{refused}/requeue"' in confirm.text
    done = visitor.post(f"/letters/{refused}/requeue")
    assert done.status_code == 303
    assert done.headers["location"] == f"/ops/jobs/{refused}?requeued=1"
    app.broker.join("mail", timeout=10_000)
    store = DeadLetters(redis_client, namespace=namespace, ttl=3600)
    assert store.show(refused) is None
    assert [m.rcpt_tos for m in server.recorder.messages] == [["gone@example.org"]]
    job = visitor.get(f"/jobs/{refused}", requeued="1")
    assert job.status_code == 200 and "the job is on its queue again" in job.text
    assert "<dt>State</dt><dd>sent</dd>" in job.text
    visitor.get(f"/letters/{invalid}/requeue")
    bad = visitor.post(f"/letters/{invalid}/requeue")
    assert bad.status_code == 409 and "Requeue refused" in bad.text
    assert "to[0]" in bad.text
    visitor.get(f"/letters/{invalid}/purge")
    gone = visitor.post(f"/letters/{invalid}/purge")
    assert gone.status_code == 303 and store.show(invalid) is None
    assert "was purged" in visitor.get("/letters/", done="purged").text


def test_filters_paging_and_requeue_by_filter(
    visitor, ops_key, redis_client, namespace, make_settings, run_worker, smtp_server
):
    """The list filters as `dead list` does and pages by 50; requeue by filter says how
    many match, then requeues those alone, none that died after the confirmation."""
    settings = make_settings(smtp=[smtp_server().smtp_section()])
    app = run_worker(settings)
    invalid = [_dead_letter(redis_client, namespace) for _ in range(55)]
    app.broker.join("mail", timeout=10_000)
    store = DeadLetters(redis_client, namespace=namespace, ttl=3600)
    wait_for(lambda: len(store.entries(store_filters())) == 55)
    visitor.login(ops_key)
    first = visitor.get("/letters/", reason="validation")
    assert "55 dead letter(s) match" in first.text and "page 1 of 2" in first.text
    second = visitor.get("/letters/", reason="validation", page="2")
    shown = [i for i in invalid if i in first.text] + [
        i for i in invalid if i in second.text
    ]
    assert sorted(shown) == sorted(invalid)
    assert "0 dead letter(s) match" in visitor.get("/letters/", reason="expired").text
    assert "0 dead letter(s) match" in visitor.get("/letters/", service="nowhere").text
    bad = visitor.get("/letters/", since="yesterday-ish")
    assert bad.status_code == 400 and "since: a duration" in bad.text
    confirm = visitor.get("/letters/requeue", reason="validation", since="1h")
    assert "<strong>55</strong> dead letter(s) match" in confirm.text
    late = _dead_letter(redis_client, namespace)  # dies after the confirmation page
    app.broker.join("mail", timeout=10_000)
    wait_for(lambda: len(store.entries(store_filters())) == 56)
    result = visitor.post(
        "/letters/requeue",
        {"reason": "validation", "since": "1h", "before": visitor_before(confirm.text)},
    )
    # Invalid jobs cannot be requeued: each is refused with its reason, none is lost
    assert "0 requeued, 55 refused" in result.text and late not in result.text
    assert {e[0] for e in store.entries(store_filters())} == {*invalid, late}


def visitor_before(page: str) -> str:
    import re

    return re.search(r'name="before" value="([^"]+)"', page).group(1)


def test_overview_shows_queues_workers_breakers_and_the_last_hour(
    smtp_server, make_settings, run_worker, redis_client, namespace, redis_url
):
    """Queue depths, a host's live worker, an open breaker and the minute's outcomes
    (counted by the status script as real deliveries end) are on the overview."""
    server = smtp_server()
    server.recorder.rcpt_replies["gone@example.org"] = "550 5.1.1 No such user"
    settings = make_settings(
        smtp=[server.smtp_section()], retry={"max_attempts": 1, "min_backoff": "1s"}
    )
    app = run_worker(settings)
    producer = Producer(redis_client, namespace=namespace)
    for address in ("a@example.org", "b@example.org", "gone@example.org"):
        producer.enqueue(Notification(to=[address], subject="s", text="t"))
    app.broker.join("mail", timeout=10_000)
    minute = int(time.time() // 60)
    counts = wait_for(
        lambda: {
            k.decode(): int(v)
            for m in (minute - 1, minute)
            for k, v in redis_client.hgetall(minute_counts_key(namespace, m)).items()
        }
    )
    Breaker(redis_client, namespace, failures=1, cooldown=300).failure("primary")
    beat(redis_client, namespace, "console-test-host", "broker-1", timeout=15)
    with serve_console(settings, redis_client) as base:
        person = Visitor(base)
        person.login(ApiKeys(redis_client, namespace).create("o", ["ops"])[1])
        page = person.get("/").text
        person.close()
    assert counts.get("sent") == 2 and counts.get("dead") == 1
    summary = page[page.index("Per minute") : page.index("<figure")]
    assert "2 sent" in summary and "1 dead" in summary, summary
    assert 'class="badge open">open' in page  # the primary service's breaker
    assert "Host console-test-host: 1 of 1 process(es) alive" in page
    assert "<svg" in page and 'role="img"' in page


def test_overview_counts_what_waits_on_each_queue(
    visitor, ops_key, redis_client, namespace
):
    """Messages nobody has fetched yet show as ready on their priority's row; jobs
    waiting for their time (or a long retry) show as scheduled, and a scheduled job's
    page says when it goes."""
    send_at = datetime.now(UTC) + timedelta(hours=1)
    later = Notification(to=["z@example.org"], subject="s", text="t", send_at=send_at)
    job_id = Producer(redis_client, namespace=namespace).enqueue(later)
    for _ in range(2):
        wire_enqueue(
            redis_client, namespace, {"to": ["x@example.org"]}, queue="mail-bulk"
        )
    wire_enqueue(redis_client, namespace, {"to": ["y@example.org"]}, queue="mail-high")
    visitor.login(ops_key)
    page = visitor.get("/").text
    row = '<th scope="row">{}</th><td>{}</td><td class="n">{}</td><td class="n">0</td>'
    assert row.format("bulk", "mail-bulk", 2) in page
    assert row.format("high", "mail-high", 1) in page
    assert row.format("normal", "mail", 0) in page
    assert "No worker process has beaten in the last day." in page
    assert "<strong>1 scheduled</strong>: jobs with a send time, and retries" in page
    job = visitor.get(f"/jobs/{job_id}").text
    assert "<dt>State</dt><dd>scheduled</dd>" in job
    assert f"<dt>Send at</dt><dd>{send_at.isoformat(timespec='milliseconds')}" in job


def test_the_suppression_list_and_removing_an_address(
    visitor, ops_key, redis_client, namespace
):
    """Suppressed addresses are listed (escaped) and one can be taken off the list."""
    listing = SuppressionList(redis_client, namespace=namespace)
    listing.add("kept@example.org", reason="bounce", job_id="job-1")
    listing.add("<b>odd</b>@example.org", reason=HOSTILE)
    visitor.login(ops_key)
    page = visitor.get("/suppressed")
    assert (
        "2 address(es) are suppressed" in page.text and "kept@example.org" in page.text
    )
    assert "<script>" not in page.text and "&lt;b&gt;odd&lt;/b&gt;" in page.text
    done = visitor.post("/suppressed/remove", {"address": "kept@example.org"})
    assert done.status_code == 303
    assert listing.check(["kept@example.org"]) == {}
    assert (
        "kept@example.org is no longer suppressed"
        in visitor.get("/suppressed", removed="kept@example.org").text
    )


def test_pages_forbid_scripts_framing_and_caching(visitor, ops_key):
    """Every page says no script may run, no one may frame it, nothing is cached."""
    for response in (visitor.get("/login"), visitor.get("/nowhere")):
        assert "script-src" not in response.headers["content-security-policy"]
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"


def test_behind_a_proxy_that_strips_its_prefix(make_settings, redis_client, ops_key):
    """Served alone with a root path (``uvicorn --root-path``), links, form actions,
    redirects and the cookie's path carry the prefix the proxy strips."""
    settings = make_settings()
    with serve_console(settings, redis_client, proxied_under="/tools/mail") as base:
        person = Visitor(base)
        assert person.get("/").headers["location"] == "/tools/mail/login"
        form = person.get("/login")
        assert 'action="/tools/mail/login"' in form.text
        assert 'href="/tools/mail/static/console.css"' in form.text
        done = person.post("/login", {"key": ops_key})
        assert done.headers["location"] == "/tools/mail/"
        assert "Path=/tools/mail;" in done.headers["set-cookie"]
        page = person.get("/")
        person.close()
    assert 'href="/tools/mail/letters/"' in page.text


def test_the_status_script_counts_each_change_of_outcome_once(redis_client, namespace):
    """A record that turns retrying, then sent, counts once each; writing sent again,
    or a dead write on a sent job (refused), counts nothing more."""
    from worker.status import StatusStore

    store = StatusStore(redis_client, namespace=namespace, ttl=3600)
    store.write("job-1", {"state": "retrying", "attempts": 1})
    store.write("job-1", {"state": "sent", "attempts": 2})
    store.write("job-1", {"state": "sent", "attempts": 2})
    store.write("job-1", {"state": "dead", "reason": "unhandled"}, dead_payload=b"{}")
    store.write("job-2", {"state": "dead", "reason": "validation"}, dead_payload=b"{}")
    minute = int(time.time() // 60)
    counts: dict[str, int] = {}
    for m in (minute - 1, minute):
        key = minute_counts_key(namespace, m)
        for field, value in redis_client.hgetall(key).items():
            counts[field.decode()] = counts.get(field.decode(), 0) + int(value)
            assert 0 < redis_client.ttl(key) <= 7200
    assert counts == {"retrying": 1, "sent": 1, "dead": 1}
