"""E-mail actions' benchmark: ``.venv/bin/python -m bench.actions``.

Against a Redis of its own:

1. **reply latency**: ``mailworker inbound`` (an smtp source) receives one reply to an
   action key every ``1/--rate`` s over one SMTP session for ``--seconds``; the time from
   the MAIL command to the ``action.accepted`` entry read back from the events stream
   (``XREAD BLOCK``): p50, p99, max.
2. **per-recipient cost**: an in-process worker delivers ``--jobs`` notifications with
   actions to ``--recipients`` recipients each, and, in the same sitting, ``--jobs`` x
   ``--recipients`` plain single-recipient notifications, to an aiosmtpd sink in a
   process of its own; the worker's CPU time and wall time for each, and their ratio.

Every step has a time bound; everything started is stopped. Prints the figures and writes
JSON into bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import smtplib
import statistics
import sys
import tempfile
import threading
import time
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.inbound import Receiver
from bench.infra import RedisInstance, spawn, stop_tree
from common.keys import events_key
from common.sockets import free_port

RESULTS = Path(__file__).resolve().parent / "results"
REPLY = "replies@bench.test"  # bench.inbound's receiver accepts it
SUBJECT = "Approve invoice 42"


def _receiver(workdir: Path, url: str, namespace: str) -> Receiver:
    """``mailworker inbound``: one smtp source taking the reply address, actions on."""
    config = workdir / f"{namespace}.toml"

    def argv(port: int) -> list[str]:
        config.write_text(
            f'broker_url = "{url}"\nnamespace = "{namespace}"\nlog_format = "json"\n'
            '[status]\nttl = "1h"\n'
            '[[inbound]]\nname = "bench"\nkind = "smtp"\n'
            f'listen = "127.0.0.1:{port}"\naccept = ["{REPLY}"]\n'
            f'[email_actions]\nenabled = true\nreply_address = "{REPLY}"\n'
        )
        return [str(Path(sys.executable).parent / "mailworker"), "inbound"]

    env = {**os.environ, "MAILWORKER_CONFIG": str(config)}
    return Receiver("mailworker inbound", argv, env)


def _reply(key: str) -> bytes:
    message = EmailMessage()
    message["From"] = "ann@example.org"
    message["To"] = f"replies+{key}@bench.test"
    message["Subject"] = f"Re: approve: {SUBJECT}"
    message["Message-ID"] = f"<{uuid.uuid4().hex}@example.org>"
    message.set_content(
        "Looks right.\n\nOn Tue, 1 Dec 2026, Notifications wrote:\n> Invoice 42\n"
    )
    return message.as_bytes()


def _keys(client: redis.Redis, namespace: str, n: int) -> list[tuple[str, str]]:
    from producers import Notification
    from worker.actions.keys import ActionKeys

    keys = ActionKeys(client, namespace=namespace, key_ttl=3600, keep=3600)
    job = Notification(
        to=["ann@example.org"],
        subject=SUBJECT,
        text="x",
        actions=[{"id": "approve", "label": "Approve"}],
    )
    out = []
    for _ in range(n):
        job_id = str(uuid.uuid4())
        out.append(
            (job_id, keys.issue(job_id, job, ["ann@example.org"])["ann@example.org"])
        )
    return out


def _latency(
    url: str, rx: Receiver, namespace: str, keys: list[tuple[str, str]], rate: float
) -> dict[str, float]:
    sent: dict[str, float] = {}
    seen: list[float] = []
    reader = redis.Redis.from_url(url)

    def read() -> None:
        last, deadline = "$", time.monotonic() + len(keys) / rate + 30
        while len(seen) < len(keys) and time.monotonic() < deadline:
            for _, entries in (
                reader.xread({events_key(namespace): last}, block=1000, count=100) or []
            ):
                for stream_id, fields in entries:
                    last = stream_id
                    at = sent.get(fields[b"job_id"].decode())
                    if fields[b"type"] == b"action.accepted" and at is not None:
                        seen.append((time.perf_counter() - at) * 1000)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    time.sleep(0.5)  # the reader's XREAD from "$" is in place
    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", rx.port, timeout=10) as smtp:
        for i, (job_id, key) in enumerate(keys):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            raw = _reply(key)
            sent[job_id] = time.perf_counter()
            smtp.sendmail("ann@example.org", [f"replies+{key}@bench.test"], raw)
    thread.join(timeout=30)
    seen.sort()
    q = statistics.quantiles(seen, n=100)
    return {"n": len(keys), "events": len(seen), "rate": rate, "p50_ms": round(q[49], 1),
            "p99_ms": round(q[98], 1), "max_ms": round(seen[-1], 1)}  # fmt: skip


def _deliver(url: str, port: int, jobs: list[Any], workdir: Path) -> dict[str, float]:
    from dramatiq import Worker

    from producers import Producer
    from settings import load_settings
    from worker.app import build

    namespace = f"bact-{uuid.uuid4().hex[:8]}"
    config = workdir / f"{namespace}.toml"
    config.write_text(
        f'broker_url = "{url}"\nnamespace = "{namespace}"\nlog_format = "json"\n'
        '[[smtp]]\nname = "sink"\nfrom_address = "noreply@bench.test"\n'
        f'server = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'
        '[[inbound]]\nname = "r"\nkind = "smtp"\n'
        f'accept = ["{REPLY}"]\n[email_actions]\nenabled = true\nreply_address = "{REPLY}"\n'
    )
    settings = load_settings(config, environ={})
    app = build(settings)
    Producer.from_settings(settings).enqueue_many(jobs, bulk=False)
    app.broker.emit_after("process_boot")
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    worker = Worker(app.broker, worker_threads=4, worker_timeout=50)
    worker.start()
    app.broker.join("mail", timeout=600_000)
    worker.join()
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    worker.stop()
    app.close()
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"jobs": len(jobs), "cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}


def _cost(url: str, workdir: Path, jobs: int, recipients: int) -> dict[str, Any]:
    from producers import Notification

    html = (
        "<html><body>"
        + "<p>Invoice 42 waits for your approval.</p>" * 20
        + "</body></html>"
    )
    text = "Invoice 42 waits for your approval.\n" * 20
    actions = [
        {"id": "approve", "label": "Approve"},
        {"id": "reject", "label": "Reject"},
    ]
    many = [
        Notification(to=[f"u{i}@example.org" for i in range(recipients)], subject=SUBJECT,
                     text=text, html=html, actions=actions)
        for _ in range(jobs)
    ]  # fmt: skip
    single = [
        Notification(to=[f"u{i % recipients}@example.org"], subject=SUBJECT, text=text, html=html)
        for i in range(jobs * recipients)
    ]  # fmt: skip
    port = free_port()
    sink = spawn([sys.executable, "-m", "bench.sink", "--port", str(port)])
    try:
        time.sleep(1.0)
        results = {"singles": _deliver(url, port, single, workdir),
                   "actions": _deliver(url, port, many, workdir)}  # fmt: skip
    finally:
        stop_tree(sink)
    results["cpu_ratio"] = round(
        results["actions"]["cpu_s"] / results["singles"]["cpu_s"], 2
    )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.actions", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rate", type=float, default=50.0, help="replies per second")
    parser.add_argument("--seconds", type=int, default=20, help="of the latency run")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--recipients", type=int, default=5)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mw-bench-actions-"))
    redis_server = RedisInstance("auto", workdir)
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    results: dict[str, Any] = {}
    try:
        namespace = f"bact-{uuid.uuid4().hex[:8]}"
        keys = _keys(client, namespace, int(args.rate * args.seconds))
        with _receiver(workdir, redis_server.url, namespace) as rx:
            results["latency"] = _latency(
                redis_server.url, rx, namespace, keys, args.rate
            )
        print(
            f"reply → action.accepted at {args.rate:g}/s: {results['latency']}",
            flush=True,
        )
        results["cost"] = _cost(redis_server.url, workdir, args.jobs, args.recipients)
        print(
            f"{args.recipients} recipients with actions vs singles: {results['cost']}",
            flush=True,
        )
    finally:
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"actions-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
