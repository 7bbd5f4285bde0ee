"""Inbound sources' pickup and idle cost: ``.venv/bin/python -m bench.inbound_poll``.

Issue 17's targets: a Graph or IMAP source picks a new message up within
``poll_interval`` + 1 s, and an idle source costs at most one request per
``poll_interval``. For each of graph and imap, against a Redis of its own, it runs
``mailworker inbound`` as a subprocess with a short ``--poll-interval`` and:

1. **pickup**: drops ``--messages`` auto-replies, one at a time at a random moment of
   the poll cycle, into the mailbox (Graph: the Microsoft stand-in's mailbox over
   loopback HTTPS; IMAP: a private Dovecot) and times each from its arrival to its
   record in Redis (``worker/inbound/store.py``): p50 and max.
2. **idle**: with the mailbox idle for ``--idle-polls`` intervals, counts the requests
   the source made (Graph: the stand-in's mailbox request log, which has no token
   requests; IMAP: the command lines a loopback proxy in front of Dovecot forwarded).

Every wait has a bound; everything started is stopped by its pid. Prints a table and
writes JSON into bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import trustme

from bench.infra import RedisInstance, spawn, stop_tree
from tests.support.dovecot import Dovecot, append
from tests.support.env import HOST
from tests.support.fake_microsoft import FakeMicrosoft
from worker.inbound.store import InboundStore

RESULTS = Path(__file__).resolve().parent / "results"
MAILBOX = "actions@contoso.com"


def _reply(to: str) -> tuple[str, bytes]:
    """An out-of-office answer with a fresh Message-ID: recorded as an auto-reply."""
    message_id = f"<{uuid.uuid4().hex}@example.org>"
    raw = (
        f"From: ann@example.org\r\nTo: {to}\r\nSubject: Out of office\r\n"
        f"Auto-Submitted: auto-replied\r\nMessage-ID: {message_id}\r\n"
        "Date: Tue, 24 Nov 2026 10:20:00 +0000\r\n\r\nI am away until Monday.\r\n"
    )
    return message_id, raw.encode()


class CountingProxy:
    """A loopback TCP proxy to ``HOST:port`` that counts the client's lines (commands)."""

    def __init__(self, port: int) -> None:
        self.target = (HOST, port)
        self._listener = socket.create_server((HOST, 0))
        self.port = int(self._listener.getsockname()[1])
        self.lines: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=10)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(
                target=self._pump, args=(server, client, False), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(client, server, True), daemon=True
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        pending = b""
        try:
            while data := src.recv(65536):
                if count:
                    pending += data
                    *done, pending = pending.split(b"\n")
                    now = time.monotonic()
                    with self._lock:
                        self.lines += [(now, line) for line in done]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def since(self, start: float) -> list[bytes]:
        with self._lock:
            return [line for at, line in self.lines if at >= start]

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()


def _wait_record(store: InboundStore, message_id: str, timeout: float) -> float | None:
    """time.monotonic() when ``message_id``'s record is first seen, polling every 10 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["message_id"] == message_id for r in store.recent(limit=50)):
            return time.monotonic()
        time.sleep(0.01)
    return None


def _measure(
    name: str,
    drop: Callable[[], str],
    requests_since: Callable[[float], int],
    store: InboundStore,
    process: subprocess.Popen[bytes],
    poll: float,
    messages: int,
    idle_polls: int,
) -> dict[str, Any]:
    rng = random.Random(17)
    # the first poll (folders, a first delta or SELECT) is not what is measured
    warm_id = drop()
    if _wait_record(store, warm_id, poll + 30) is None:
        raise RuntimeError(
            f"{name}: the source picked nothing up (rc={process.poll()})"
        )
    pickups: list[float] = []
    for _ in range(messages):
        time.sleep(rng.uniform(0, poll))
        arrived = time.monotonic()
        message_id = drop()
        seen = _wait_record(store, message_id, poll + 30)
        if seen is None:
            raise RuntimeError(f"{name}: {message_id} not recorded within {poll + 30}s")
        pickups.append(seen - arrived)
    time.sleep(poll)  # let the last message's moves finish
    start = time.monotonic()
    time.sleep(idle_polls * poll)
    count = requests_since(start)
    if process.poll() is not None:
        raise RuntimeError(f"{name}: mailworker inbound exited {process.returncode}")
    return {
        "pickup_n": len(pickups),
        "pickup_p50_s": round(statistics.median(pickups), 3),
        "pickup_max_s": round(max(pickups), 3),
        "pickup_all_s": [round(p, 3) for p in pickups],
        "pickup_target_s": poll + 1,
        "idle_seconds": round(idle_polls * poll, 1),
        "idle_requests": count,
        "idle_requests_per_poll": round(count / idle_polls, 2),
    }


def _mailworker(config: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MAILWORKER_CONFIG": str(config)}
    return spawn([str(Path(sys.executable).parent / "mailworker"), "inbound"], env=env)


def _graph(
    workdir: Path, url: str, ca: trustme.CA, args: argparse.Namespace
) -> dict[str, Any]:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", HOST).configure_cert(tls)
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    fake = FakeMicrosoft(tls)
    fake.start()
    namespace = f"bpoll-{uuid.uuid4().hex[:8]}"
    config = workdir / "graph.toml"
    config.write_text(
        f'broker_url = "{url}"\nnamespace = "{namespace}"\nlog_format = "json"\n'
        '[status]\nttl = "1h"\n'
        '[integrated_services.graph-mailer]\naccount_type = "service"\n'
        f'tenant_id = "{fake.tenant}"\nclient_id = "{fake.client_id}"\n'
        f'client_secret = "{fake.client_secret}"\nauthority_host = "{fake.url}"\n'
        f'graph_endpoint = "{fake.url}"\nca_bundle = "{ca_file}"\n'
        '[[inbound]]\nname = "bench-graph"\nkind = "graph"\n'
        f'integrated_service = "graph-mailer"\nmailbox = "{MAILBOX}"\n'
        f'poll_interval = "{args.poll_interval}s"\n'
    )
    box = fake.mailboxes.mailbox(MAILBOX)
    store = InboundStore(redis.Redis.from_url(url), namespace=namespace, ttl=3600)

    def drop() -> str:
        message_id, raw = _reply(MAILBOX)
        box.add(raw)
        return message_id

    def since(start: float) -> int:
        return sum(1 for r in fake.mailboxes.requests() if r.at >= start)

    process = _mailworker(config)
    try:
        result = _measure(
            "graph", drop, since, store, process,
            args.poll_interval, args.messages, args.idle_polls,
        )  # fmt: skip
        start = time.monotonic() - result["idle_seconds"]
        ops = [r.op for r in fake.mailboxes.requests() if r.at >= start]
        result["idle_ops"] = sorted(set(ops))
        return result
    finally:
        stop_tree(process)
        fake.stop()


def _imap(
    workdir: Path, url: str, ca: trustme.CA, args: argparse.Namespace
) -> dict[str, Any]:
    dovecot = Dovecot(ca)
    proxy: CountingProxy | None = None
    process: subprocess.Popen[bytes] | None = None
    try:
        dovecot.prepare()
        dovecot.start()
        user = dovecot.add_user()
        secret = workdir / "imap-password"
        secret.write_text(dovecot.users[user] + "\n")
        proxy = CountingProxy(dovecot.imap_port)
        proxy.start()
        namespace = f"bpoll-{uuid.uuid4().hex[:8]}"
        config = workdir / "imap.toml"
        config.write_text(
            f'broker_url = "{url}"\nnamespace = "{namespace}"\nlog_format = "json"\n'
            '[status]\nttl = "1h"\n'
            '[[inbound]]\nname = "bench-imap"\nkind = "imap"\n'
            f'server = "{HOST}"\nport = {proxy.port}\nsecurity = "none"\n'
            f'username = "{user}"\npassword_file = "{secret}"\nfolder = "INBOX"\n'
            'processed_folder = "mailworker-processed"\n'
            'failed_folder = "mailworker-failed"\n'
            f'poll_interval = "{args.poll_interval}s"\ntimeout = "10s"\n'
        )
        store = InboundStore(redis.Redis.from_url(url), namespace=namespace, ttl=3600)
        with dovecot.client(user) as imap:

            def drop() -> str:
                message_id, raw = _reply("actions@example.test")
                append(imap, "INBOX", raw)
                return message_id

            def since(start: float) -> int:
                return sum(1 for line in proxy.since(start) if line.strip())

            process = _mailworker(config)
            result = _measure(
                "imap", drop, since, store, process,
                args.poll_interval, args.messages, args.idle_polls,
            )  # fmt: skip
        start = time.monotonic() - result["idle_seconds"] - 1
        verbs = {
            [*line.split(b" "), b"", b""][1].decode(errors="replace").upper()
            for line in proxy.since(start)
            if line.strip()
        }
        result["idle_ops"] = sorted(verbs)
        return result
    finally:
        if process is not None:
            stop_tree(process)
        if proxy is not None:
            proxy.stop()
        dovecot.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.inbound_poll", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds")
    parser.add_argument("--messages", type=int, default=10, help="per source")
    parser.add_argument("--idle-polls", type=int, default=10)
    parser.add_argument("--sources", nargs="+", default=["graph", "imap"])
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mw-bench-poll-"))
    redis_server = RedisInstance("auto", workdir)
    redis_server.start()
    ca = trustme.CA()
    results: dict[str, Any] = {
        "poll_interval_s": args.poll_interval,
        "messages": args.messages,
        "idle_polls": args.idle_polls,
    }
    runs = {"graph": _graph, "imap": _imap}
    try:
        for name in args.sources:
            results[name] = runs[name](workdir, redis_server.url, ca, args)
            print(f"{name}: {results[name]}", flush=True)
    finally:
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    target = args.poll_interval + 1
    print(
        f"\n{'source':8} {'pickup p50':>11} {'pickup max':>11} {'target':>7} "
        f"{'idle req/poll':>14}"
    )
    for name in args.sources:
        r = results[name]
        print(
            f"{name:8} {r['pickup_p50_s']:>10.2f}s {r['pickup_max_s']:>10.2f}s "
            f"{target:>6.1f}s {r['idle_requests_per_poll']:>14.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"inbound-poll-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
