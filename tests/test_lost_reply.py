"""The reply to a message's final dot is lost (RFC 5321 6.1: the server read the whole
message, then the connection dropped): the message is in doubt. A real worker sends it
again, as the RFC says a client must, and records that it did: a history event, a
``delivery_in_doubt`` line with the reason, and the transport's error says so."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from typing import Any

import pytest
import redis

from producers import Notification, Producer
from producers.job import Mailbox
from tests.support.config import write_toml
from tests.support.helpers import wait_for
from tests.support.processes import WorkerProcess
from tests.support.proxy import CuttingProxy
from worker.errors import TransientDeliveryError
from worker.mime import Base64Lines, Mime, render
from worker.status import StatusStore
from worker.transports.base import Receipt
from worker.transports.smtp_client import SmtpClient

_SUBJECT = re.compile(rb"^Subject: (.*)\r$", re.MULTILINE)
FROM = Mailbox(address="noreply@example.com")


class LosingServer:
    """A raw SMTP server on loopback (asyncio, in a thread of the test) that speaks just
    enough SMTP, with PIPELINING. A message whose subject is in ``lose`` is read to its
    final dot, then the connection is closed without a reply (once per subject); with
    ``cut`` it is closed in the middle of DATA instead. Others get 250."""

    def __init__(self, lose: set[bytes], *, cut: bool = False) -> None:
        self.lose = set(lose)
        self.cut = cut
        self.received: list[bytes] = []  # the subject of every message read to its dot
        self.sessions = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LosingServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def section(self, **extra: Any) -> dict[str, Any]:
        return {
            "name": "primary",
            "from_address": FROM.address,
            "server": "127.0.0.1",
            "port": self.port,
            "security": "none",
            "timeout": "5s",
            **extra,
        }

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.sessions += 1
        writer.write(b"220 lossy.test ESMTP\r\n")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-lossy.test\r\n250-PIPELINING\r\n250 SIZE\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    if not await self._data(reader):
                        break  # the connection drops: no reply
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:  # MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        writer.close()

    async def _data(self, reader: asyncio.StreamReader) -> bool:
        """Read one message; False when the connection is to be dropped now."""
        head = await reader.readuntil(b"\r\n\r\n")
        found = _SUBJECT.search(head)
        subject = found.group(1) if found else b""
        if subject in self.lose and self.cut:
            self.lose.discard(subject)
            return False  # mid-DATA: the final dot never came
        await reader.readuntil(b"\r\n.\r\n")
        self.received.append(subject)
        if subject in self.lose:
            self.lose.discard(subject)
            return False
        return True


def _message(subject: str) -> bytes:
    notification = Notification(to=["ann@example.org"], subject=subject, text="Hi")
    return render(notification, job_id=f"job-{subject}", from_box=FROM)


@pytest.fixture
def client(make_settings):
    clients: list[SmtpClient] = []

    def open_client(server: LosingServer) -> SmtpClient:
        conn = make_settings(smtp=[server.section()]).smtp[0]
        made = SmtpClient(conn, None)
        made.open()
        clients.append(made)
        return made

    yield open_client
    for made in clients:
        made.close()


def test_a_lost_reply_to_the_final_dot_is_an_in_doubt_error(client):
    """The connection dropped after the final dot: a transient error marked in doubt."""
    server = LosingServer({b"lose"})
    with server, pytest.raises(TransientDeliveryError) as caught:
        client(server).send(FROM.address, ("ann@example.org",), _message("lose"))
    assert caught.value.in_doubt
    assert "final dot" in str(caught.value)
    assert server.received == [b"lose"]


def test_a_connection_lost_while_the_message_is_written_is_not_in_doubt(client):
    """Dropped while the client still writes the message (larger than the socket
    buffers), the server cannot have taken it: a transient error, not in doubt."""
    head = b"Subject: cut\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    large = Mime([head, Base64Lines(bytes(20 * 1024 * 1024))])  # 27 MB written
    server = LosingServer({b"cut"}, cut=True)
    with server, pytest.raises(TransientDeliveryError) as caught:
        client(server).send(FROM.address, ("ann@example.org",), large)
    assert not caught.value.in_doubt
    assert "final dot" not in str(caught.value)
    assert server.received == []


def test_a_lost_reply_in_a_pipelined_run_marks_that_message_alone(client):
    """In ``send_many`` the message whose reply was lost gets an in-doubt error; the one
    before it its receipt, the one after it nothing (not sent)."""
    with LosingServer({b"two"}) as server:
        results = client(server).send_many(
            [
                (FROM.address, ("ann@example.org",), _message(s))
                for s in ("one", "two", "three")
            ]
        )
    first, second, third = results
    assert isinstance(first, Receipt) and first.accepted
    assert isinstance(second, TransientDeliveryError) and second.in_doubt
    assert third is None
    assert server.received == [b"one", b"two"]


def _config(tmp_path: Any, redis_url: str, namespace: str, server: LosingServer) -> Any:
    return write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "retry": {"min_backoff": "1s", "max_backoff": "2s"},
            "smtp": [server.section()],
        },
    )


def _record(store: StatusStore, job_id: str) -> dict[str, Any]:
    record = store.get(job_id)
    assert record is not None
    return record


def _history(store: StatusStore, job_id: str) -> list[dict[str, Any]]:
    return list(_record(store, job_id)["history"])


def _sent(store: StatusStore, job_id: str) -> bool:
    record = store.get(job_id)
    return record is not None and record["state"] == "sent"


@pytest.mark.slow
@pytest.mark.parametrize("bulk", [False, True], ids=["single", "bulk"])
def test_a_worker_records_a_lost_reply_and_sends_again(
    redis_url, namespace, tmp_path, bulk
):
    """Given a server that drops the connection after reading a job's message to its
    final dot, a real worker sends the job again in the same attempt and records it:
    history [in_doubt, sent] naming the service and the reason, and a
    ``delivery_in_doubt`` log line with the reason; the other jobs only [sent]."""
    client = redis.Redis.from_url(redis_url)
    store = StatusStore(client, namespace=namespace, ttl=3600)
    subjects = ["one", "lose", "three"] if bulk else ["lose"]
    with LosingServer({b"lose"}) as server:
        config = _config(tmp_path, redis_url, namespace, server)
        worker = WorkerProcess(config, tmp_path / "worker.log", "-p", "1", "-t", "2")
        try:
            # When the jobs are enqueued (a bulk message of three, or one single job)
            producer = Producer(client, namespace=namespace)
            ids = producer.enqueue_many(
                (
                    Notification(to=["ann@example.org"], subject=s, text="Hi")
                    for s in subjects
                ),
                bulk=bulk,
            )
            # Then every job ends sent, the lost one after a second send
            wait_for(lambda: all(_sent(store, i) for i in ids), timeout=30)
        finally:
            assert worker.stop() == 0
    assert sorted(server.received) == sorted([*(s.encode() for s in subjects), b"lose"])
    by_subject = dict(zip(subjects, ids, strict=True))
    assert _record(store, by_subject["lose"])["attempts"] == 1
    history = _history(store, by_subject["lose"])
    assert [h["event"] for h in history] == ["in_doubt", "sent"]
    assert history[0]["service"] == "primary"
    assert "final dot" in history[0]["reason"]
    for subject in set(subjects) - {"lose"}:
        assert [h["event"] for h in _history(store, by_subject[subject])] == ["sent"]
    [line] = worker.events("delivery_in_doubt")
    assert line["job_id"] == by_subject["lose"]
    assert line["service"] == "primary" and "final dot" in line["reason"]


@pytest.mark.slow
def test_a_fetch_whose_reply_is_lost_is_put_back_and_sent(
    redis_url, namespace, tmp_path, smtp_server
):
    """Given a connection to Redis cut while a fetch's reply carries a job, the job the
    fetch moved into the worker's ack set is put back and sent, not left there until
    the worker exits (no reaper looks at a live worker's ack set)."""
    if not redis_url.startswith("redis://127.0.0.1:"):
        pytest.skip("needs a Redis server to put a proxy in front of")
    client = redis.Redis.from_url(redis_url)
    store = StatusStore(client, namespace=namespace, ttl=3600)
    server = smtp_server()
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = CuttingProxy(port)
    proxy.start()
    proxy.cut_reply(b"fetched-then-lost", 0)
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": f"redis://127.0.0.1:{proxy.port}/0",
            "namespace": namespace,
            "retry": {"min_backoff": "1s", "max_backoff": "2s"},
            "smtp": [server.smtp_section()],
        },
    )
    worker = WorkerProcess(config, tmp_path / "worker.log", "-p", "1", "-t", "2")
    try:
        job_id = Producer(client, namespace=namespace).enqueue(
            Notification(to=["ann@example.org"], subject="fetched-then-lost", text="Hi")
        )
        wait_for(lambda: _sent(store, job_id), timeout=45)
    finally:
        assert worker.stop() == 0
        proxy.stop()
    assert proxy.cuts == 1
    [line] = worker.events("lost_fetch_requeued")
    assert line["messages"] == 1
    assert len(server.recorder.messages) == 1
