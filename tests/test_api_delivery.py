"""The HTTP API with a running worker and a real SMTP server: delivered, dead, requeued."""

from __future__ import annotations

import base64

import pytest

from tests.support.helpers import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def world(smtp_server, make_settings, run_worker, api_server):
    """A worker delivering to an aiosmtpd server, one attempt per job, and the API."""
    server = smtp_server()
    settings = make_settings(
        smtp=[server.smtp_section()],
        retry={"max_attempts": 1, "min_backoff": "1s", "max_backoff": "2s"},
    )
    app = run_worker(settings)
    api = api_server(settings)
    return app, server, api


def _job(to: str, subject: str) -> dict:
    return {
        "to": to,
        "subject": subject,
        "text": "Please approve.",
        "attachments": [
            {
                "filename": "po.pdf",
                "content_type": "application/pdf",
                "content": base64.b64encode(b"%PDF-1.7 secret numbers").decode(),
            }
        ],
    }


def _state(http, job_id):
    return http.get(f"/v1/notifications/{job_id}").json()["state"]


def test_a_posted_notification_arrives_and_is_sent(world):
    """Given a worker, when a job is POSTed, then the SMTP server has it and GET says sent."""
    _, server, api = world
    with api.http(api.key("send", "read")) as http:
        job_id = http.post(
            "/v1/notifications", json=_job("ann@example.org", "PO 4711")
        ).json()["id"]
        wait_for(lambda: _state(http, job_id) == "sent")
        record = http.get(f"/v1/notifications/{job_id}").json()
        events = http.get("/v1/events").json()
    (message,) = server.recorder.messages
    assert message.rcpt_tos == ["ann@example.org"]
    assert b"Subject: PO 4711" in message.data and b"%PDF" not in message.data  # base64
    assert f"<{job_id}@example.com>".encode() in message.data
    assert (
        record["service"] == "primary"
        and record["recipients"][0]["state"] == "accepted"
    )
    assert [(e["type"], e["job_id"]) for e in events["events"]] == [
        ("delivery.sent", job_id)
    ]


def test_dead_letters_listed_paged_shown_requeued_and_purged(world):
    """A busy mailbox kills three jobs; the API pages, shows, requeues and purges them."""
    _, server, api = world
    server.recorder.rcpt_replies["busy@example.org"] = "451 4.3.0 Mailbox busy"
    reader, ops = api.key("read"), api.key("read", "ops")
    with api.http(api.key("send")) as http:
        ids = [
            http.post(
                "/v1/notifications", json=_job("busy@example.org", f"n{i}")
            ).json()["id"]
            for i in range(3)
        ]
    with api.http(reader) as http:
        wait_for(lambda: all(_state(http, i) == "dead" for i in ids))
        first = http.get(
            "/v1/dead-letters", params={"limit": 2, "reason": "retries_exhausted"}
        ).json()
        second = http.get(
            "/v1/dead-letters", params={"limit": 2, "cursor": first["next"]}
        ).json()
        other = http.get("/v1/dead-letters", params={"reason": "expired"}).json()
        shown = http.get(f"/v1/dead-letters/{ids[0]}").json()
        forbidden = http.post(f"/v1/dead-letters/{ids[0]}/requeue")
        bad_reason = http.get("/v1/dead-letters", params={"reason": "nope"})
    paged = [d["id"] for d in first["dead_letters"] + second["dead_letters"]]
    assert (
        sorted(paged) == sorted(ids) and len(set(paged)) == 3 and second["next"] is None
    )
    assert other["dead_letters"] == []
    assert shown["reason"] == "retries_exhausted"
    (attachment,) = shown["message"]["job"]["attachments"]
    assert "content" not in attachment and attachment["size"] == 23
    assert forbidden.status_code == 403 and bad_reason.status_code == 400
    server.recorder.rcpt_replies.clear()  # the mailbox is back
    with api.http(ops) as http:
        assert http.post(f"/v1/dead-letters/{ids[0]}/requeue").status_code == 202
        wait_for(lambda: _state(http, ids[0]) == "sent")
        assert http.post(f"/v1/dead-letters/{ids[0]}/requeue").status_code == 404
        assert http.delete(f"/v1/dead-letters/{ids[1]}").status_code == 204
        assert http.delete(f"/v1/dead-letters/{ids[1]}").status_code == 404
        unfiltered = http.post("/v1/dead-letters/requeue", json={})
        by_filter = http.post(
            "/v1/dead-letters/requeue", json={"reason": "retries_exhausted"}
        )
        wait_for(lambda: _state(http, ids[2]) == "sent")
        left = http.get("/v1/dead-letters").json()
    assert (
        unfiltered.status_code == 422
        and unfiltered.json()["errors"][0]["field"] == "all"
    )
    assert by_filter.json() == {"requeued": [ids[2]], "refused": [], "more": False}
    assert left == {"dead_letters": [], "next": None}
    assert (
        sorted(m.rcpt_tos[0] for m in server.recorder.messages)
        == ["busy@example.org"] * 2
    )
