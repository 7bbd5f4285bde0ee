"""status.max_dead_letters: past the cap the oldest dead letters go, in the script that
writes the new one, with a log line and a count that `dead list` and `queue stats` show."""

from __future__ import annotations

import subprocess

import structlog.testing

from producers import Notification, Producer
from tests.support.processes import MAILWORKER, clean_env
from worker.cli.stats import queue_stats
from worker.deadletter import DeadLetters, Filters
from worker.status import DeadTrims, StatusStore

REFUSED = "550 5.1.1 No such user"


def _dead_letter(status: StatusStore, job_id: str) -> None:
    """Write one dead letter the way the worker does: record and message in one script."""
    status.write(
        job_id,
        {"id": job_id, "state": "dead", "reason": "permanent"},
        event={"event": "dead", "reason": "permanent"},
        dead_payload=b'{"queue_name": "mail"}',
    )


def _index(redis_client, namespace) -> list[str]:
    return [i.decode() for i in redis_client.zrange(f"{namespace}:dead", 0, -1)]


def test_past_the_cap_the_oldest_go_with_their_message_and_a_log_line(
    redis_client, namespace
):
    """Five dead letters under a cap of three: the two oldest go (index entry and kept
    message), the three newest stay, the count says two, the first trim logs a line."""
    status = StatusStore(redis_client, namespace=namespace, ttl=60, max_dead_letters=3)
    with structlog.testing.capture_logs() as logs:
        for n in range(5):
            _dead_letter(status, f"job-{n}")
    assert _index(redis_client, namespace) == ["job-2", "job-3", "job-4"]
    assert redis_client.get(f"{namespace}:dead:job-0") is None
    assert redis_client.get(f"{namespace}:dead:job-1") is None
    assert redis_client.get(f"{namespace}:dead:job-4") is not None
    # One line at the first trim; later ones within 10 s are counted, not each said.
    trims = [e for e in logs if e["event"] == "dead_letters_trimmed"]
    assert [(e["count"], e["job_ids"]) for e in trims] == [(1, ["job-0"])]
    assert trims[0]["max_dead_letters"] == 3 and trims[0]["log_level"] == "warning"
    letters = DeadLetters(redis_client, namespace=namespace, ttl=60, status=status)
    assert letters.trimmed() == 2
    stats = queue_stats(redis_client, namespace)
    assert (stats["dead"], stats["dead_trimmed"]) == (3, 2)
    # The record of a trimmed letter stays until status.ttl, still saying dead.
    assert status.get("job-0")["state"] == "dead"


def test_trims_within_the_interval_are_said_together_in_the_next_line():
    """A trim after the interval writes one line with the count of every trim since."""
    trims = DeadTrims(3, every=0.0)
    with structlog.testing.capture_logs() as logs:
        trims.note([b"a"])
        trims.note([b"b", b"c"])
    assert [e["count"] for e in logs] == [1, 2]
    held = DeadTrims(3, every=3600.0)
    with structlog.testing.capture_logs() as logs:
        held.note([b"a"])
        held.note([b"b"])
    assert [(e["count"], e["job_ids"]) for e in logs] == [(1, ["a"])]


def test_a_cap_of_zero_keeps_every_dead_letter(redis_client, namespace):
    """max_dead_letters = 0 is no cap: nothing is trimmed, nothing is counted."""
    status = StatusStore(redis_client, namespace=namespace, ttl=60, max_dead_letters=0)
    with structlog.testing.capture_logs() as logs:
        for n in range(5):
            _dead_letter(status, f"job-{n}")
    assert len(_index(redis_client, namespace)) == 5
    assert not [e for e in logs if e["event"] == "dead_letters_trimmed"]
    assert queue_stats(redis_client, namespace)["dead_trimmed"] == 0


def test_the_default_cap_is_100000(make_settings):
    """Without a setting the cap is 100,000 dead letters."""
    settings = make_settings(
        smtp=[{"name": "relay", "from_address": "a@example.org", "server": "127.0.0.1"}]
    )
    assert settings.status.max_dead_letters == 100_000


def test_jobs_dying_past_the_cap_keep_the_newest_and_requeue_and_purge_still_work(
    make_settings, smtp_server, run_worker, redis_client, namespace, tmp_path
):
    """A worker dead-letters five refused jobs under a cap of three: the three that died
    last are kept and can be requeued (then delivered) or purged; `dead list` says two
    were trimmed."""
    # Given a server that refuses the recipient, and a cap of three
    server = smtp_server()
    server.recorder.rcpt_replies["gone@example.org"] = REFUSED
    settings = make_settings(
        smtp=[server.smtp_section("relay")], status={"max_dead_letters": 3}
    )
    app = run_worker(settings, threads=1)  # one at a time: deaths in a known order
    producer = Producer(
        redis_client, namespace=settings.namespace, limits=settings.limits
    )
    # When five jobs die, one after the other
    ids = []
    for n in range(5):
        ids.append(
            producer.enqueue(
                Notification(to=["gone@example.org"], subject=f"n{n}", text="x")
            )
        )
        app.broker.join("mail", timeout=10_000)
    # Then the three that died last are the dead letters
    letters = DeadLetters(redis_client, namespace=namespace, ttl=60)
    kept = [job_id for job_id, _, _ in letters.entries(Filters())]
    assert kept == ids[2:]
    assert letters.show(ids[0]) is None and letters.trimmed() == 2
    listed = subprocess.run(
        [MAILWORKER, "dead", "list"],
        env=clean_env(MAILWORKER_CONFIG=str(tmp_path / "mailworker.toml")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0
    assert "3 dead letter(s); 2 trimmed past status.max_dead_letters" in listed.stderr
    # And requeue and purge work on what is kept
    server.recorder.rcpt_replies.clear()
    letters.requeue(ids[2], settings.limits)
    app.broker.join("mail", timeout=10_000)
    assert app.status.get(ids[2])["state"] == "sent"
    assert letters.purge(ids[3]) is True
    assert [job_id for job_id, _, _ in letters.entries(Filters())] == [ids[4]]
