"""Memory per large message in flight: ``.venv/bin/python -m bench.memory``.

Starts its own Redis (or uses the one on 127.0.0.1:6379 under its own key prefixes), a
holding SMTP sink on loopback in this process, and one ``mailworker worker -p 1 -t T``
per run. Each run enqueues ``--messages`` notifications with an attachment of ``--mb``
MB each; the sink reads each message to its final dot and holds the reply until all of
them have arrived, so all are in flight in the worker at once. The worker process's
peak RSS (the kernel's ``VmHWM``, reset with ``clear_refs`` once the worker is warm)
over its RSS before, divided by the attachment megabytes in flight, is the figure.

With ``--waiting W``, W more such messages are enqueued: the worker fetches them (up to
2 x threads messages per queue) and holds them until a thread is free; the figure is
still per MB in flight.

Then one wire-format job whose attachment makes it ``--refused-mb`` MB on the wire
(over ``limits.max_message_bytes``) is enqueued: the worker refuses it. Reported: the
peak RSS growth of that refusal and the size of its dead letter in Redis.

``--against REV`` runs commit REV's product (``git archive``) too, alternating runs with
the work tree's, so a before/after comparison sees the same machine load. Every wait is
bounded; everything started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis

from bench.common import FROM_ADDRESS, TO_ADDRESS, delete_prefix
from bench.infra import RedisInstance, product_at, regular_packages, spawn, stop_tree

REPO = Path(__file__).resolve().parent.parent


MB = 1024 * 1024
_HELD = 1 * MB  # messages at least this large are held until all have arrived


class HoldingSink:
    """A raw SMTP server (asyncio, in a thread of this process) that discards what it
    reads and replies to the final dot of a large message only once ``hold`` large
    messages have arrived (and ``release()`` was called); small ones at once."""

    def __init__(self) -> None:
        self.port = 0
        self.hold = 0
        self.arrived = 0  # large messages read to their final dot
        self.sizes: list[int] = []
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._release: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="sink")
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the holding sink did not start")

    def reset(self, hold: int) -> None:
        """Hold the next ``hold`` large messages until ``release()``."""
        with self._cond:
            self.hold, self.arrived, self.sizes = hold, 0, []
        self._loop.call_soon_threadsafe(self._new_release)

    def _new_release(self) -> None:
        self._release = asyncio.Event()

    def release(self) -> None:
        self._loop.call_soon_threadsafe(lambda: self._release and self._release.set())

    def wait_arrived(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.arrived >= count, timeout)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._release = asyncio.Event()
        server = self._loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", 0, limit=256 * MB)
        )
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"220 hold.bench ESMTP\r\n")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-hold.bench\r\n250-PIPELINING\r\n250 SIZE\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    content = await reader.readuntil(b"\r\n.\r\n")
                    await self._arrived(len(content))
                    del content
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:  # MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        writer.close()

    async def _arrived(self, size: int) -> None:
        if size < _HELD:
            return
        with self._cond:
            self.arrived += 1
            self.sizes.append(size)
            self._cond.notify_all()
        assert self._release is not None
        await self._release.wait()


@dataclass
class Sample:
    """One run of one product."""

    label: str
    baseline: int = 0  # RSS of the warm worker process, bytes
    peak_held: int = 0  # VmHWM while every message was held at the sink
    peak: int = 0  # VmHWM after all were sent
    refused_peak: int = 0  # VmHWM growth while refusing the oversized job
    dead_letter: int = 0  # bytes of its dead letter in Redis
    notes: list[str] = field(default_factory=list)


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(key.encode() + b":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS


def _worker_pid(root: int, timeout: float = 30) -> int:
    """The worker process: the child of the `mailworker worker` tree with the most RSS."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(root).children(recursive=True)
        if children:
            return max(children, key=lambda p: p.memory_info().rss).pid
        time.sleep(0.1)
    raise RuntimeError("no worker process started")


