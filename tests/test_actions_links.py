"""Action links (DESIGN §10): a GET shows a page and acts on nothing, a POST acts once.

The worker sends through aiosmtpd; the links come from the delivered messages; the
links app runs under uvicorn on loopback, mounted at /a as `mailworker api` mounts it,
and httpx plays the browser (and the link scanner).
"""

from __future__ import annotations

import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser

import httpx
import orjson
import pytest
import structlog
from litestar import Litestar, asgi
from litestar.types import Receive, Scope, Send

from common.keys import action_key, events_key
from producers import Notification, Producer, close_actions
from settings import ConfigError
from tests.support.env import HOST
from tests.support.helpers import wait_for
from tests.support.http_app import UvicornServer
from tests.support.replies import reply
from worker.actions.web import create_links_app, loggable_path
from worker.inbound.model import Received
from worker.inbound.runner import build_inbound

REPLY = "actions@workflow.example.com"
RECEIVER = {"name": "replies", "kind": "smtp", "accept": [REPLY]}
ACTIONS = [
    {"id": "approve", "label": "Approve"},
    {"id": "reject", "label": "Reject", "comment": "required"},
]
SUBJECT = "Approve <b>invoice</b> 42 – Müller"
HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-robots-tag": "noindex, nofollow",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}
TOKEN = re.compile(r'name="token" value="([^"]+)"')


class _Anchors(HTMLParser):
    """Every ``<a href>`` of an html part; and scripts, forms and their attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "a":
            self.hrefs.append(dict(attrs)["href"])


def _anchors(html: str) -> _Anchors:
    parser = _Anchors()
    parser.feed(html)
    return parser


def _parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


class System:
    """The worker, its SMTP server, and the links app under uvicorn at /a."""

    def __init__(self, settings, app, server, web, producer, client, namespace):
        self.settings, self.app, self.server, self.web = settings, app, server, web
        self.producer, self.client, self.ns = producer, client, namespace

    def send(self, **fields) -> tuple[str, dict[str, EmailMessage]]:
        """Enqueue a notification with actions; the job and each recipient's message."""
        fields.setdefault("to", ["Ann <ann@example.org>"])
        fields.setdefault("cc", ["cy@example.org"])
        fields.setdefault("subject", SUBJECT)
        fields.setdefault("text", "Invoice 42 waits for your approval.\n")
        fields.setdefault("html", "<html><body><p>Invoice 42 waits.</p></body></html>")
        fields.setdefault("actions", ACTIONS)
        fields.setdefault("action_context", {"task": 42, "note": "<script>x</script>"})
        before = len(self.server.recorder.messages)
        job_id = self.producer.enqueue(Notification(**fields))
        wait_for(lambda: (self.app.status.get(job_id) or {}).get("state") == "sent")
        messages = {
            m.rcpt_tos[0]: _parse(m.data)
            for m in self.server.recorder.messages[before:]
        }
        return job_id, messages

    def link(self, message: EmailMessage, action: str) -> str:
        """The action's link, as the html part's button has it."""
        html = message.get_body(("html",)).get_content()
        [href] = [h for h in _anchors(html).hrefs if h.endswith(f"/{action}")]
        return href

    def key(self, message: EmailMessage) -> str:
        address = message["Reply-To"].addresses[0].addr_spec
        return address.split("+", 1)[1].split("@", 1)[0]

    def record(self, key: str) -> dict[str, str]:
        raw = self.client.hgetall(action_key(self.ns, key))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def events(self) -> list[dict]:
        out = []
        for _, fields in self.client.xrange(events_key(self.ns)):
            event = {k.decode(): v.decode() for k, v in fields.items()}
            if event["type"].startswith("action."):
                event["data"] = orjson.loads(event["data"])
                out.append(event)
        return out

    def browser(self) -> httpx.Client:
        """A browser on the page's own origin: it sends what a form POST sends."""
        return httpx.Client(
            headers={"Origin": self.web.url, "Sec-Fetch-Site": "same-origin"},
            timeout=10,
        )

    def open(self, url: str, client: httpx.Client | None = None) -> tuple[str, str]:
        """GET the page as the recipient's browser does: its html and form token."""
        page = (client or httpx).get(url, timeout=10)
        assert page.status_code == 200, page.text
        return page.text, TOKEN.search(page.text).group(1)


