"""The inbound receiver's benchmark: ``.venv/bin/python -m bench.inbound``.

Against a Redis of its own it runs ``mailworker inbound`` (an smtp source) and, as the
peer, a bare aiosmtpd handler that only stores each message in Redis
(``bench.peers.bare_receiver``), and measures, for both in the same sitting:

1. **replies**: Postfix's ``smtp-source`` sends N 10 KB messages over 8 sessions (each
   with its own Message-ID and an "Automatic reply:" subject, so each is classified and
   recorded as an auto-reply, then answered 250): messages/s.
2. **dsns**: N distinct DSNs, each for a job that exists, over 8 smtplib sessions: our
   receiver marks the recipient bounced, adds the event and suppresses the address.
3. **latency** (ours): one DSN every 10 ms (100 msg/s) for ``--seconds``; time from MAIL
   to the 250 (which comes only once the outcome is recorded): p50, p99.
4. **memory** (ours): RSS of the receiver while ``smtp-source`` sends ``--memory-n``
   messages, sampled every second: first and last tenth compared.

Every step has a time bound; everything started is stopped. Prints a table and writes
JSON into bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import smtplib
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

import orjson
import psutil
import redis

from bench.infra import RedisInstance, spawn, stop_tree
from common.sockets import free_port

RESULTS = Path(__file__).resolve().parent / "results"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
REPLY_TO = "replies@bench.test"
SESSIONS = 8


def _wait_ready(
    port: int, process: subprocess.Popen[bytes], timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode}")
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=2) as client:
                if client.noop()[0] == 250:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port} within {timeout}s")


class Receiver:
    """One contender: started on a free port, stopped by its pid."""

    def __init__(
        self, name: str, argv: Callable[[int], list[str]], env: dict[str, str]
    ):
        self.name = name
        self.port = free_port()
        self._argv = argv(self.port)
        self._env = env
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Receiver:
        self.process = spawn(self._argv, env=self._env)
        _wait_ready(self.port, self.process)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop_tree(self.process)


def _ours(workdir: Path, url: str, namespace: str) -> Receiver:
    config = workdir / f"{namespace}.toml"

    def argv(port: int) -> list[str]:
        config.write_text(
            f'broker_url = "{url}"\nnamespace = "{namespace}"\nlog_format = "json"\n'
            '[status]\nttl = "1h"\n'
            '[[inbound]]\nname = "bench"\nkind = "smtp"\n'
            f'listen = "127.0.0.1:{port}"\naccept = ["{REPLY_TO}"]\n'
        )
        return [str(Path(sys.executable).parent / "mailworker"), "inbound"]

    env = {**os.environ, "MAILWORKER_CONFIG": str(config)}
    # Its log lines (one per message) go to /dev/null, as a supervisor's would go to
    # a file: the cost of writing them is measured, that of reading them is not.
    return Receiver("mailworker inbound", argv, env)


def _bare(url: str, prefix: str) -> Receiver:
    def argv(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.peers.bare_receiver",
            "--port",
            str(port),
            "--redis",
            url,
            "--prefix",
            prefix,
        ]

    return Receiver("bare aiosmtpd + Redis SET", argv, dict(os.environ))


def _smtp_source(port: int, n: int, timeout: float) -> float:
    """Seconds ``smtp-source`` takes to send ``n`` 10 KB messages over 8 sessions."""
    started = time.perf_counter()
    subprocess.run(
        [
            SMTP_SOURCE,
            "-s",
            str(SESSIONS),
            "-m",
            str(n),
            "-l",
            "10240",
            "-f",
            "someone@elsewhere.test",
            "-S",
            "Automatic reply: out of the office",
            "-t",
            REPLY_TO,
            f"127.0.0.1:{port}",
        ],
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def _dsn(job_id: str, recipient: str) -> bytes:
    boundary = uuid.uuid4().hex
    text = (
        "From: MAILER-DAEMON@mx.bench.test\r\n"
        f"To: {REPLY_TO}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@mx.bench.test>\r\n"
        "MIME-Version: 1.0\r\nAuto-Submitted: auto-replied\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f' boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\n"
        + "Your message could not be delivered.\r\n"
        * 200
        + f"\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.bench.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: User unknown\r\n\r\n"
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: n@bench.test\r\nTo: {recipient}\r\nMessage-ID: <{job_id}@bench.test>\r\n"
        f"\r\n--{boundary}--\r\n"
    )
    return text.encode()


def _jobs(client: redis.Redis, namespace: str, n: int) -> list[bytes]:
    """``n`` sent jobs (records as a worker writes them), and a DSN for each."""
    messages = []
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            job_id, rcpt = uuid.uuid4().hex, f"r{i}@dest.bench.test"
            recipients = [
                {"address": rcpt, "state": "accepted", "code": 250, "message": ""}
            ]
            pipe.hset(
                f"{namespace}:job:{job_id}",
                mapping={
                    "id": job_id,
                    "state": "sent",
                    "service": "graph",
                    "recipients": orjson.dumps(recipients),
                },
            )
            pipe.expire(f"{namespace}:job:{job_id}", 3600)
            messages.append(_dsn(job_id, rcpt))
        pipe.execute()
    return messages


def _cpu(rx: Receiver) -> float:
    """Seconds of CPU the receiver has used (user and system): a figure that a busy
    machine disturbs far less than a rate."""
    assert rx.process is not None
    times = psutil.Process(rx.process.pid).cpu_times()
    return times.user + times.system


def _send_all(port: int, messages: list[bytes], timeout: float) -> float:
    """Seconds to send ``messages`` over 8 smtplib sessions; every one must be 250."""
    chunks = [messages[i::SESSIONS] for i in range(SESSIONS)]
    errors: list[str] = []

    def run(chunk: list[bytes]) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as client:
                for raw in chunk:
                    client.sendmail("", [REPLY_TO], raw)
        except (smtplib.SMTPException, OSError) as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} sessions failed: {errors[0]}")
    return elapsed


def _latency(port: int, messages: list[bytes], rate: float) -> dict[str, float]:
    """Send at ``rate`` msg/s on one session; MAIL → 250 times in ms."""
    times: list[float] = []
    interval = 1 / rate
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        start = time.perf_counter()
        for i, raw in enumerate(messages):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            began = time.perf_counter()
            client.sendmail("", [REPLY_TO], raw)
            times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return {
        "n": len(times),
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[int(len(times) * 0.99) - 1], 2),
        "max_ms": round(times[-1], 2),
    }


def _memory(rx: Receiver, n: int, timeout: float) -> dict[str, Any]:
    assert rx.process is not None
    proc = psutil.Process(rx.process.pid)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append((time.monotonic(), proc.memory_info().rss))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    elapsed = _smtp_source(rx.port, n, timeout)
    done.set()
    sampler.join()
    tenth = max(1, len(samples) // 10)
    first = max(r for _, r in samples[:tenth]) / 2**20
    last = max(r for _, r in samples[-tenth:]) / 2**20
    return {
        "n": n,
        "seconds": round(elapsed, 1),
        "rss_first_tenth_mb": round(first, 1),
        "rss_last_tenth_mb": round(last, 1),
        "rss_peak_mb": round(max(r for _, r in samples) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.inbound", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--n", type=int, default=5000, help="messages per throughput run"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=20, help="of the latency run")
    parser.add_argument("--memory-n", type=int, default=100_000)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mw-bench-inbound-"))
    redis_server = RedisInstance("auto", workdir)
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    results: dict[str, Any] = {"n": args.n, "runs": args.runs, "sessions": SESSIONS}
    bound = 600.0
    try:
        for scenario in ("replies", "dsns"):
            for run in range(args.runs):
                for kind in ("ours", "bare"):
                    namespace = f"bin-{uuid.uuid4().hex[:8]}"
                    rx = (
                        _ours(workdir, redis_server.url, namespace)
                        if kind == "ours"
                        else _bare(redis_server.url, namespace)
                    )
                    messages = (
                        _jobs(client, namespace, args.n) if scenario == "dsns" else []
                    )
                    with rx:
                        before = _cpu(rx)
                        seconds = (
                            _smtp_source(rx.port, args.n, bound)
                            if scenario == "replies"
                            else _send_all(rx.port, messages, bound)
                        )
                        cpu_us = (_cpu(rx) - before) / args.n * 1e6
                    rate = args.n / seconds
                    runs = results.setdefault(scenario, {})
                    runs.setdefault(kind, []).append(round(rate, 1))
                    runs.setdefault(f"{kind}_cpu_us", []).append(round(cpu_us))
                    print(
                        f"{scenario} run {run + 1} {rx.name}: {rate:,.0f} msg/s, "
                        f"{cpu_us:,.0f} us of receiver CPU a message",
                        flush=True,
                    )
        namespace = f"bin-{uuid.uuid4().hex[:8]}"
        with _ours(workdir, redis_server.url, namespace) as rx:
            messages = _jobs(client, namespace, args.seconds * 100)
            results["latency"] = _latency(rx.port, messages, 100.0)
            print(f"latency at 100 msg/s: {results['latency']}", flush=True)
            results["memory"] = _memory(rx, args.memory_n, 3600)
            print(
                f"memory over {args.memory_n:,} messages: {results['memory']}",
                flush=True,
            )
    finally:
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for scenario in ("replies", "dsns"):
        ours = statistics.median(results[scenario]["ours"])
        bare = statistics.median(results[scenario]["bare"])
        results[scenario]["ratio"] = round(ours / bare, 2)
        ours_cpu = statistics.median(results[scenario]["ours_cpu_us"])
        bare_cpu = statistics.median(results[scenario]["bare_cpu_us"])
        results[scenario]["cpu_ratio"] = round(bare_cpu / ours_cpu, 2)
        print(
            f"{scenario}: ours {ours:,.0f} msg/s, bare {bare:,.0f} msg/s, "
            f"ratio {ours / bare:.2f}; CPU a message ours {ours_cpu:,.0f} us, "
            f"bare {bare_cpu:,.0f} us, bare/ours {bare_cpu / ours_cpu:.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"inbound-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