def _extract(rev: str, target: Path) -> str:
    """The product's packages at commit ``rev``, unpacked into ``target``."""
    git = shutil.which("git") or "git"
    archive = subprocess.run(
        [git, "-C", str(REPO), "archive", "--format=tar", rev, "--", *product_at(rev)],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    regular_packages(target)
    return str(target)


class Bench:
    """Runs the worker of one product against the sink, as often as asked."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.redis = RedisInstance("auto", workdir)
        self.sink = HoldingSink()
        self.mailworker = str(Path(sys.executable).parent / "mailworker")

    def __enter__(self) -> Bench:
        self.redis.start()
        self.sink.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sink.stop()
        self.redis.stop()

    def _config(self, ns: str) -> Path:
        path = self.workdir / f"{ns}.toml"
        path.write_text(
            f'broker_url = "{self.redis.url}"\nnamespace = "{ns}"\nlog_format = "json"\n'
            f'\n[[smtp]]\nname = "sink"\nfrom_address = "{FROM_ADDRESS}"\n'
            f'server = "127.0.0.1"\nport = {self.sink.port}\nsecurity = "none"\n'
            "timeout = 120\n"
        )
        return path

    def _env(self, config: Path, pythonpath: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
        env["MAILWORKER_CONFIG"] = str(config)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        return env

    def run(self, label: str, pythonpath: str) -> Sample:
        """One worker, warm-up job, the large messages held, the refused one."""
        ns = f"mem-{uuid.uuid4().hex[:8]}"
        config = self._config(ns)
        client = self.redis.client()
        log = (self.workdir / f"{ns}.log").open("ab")
        argv = [self.mailworker, "worker", "-p", "1", "-t", str(self.args.threads)]
        worker = spawn(argv, env=self._env(config, pythonpath), stdout=log)
        sample = Sample(label)
        try:
            self._measure(client, ns, worker.pid, sample)
        finally:
            stop_tree(worker, timeout=20)
            log.close()
            delete_prefix(client, f"{ns}:")
        return sample

    def _measure(self, client: redis.Redis, ns: str, root: int, sample: Sample) -> None:
        from producers import Notification, Producer

        args = self.args
        producer = Producer(client, namespace=ns)
        self.sink.reset(0)
        warm = producer.enqueue(_job(Notification, 0.01))
        _wait_state(client, ns, [warm], "sent", 60)
        pid = _worker_pid(root)
        time.sleep(0.5)
        sample.baseline = _status(pid, "VmRSS")
        _reset_peak(pid)
        self.sink.reset(args.messages)
        ids = [
            producer.enqueue(_job(Notification, args.mb))
            for _ in range(args.messages + args.waiting)
        ]
        if not self.sink.wait_arrived(args.messages, 300):
            sample.notes.append(f"only {self.sink.arrived} arrived")
        time.sleep(0.3)
        sample.peak_held = _status(pid, "VmHWM")
        self.sink.release()
        _wait_state(client, ns, ids, "sent", 120)
        sample.peak = _status(pid, "VmHWM")
        if args.refused_mb:
            time.sleep(0.3)
            before = _status(pid, "VmRSS")
            _reset_peak(pid)
            job_id = _wire_job(client, ns, args.refused_mb)
            _wait_state(client, ns, [job_id], "dead", 120)
            sample.refused_peak = _status(pid, "VmHWM") - before
            sample.dead_letter = int(client.strlen(f"{ns}:dead:{job_id}"))


def _job(notification: Any, mb: float) -> Any:
    return notification(
        to=[TO_ADDRESS],
        subject="A large attachment",
        text="See the attachment.",
        attachments=[
            {
                "filename": "large.bin",
                "content_type": "application/octet-stream",
                "content": os.urandom(int(mb * MB)),
            }
        ],
    )


def _wire_job(client: redis.Redis, ns: str, wire_mb: float) -> str:
    """A job written in the wire format, ``wire_mb`` MB of base64 attachment."""
    job_id, redis_id = str(uuid.uuid4()), str(uuid.uuid4())
    content = base64.b64encode(os.urandom(int(wire_mb * MB * 3 / 4))).decode()
    payload = {
        "queue_name": "mail",
        "actor_name": "deliver",
        "args": [],
        "kwargs": {
            "job": {
                "to": [TO_ADDRESS],
                "subject": "Too large",
                "text": "x",
                "attachments": [{"filename": "big.bin", "content": content}],
            }
        },
        "options": {"redis_message_id": redis_id},
        "message_id": job_id,
        "message_timestamp": int(time.time() * 1000),
    }
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{ns}:mail.msgs", redis_id, json.dumps(payload))
        pipe.rpush(f"{ns}:mail", redis_id)
        pipe.execute()
    return job_id


def _wait_state(
    client: redis.Redis, ns: str, ids: list[str], state: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(f"{ns}:job:{job_id}", "state")
            states = pipe.execute()
        if all(s == state.encode() for s in states):
            return
        time.sleep(0.1)
    raise RuntimeError(f"jobs not {state} after {timeout:g}s")


def _report(samples: list[Sample], args: argparse.Namespace) -> str:
    flight = args.messages * args.mb
    waiting = f", {args.waiting} more waiting" if args.waiting else ""
    out = [
        f"{args.messages} messages x {args.mb:g} MB attachment in flight "
        f"({flight:g} MB{waiting}), -p 1 -t {args.threads}; RSS in MB",
        "",
        "| product | run | warm RSS | peak held | peak | per MB in flight "
        "| refused: peak growth | dead letter KB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(samples):
        per = (s.peak - s.baseline) / MB / flight
        out.append(
            f"| {s.label} | {i // len({x.label for x in samples}) + 1} "
            f"| {s.baseline / MB:.0f} | {s.peak_held / MB:.0f} | {s.peak / MB:.0f} "
            f"| {per:.2f} | {s.refused_peak / MB:.0f} | {s.dead_letter / 1024:,.1f} "
            f"{' '.join(s.notes)}|"
        )
    out.append("")
    for label in dict.fromkeys(s.label for s in samples):
        pers = [
            (s.peak - s.baseline) / MB / flight for s in samples if s.label == label
        ]
        out.append(f"{label}: median {statistics.median(pers):.2f} MB RSS per MB")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4)
    parser.add_argument("--mb", type=float, default=18.0, help="attachment size")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--waiting",
        type=int,
        default=0,
        help="more messages, fetched by the worker but waiting for a thread",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--refused-mb", type=float, default=30.0)
    parser.add_argument("--against", metavar="REV", help="also run this commit")
    args = parser.parse_args()
    if args.messages > args.threads:
        parser.error("--messages must not exceed --threads (all in flight at once)")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        workdir = Path(tmp)
        products = [("work tree", "")]
        if args.against:
            before = _extract(args.against, workdir / "before")
            products.insert(0, (args.against, before))
        samples: list[Sample] = []
        with Bench(args, workdir) as bench:
            for _ in range(args.runs):
                for label, path in products:
                    samples.append(bench.run(label, path))
                    print(f"  {label}: peak {samples[-1].peak / MB:.0f} MB", flush=True)
        print(_report(samples, args))


if __name__ == "__main__":
    main()