@pytest.fixture
def system(smtp_server, make_settings, run_worker, redis_client, namespace):
    """``system(**email_actions)``: everything running, with links_base_url set."""
    servers: list[UvicornServer] = []

    def start(**options) -> System:
        server = smtp_server()
        web = UvicornServer()
        servers.append(web)
        settings = make_settings(
            smtp=[server.smtp_section()],
            inbound=[RECEIVER],
            email_actions={
                "enabled": True,
                "reply_address": REPLY,
                "links_base_url": web.url,
                **options,
            },
        )
        app = run_worker(settings)
        links = create_links_app(settings, redis_client)

        @asgi("/a", is_mount=True, copy_scope=True)
        async def mounted(scope: Scope, receive: Receive, send: Send) -> None:
            await links(scope, receive, send)

        web.start(Litestar(route_handlers=[mounted]))
        producer = Producer(redis_client, namespace=namespace, email_actions=True)
        return System(settings, app, server, web, producer, redis_client, namespace)

    yield start
    for web in servers:
        web.stop()


def test_each_action_is_a_link_beside_its_mailto_with_links_base_url(system):
    """With links_base_url each button is <base>/a/<key>/<action> and the mailto
    replies stay, in html and text, each recipient with its own key."""
    s = system()
    _, messages = s.send()
    for message in messages.values():
        key = s.key(message)
        html = message.get_body(("html",)).get_content()
        anchors = _anchors(html)
        assert not [t for t, _ in anchors.tags if t == "script"]
        links = [h for h in anchors.hrefs if h.startswith("http")]
        mailtos = [h for h in anchors.hrefs if h.startswith("mailto:")]
        assert links == [f"{s.web.url}/a/{key}/approve", f"{s.web.url}/a/{key}/reject"]
        assert len(mailtos) == 2 and all(f"actions+{key}@" in m for m in mailtos)
        text = message.get_body(("plain",)).get_content()
        assert [f"<{u}>" in text for u in links] == [True, True]
        assert text.count("<mailto:actions+" + key) == 2
        assert all(len(u) < 300 for u in links)
    assert s.key(messages["ann@example.org"]) != s.key(messages["cy@example.org"])


