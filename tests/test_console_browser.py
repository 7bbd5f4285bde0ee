"""The /ops/ console in Debian's chromium, driven by Playwright: a real worker process,
a real SMTP server that refuses and then accepts, and a person at the keyboard."""

from __future__ import annotations

import os
import shutil

import pytest

from producers import Notification, Producer
from settings import load_settings
from tests.support.config import write_toml
from tests.support.console import serve_console
from tests.support.env import CI
from tests.support.helpers import wait_for, wire_enqueue
from tests.support.processes import WorkerProcess
from tests.support.smtp import PASSWORD
from worker.api.keys import ApiKeys
from worker.deadletter import DeadLetters, Filters

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser(tmp_path):
    """A chromium of its own (fresh profile); skips without one, never under CI=true."""
    if not (os.access(CHROMIUM, os.X_OK) and shutil.which("chromium")):
        if CI:
            raise RuntimeError("CI=true but no chromium: .ci/run must install it")
        pytest.skip("no chromium (apt-get install chromium)")
    if CI:
        import playwright.sync_api as sync_api  # in the test extra: missing is an error
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 390, "height": 844},  # a phone
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def failing_world(tmp_path, smtp_server, redis_client, namespace, redis_url):
    """A worker process sending through an SMTP server (with AUTH) that answers 550 to
    RCPT for one mailbox; its config holds the SMTP password."""
    server = smtp_server(auth=True)
    server.recorder.rcpt_replies["ceo@example.org"] = "550 5.1.1 <b>No such user</b>"
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "smtp": [server.smtp_section()],
            "retry": {"max_attempts": 1, "min_backoff": "1s", "max_backoff": "2s"},
        },
    )
    worker = WorkerProcess(config, tmp_path / "worker.log", "-p", "1", "-t", "2")
    yield server, load_settings(config, environ={})
    worker.stop()


def test_find_open_and_requeue_a_dead_letter_in_a_browser(
    browser, failing_world, redis_client, namespace
):
    """Log in, see the dead letter a refusing server made, open it, requeue it once the
    mailbox exists, see it sent; a form without its token is refused; no secret shows."""
    server, settings = failing_world
    _, secret = ApiKeys(redis_client, namespace).create("oncall", ["ops"])
    producer = Producer(redis_client, namespace=namespace)
    job_id = producer.enqueue(
        Notification(to=["ceo@example.org"], subject="<i>Q3</i> report", text="Hi")
    )
    invalid = wire_enqueue(redis_client, namespace, {"to": ["nope"], "subject": "s"})
    store = DeadLetters(redis_client, namespace=namespace, ttl=settings.status.ttl)
    wait_for(lambda: len(store.entries(Filters())) == 2, timeout=60)
    seen: list[str] = []
    with serve_console(settings, redis_client) as base:
        page = browser.new_page()
        # Given the login form, typed into with the keyboard
        page.goto(f"{base}/letters/")
        assert page.url == f"{base}/login"
        page.get_by_label("API key").fill(secret)
        page.keyboard.press("Enter")
        page.wait_for_url(f"{base}/")
        seen.append(page.content())
        assert page.get_by_role("heading", name="Queues").is_visible()
        # When the dead letters are listed and the one is opened
        page.get_by_role("link", name="Dead letters").click()
        row = page.get_by_role("row").filter(has_text=job_id)
        assert "<b>No such user</b>" in row.inner_text()
        seen.append(page.content())
        page.get_by_role("link", name=job_id).click()
        assert page.get_by_text("550 5.1.1 <b>No such user</b>").first.is_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # a phone
        page.keyboard.press("Tab")  # the keyboard's first stop skips to the content
        assert page.evaluate("document.activeElement.textContent") == (
            "Skip to the content"
        )
        assert page.locator("b", has_text="No such user").count() == 0  # text, not HTML
        seen.append(page.content())
        # Then, with the mailbox back, requeue asks once and the worker delivers it
        server.recorder.rcpt_replies.clear()
        page.get_by_role("link", name="Requeue…").click()
        seen.append(page.content())
        page.get_by_role("button", name=f"Requeue {job_id}").click()
        page.wait_for_url(f"{base}/jobs/{job_id}?requeued=1")
        wait_for(
            lambda: (store.status.get(job_id) or {}).get("state") == "sent", timeout=60
        )
        page.reload()
        assert page.locator("dd", has_text="sent").first.is_visible()
        assert [m.rcpt_tos for m in server.recorder.messages] == [["ceo@example.org"]]
        seen.append(page.content())
        # A form posted from elsewhere, without the token, is refused and changes nothing
        page.set_content(
            f'<form method="post" action="{base}/letters/{invalid}/purge">'
            '<button type="submit">go</button></form>'
        )
        page.get_by_role("button", name="go").click()
        page.wait_for_load_state()
        assert "token is missing or wrong" in page.content()
        forged = browser.request.post(
            f"{base}/letters/{invalid}/purge", form={"_csrf_token": "0" * 128}
        )
        assert forged.status == 403
        assert store.show(invalid) is not None
        # The list fits a phone's width too
        page.goto(f"{base}/letters/")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        seen.append(page.content())
        page.get_by_role("button", name="Log out").click()
        page.wait_for_url(f"{base}/login")
        page.goto(f"{base}/")
        assert page.url == f"{base}/login"
    assert len(seen) == 6
    for html in seen:
        assert secret not in html and PASSWORD not in html