def test_without_links_base_url_a_message_has_no_web_link(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """Without links_base_url the actions are mailto replies only."""
    server = smtp_server()
    plain = make_settings(
        smtp=[server.smtp_section()],
        inbound=[RECEIVER],
        email_actions={"enabled": True, "reply_address": REPLY},
    )
    app = run_worker(plain)
    job_id = Producer(redis_client, namespace=namespace, email_actions=True).enqueue(
        Notification(to=["ann@example.org"], subject="x", text="t", html="<p>h</p>",
                     actions=ACTIONS)
    )  # fmt: skip
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    raw = server.recorder.messages[0].data.decode()
    assert "/a/" not in raw and "http://" not in raw and "mailto:actions+" in raw


def test_a_link_scanner_gets_and_heads_and_nothing_is_acted(system):
    """A scanner's GETs (prefetch too) and HEADs, several times, act on nothing: the key
    stays open, no event is written, and the recipient's POST later still acts."""
    s = system()
    _, messages = s.send()
    ann = messages["ann@example.org"]
    url, key = s.link(ann, "approve"), s.key(ann)
    before = s.record(key)
    scanner = {"User-Agent": "Mozilla/5.0 (compatible; SafeLinks)"}
    with httpx.Client(headers=scanner, timeout=10) as client:
        for _ in range(3):
            page = client.get(url)
            assert page.status_code == 200
            assert '<form method="post">' in page.text
            assert (
                client.get(url, headers={"Sec-Purpose": "prefetch"}).status_code == 200
            )
            peek = client.head(url)
            assert (peek.status_code, peek.content) == (200, b"")
        assert client.get(s.link(ann, "reject")).status_code == 200
    assert s.record(key) == before and before["state"] == "open"
    assert s.events() == []
    # The recipient's own visit still works.
    with s.browser() as browser:
        _, token = s.open(url, browser)
        done = browser.post(url, data={"token": token, "comment": ""})
    assert done.status_code == 200
    assert s.record(key)["state"] == "used"
    assert [e["type"] for e in s.events()] == ["action.accepted"]


def test_a_post_without_the_token_is_403_and_acts_on_nothing(system):
    """A POST without the token, with an empty or forged one, or with the token of
    another action or another recipient's key, is 403 and changes nothing."""
    s = system()
    _, messages = s.send()
    ann, cy = messages["ann@example.org"], messages["cy@example.org"]
    url = s.link(ann, "approve")
    _, reject_token = s.open(s.link(ann, "reject"))
    _, cy_token = s.open(s.link(cy, "approve"))
    _, token = s.open(url)
    stamp, _, mac = token.partition(".")
    forged = [
        {"comment": "yes"},
        {"token": "", "comment": "yes"},
        {"token": reject_token},
        {"token": cy_token},
        {"token": f"{int(stamp) + 1}.{mac}"},
        {"token": f"{stamp}.{mac[:-2]}AA"},
        {"token": "9999999999.x"},
    ]
    with s.browser() as browser:
        for form in forged:
            answer = browser.post(url, data=form)
            assert answer.status_code == 403, form
            assert "Nothing was done" in answer.text
    assert s.record(s.key(ann))["state"] == "open"
    assert s.events() == []


def test_a_cross_site_post_is_refused_even_with_a_valid_token(system):
    """A POST the browser marks as cross-site or same-site, or from another or a null
    Origin, is 403 even with the page's token; from the page's origin it acts."""
    s = system()
    _, messages = s.send()
    ann = messages["ann@example.org"]
    url = s.link(ann, "approve")
    _, token = s.open(url)
    for headers in (
        {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "same-site", "Origin": s.web.url},
        {"Origin": "https://evil.example"},
        {"Origin": f"http://{HOST}:{s.web.port + 1}"},
        {"Origin": "null"},
    ):
        answer = httpx.post(url, data={"token": token}, headers=headers, timeout=10)
        assert answer.status_code == 403, headers
    assert s.record(s.key(ann))["state"] == "open"
    assert s.events() == []
    answer = httpx.post(url, data={"token": token}, headers={"Origin": s.web.url})
    assert answer.status_code == 200


def test_a_post_acts_once_and_a_second_is_refused_used(system):
    """The page's POST accepts the action for the key's recipient: one action.accepted
    with via "link", the comment and the context; with confirm_by_email the recipient
    is told; a second POST (and a reply after it) is refused `used`."""
    s = system(confirm_by_email=True)
    job_id, messages = s.send()
    ann = messages["ann@example.org"]
    url, key = s.link(ann, "approve"), s.key(ann)
    with structlog.testing.capture_logs() as logs, s.browser() as browser:
        _, token = s.open(url, browser)
        done = browser.post(url, data={"token": token, "comment": " Paid today.\r\n"})
        again = browser.post(url, data={"token": token, "comment": "twice"})
    assert done.status_code == 200 and "“Approve” was taken" in done.text
    assert again.status_code == 409 and "Already answered" in again.text
    assert key not in repr(logs) and token not in repr(logs)
    accepted, refused = s.events()
    assert accepted["type"] == "action.accepted" and accepted["job_id"] == job_id
    assert accepted["data"] == {
        "action": "approve",
        "comment": "Paid today.",
        "actor": "ann@example.org",
        "context": {"task": 42, "note": "<script>x</script>"},
        "received_at": accepted["data"]["received_at"],
        "message_id": None,
        "via": "link",
    }
    assert (refused["type"], refused["data"]["reason"]) == ("action.refused", "used")
    record = s.record(key)
    assert (record["state"], record["action"], record["via"]) == (
        "used",
        "approve",
        "link",
    )
    # A reply with the same key after the link: refused `used`.
    handled = build_inbound(s.settings, s.client).handle(
        Received(raw=reply(key), source="replies", mail_from="ann@example.org")
    )
    assert (handled.outcome, handled.reason) == ("refused", "used")
    # The page now says so, without a form.
    page = httpx.get(url, timeout=10)
    assert page.status_code == 409 and "<form" not in page.text
    # confirm_by_email: Ann hears that her link was used (and that the reply was not).
    wait_for(lambda: len(s.server.recorder.messages) == 4)
    answers = [_parse(m.data) for m in s.server.recorder.messages[2:]]
    assert sorted(m["Subject"].split(" ")[0] for m in answers) == ["Done:", "Not"]
    for confirmation in answers:
        assert confirmation["To"] == "ann@example.org"
        assert confirmation["Auto-Submitted"] == "auto-replied"
    assert any(m["Subject"].startswith("Done: approve") for m in answers)


def test_a_reply_first_leaves_the_link_refused_used(system):
    """The mailto reply still works with links on; the link after it is refused."""
    s = system()
    _, messages = s.send()
    ann = messages["ann@example.org"]
    url, key = s.link(ann, "approve"), s.key(ann)
    _, token = s.open(url)
    handled = build_inbound(s.settings, s.client).handle(
        Received(raw=reply(key), source="replies", mail_from="ann@example.org")
    )
    assert (handled.outcome, handled.reason) == ("accepted", "")
    with s.browser() as browser:
        answer = browser.post(url, data={"token": token})
    assert answer.status_code == 409
    assert [e["data"]["via"] for e in s.events()] == ["replies", "link"]


def test_expired_tampered_and_truncated_keys_act_on_nothing(system):
    """An expired key's page says so (410) and its POST is refused `expired`; a
    tampered or truncated key, or an action not offered, is 404, without a form."""
    s = system(key_ttl="1m")
    _, messages = s.send()
    ann = messages["ann@example.org"]
    url, key = s.link(ann, "approve"), s.key(ann)
    _, token = s.open(url)
    tampered = url.replace(f"/{key}/", f"/{key[:-1]}{'a' if key[-1] != 'a' else 'b'}/")
    for bad in (tampered, url.replace(f"/{key}/", f"/{key[:-1]}/"),
                url[: -len("approve")] + "pay", url[: -len("approve")] + "NOT-AN-ID"):  # fmt: skip
        page = httpx.get(bad, timeout=10)
        assert page.status_code == 404 and "<form" not in page.text, bad
        posted = httpx.post(bad, data={"token": token}, timeout=10)
        assert posted.status_code in (403, 404), bad
    assert s.events() == []
    # Expired: the key's expiry is past (as key_ttl later makes it).
    s.client.hset(action_key(s.ns, key), "expires_at", 1)
    page = httpx.get(url, timeout=10)
    assert page.status_code == 410 and "<form" not in page.text
    with s.browser() as browser:
        answer = browser.post(url, data={"token": token})
    assert answer.status_code == 410
    [refused] = s.events()
    assert refused["data"]["reason"] == "expired"
    assert s.record(key)["state"] == "open"


def test_a_closed_task_shows_no_form_and_refuses_the_post(system):
    """After close_actions the page says the task is closed; its POST is refused."""
    s = system()
    job_id, messages = s.send()
    url = s.link(messages["ann@example.org"], "approve")
    _, token = s.open(url)
    close_actions(job_id, producer=s.producer)
    page = httpx.get(url, timeout=10)
    assert page.status_code == 409 and "no longer takes actions" in page.text
    assert "<form" not in page.text
    with s.browser() as browser:
        answer = browser.post(url, data={"token": token})
    assert answer.status_code == 409
    [refused] = s.events()
    assert (refused["data"]["reason"], refused["data"]["action"]) == (
        "closed",
        "approve",
    )


def test_a_comment_required_action_without_a_comment_shows_the_form_again(system):
    """POSTing a comment-required action without one is refused `comment_required`: the
    form comes back (422) with the error, the key stays open, and with a comment the
    next POST is accepted."""
    s = system()
    _, messages = s.send()
    ann = messages["ann@example.org"]
    url, key = s.link(ann, "reject"), s.key(ann)
    with s.browser() as browser:
        html, token = s.open(url, browser)
        assert re.search(r"<textarea[^>]* required", html)
        empty = browser.post(url, data={"token": token, "comment": "  \r\n "})
        assert empty.status_code == 422
        assert 'role="alert"' in empty.text and "needs a comment" in empty.text
        assert s.record(key)["state"] == "open"
        again = TOKEN.search(empty.text).group(1)
        done = browser.post(url, data={"token": again, "comment": "Wrong amount."})
    assert done.status_code == 200
    refused, accepted = s.events()
    assert refused["data"]["reason"] == "comment_required"
    assert accepted["data"]["comment"] == "Wrong amount."


def test_a_comment_of_many_wide_characters_fits_the_body_cap(system):
    """9,999 CJK characters (nine bytes each, form-encoded: some 90 KB) are within
    the comment limit, so they are a comment like any other, not a body too large."""
    s = system()
    _, messages = s.send()
    ann = messages["ann@example.org"]
    url = s.link(ann, "reject")
    with s.browser() as browser:
        _, token = s.open(url, browser)
        done = browser.post(url, data={"token": token, "comment": "日" * 9_999})
    assert done.status_code == 200, done.text
    [accepted] = s.events()
    assert accepted["data"]["comment"] == "日" * 9_999


def test_pages_are_escaped_script_free_and_carry_the_headers(system):
    """Every answer (page, HEAD, 403, 404, 405) has no-store, no-referrer, noindex and a
    CSP without scripts; the page escapes the subject and context and has no script,
    no auto-submit and no secret."""
    s = system()
    _, messages = s.send()
    url = s.link(messages["ann@example.org"], "approve")
    page = httpx.get(url, timeout=10)
    answers = [
        page,
        httpx.head(url, timeout=10),
        httpx.post(url, data={}, timeout=10),
        httpx.get(f"{s.web.url}/a/nothing", timeout=10),
        httpx.put(url, timeout=10),
    ]
    assert [a.status_code for a in answers] == [200, 200, 403, 404, 405]
    for answer in answers:
        for name, value in HEADERS.items():
            assert answer.headers[name] == value, (answer.status_code, name)
        csp = answer.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp
        assert "form-action 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "Approve &lt;b&gt;invoice&lt;/b&gt; 42 – Müller" in page.text
    assert "&lt;script&gt;x&lt;/script&gt;" in page.text
    tags = _anchors(page.text).tags
    assert not [t for t, _ in tags if t in ("script", "iframe", "img", "meta")
                and (t != "meta" or "http-equiv" in _)]  # fmt: skip
    [form] = [a for t, a in tags if t == "form"]
    assert form == {"method": "post"}
    assert 'name="viewport"' in page.text and '<html lang="en">' in page.text
    assert '<label for="comment">' in page.text
    assert "onload" not in page.text and "autofocus" not in page.text
    assert (
        REPLY not in page.text
        and s.settings.broker_url.get_secret_value() not in page.text
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("http://workflow.example.com", "https is required"),
        ("ftp://workflow.example.com", "https://"),
        ("https://user:pw@workflow.example.com", "user name or password"),
        ("https://workflow.example.com/?a=1", "no query"),
        ("https://" + "w" * 200 + ".example.com", "longer than 200"),
    ],
)
def test_a_bad_links_base_url_is_a_config_error_naming_it(make_settings, value, words):
    """links_base_url must be https (http only on loopback), without query or login."""
    with pytest.raises(ConfigError) as info:
        make_settings(email_actions={"links_base_url": value})
    assert info.value.field == "email_actions.links_base_url"
    assert words in str(info.value)
    assert "pw" not in str(info.value)


def test_loopback_http_is_accepted_for_development(make_settings):
    """http on 127.0.0.1, ::1 or localhost is allowed; a trailing / is dropped."""
    for value in ("http://127.0.0.1:8025/", "http://[::1]:8025", "http://localhost"):
        settings = make_settings(email_actions={"links_base_url": value})
        assert settings.email_actions.links_base_url == value.rstrip("/")


def test_loggable_path_hides_the_key_of_an_action_link():
    """An access log's path keeps the action and loses the key; other paths stay."""
    assert loggable_path("/a/" + "k" * 26 + "/approve") == "/a/<key>/approve"
    assert loggable_path("/a/" + "k" * 26) == "/a/<key>"
    assert loggable_path("/v1/notifications") == "/v1/notifications"
    assert loggable_path("/ab/c") == "/ab/c"


def test_without_redis_a_page_says_try_again_and_names_nothing(make_settings):
    """With the broker unreachable, GET and POST answer 503 with a page of ours that
    names neither the broker nor the key, with the pages' headers."""
    import redis

    from common.sockets import free_port

    settings = make_settings(
        broker_url=f"redis://:hunter2@{HOST}:{free_port()}/0",
        inbound=[RECEIVER],
        email_actions={"enabled": True, "reply_address": REPLY},
    )
    down = redis.Redis(host=HOST, port=free_port(), socket_connect_timeout=1)
    links = create_links_app(settings, down)

    @asgi("/a", is_mount=True, copy_scope=True)
    async def mounted(scope: Scope, receive: Receive, send: Send) -> None:
        await links(scope, receive, send)

    web = UvicornServer().start(Litestar(route_handlers=[mounted]))
    try:
        url = f"{web.url}/a/{'k' * 26}/approve"
        answers = [
            httpx.get(url, timeout=10),
            httpx.post(url, data={"token": "9999999999.x"}, timeout=10),
        ]
    finally:
        web.stop()
    for answer in answers:
        assert answer.status_code == 503
        assert "Try again in a moment" in answer.text
        assert "hunter2" not in answer.text and "k" * 26 not in answer.text
        assert answer.headers["cache-control"] == "no-store"


def test_posts_and_a_reply_racing_for_one_key_accept_exactly_one(system):
    """Six POSTs (two actions) and a reply for one key at once: exactly one is
    accepted, every other is refused `used`, each with its event."""
    from concurrent.futures import ThreadPoolExecutor

    s = system()
    _, messages = s.send()
    ann = messages["ann@example.org"]
    key = s.key(ann)
    forms = []
    for action in ("approve", "reject") * 3:
        url = s.link(ann, action)
        _, token = s.open(url)
        forms.append((url, {"token": token, "comment": "now"}))
    inbound = build_inbound(s.settings, s.client)

    def post(item):
        url, form = item
        with s.browser() as browser:
            return browser.post(url, data=form).status_code

    def answer_by_mail():
        handled = inbound.handle(
            Received(raw=reply(key), source="replies", mail_from="ann@example.org")
        )
        return 200 if handled.outcome == "accepted" else 409

    with ThreadPoolExecutor(max_workers=7) as pool:
        futures = [pool.submit(post, item) for item in forms]
        futures.append(pool.submit(answer_by_mail))
        codes = [f.result(timeout=30) for f in futures]
    assert sorted(codes) == [200] + [409] * 6
    events = s.events()
    assert [e["type"] for e in events].count("action.accepted") == 1
    assert sorted(e["data"].get("reason", "") for e in events) == [""] + ["used"] * 6
    assert s.record(key)["state"] == "used"
