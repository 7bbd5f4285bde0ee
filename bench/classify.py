"""How many inbound messages a second ``classify`` reads: ``.venv/bin/python -m bench.classify``.

Each message is about 10 KB: a human reply (text and HTML alternatives), each sample
bounce of tests/samples/bounces padded with a quoted original, and an out-of-office
reply. One thread, the median of five timed rounds after a warm-up; prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from worker.inbound.classify import classify

SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "samples" / "bounces"
SIZE = 10 * 1024
LINE = "This line of the message body says something quite ordinary, as mail does.\n"


def reply() -> bytes:
    """A 10 KB reply: multipart/alternative, text and HTML halves."""
    text = LINE * (SIZE // 2 // len(LINE))
    head = (
        "From: Bob Example <bob@example.org>\n"
        "To: Workflow <actions+3f1c2a9e@workflow.example.com>\n"
        "Subject: Re: Invoice 42 awaits your approval\n"
        "Message-ID: <CAF=x7ZbQm3k9V2w@mail.example.org>\n"
        "In-Reply-To: <3f1c2a9e-7b5d-4c1e-9a8f-2d6b0e4c5a17@workflow.example.com>\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/alternative; boundary="b1"\n\n'
    )
    body = (
        f"--b1\nContent-Type: text/plain; charset=utf-8\n\nAPPROVE\n\n{text}\n"
        f"--b1\nContent-Type: text/html; charset=utf-8\n\n<p>APPROVE</p><pre>{text}</pre>\n"
        "--b1--\n"
    )
    return (head + body).encode()


def padded(path: Path) -> bytes:
    """A sample grown to about 10 KB by a longer body before its last line."""
    raw = path.read_bytes()
    pad = (LINE * max(0, (SIZE - len(raw)) // len(LINE))).encode()
    cut = raw.rstrip().rfind(b"\n") + 1
    return raw[:cut] + pad + raw[cut:]


def rate(raw: bytes, rounds: int, count: int) -> float:
    """Messages a second, the median of ``rounds`` rounds of ``count`` messages."""
    for _ in range(count // 10):
        classify(raw)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            classify(raw)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    """Print messages a second for each kind of message."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=500, help="messages a round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    messages = {"human reply (multipart/alternative)": reply()}
    for path in sorted(SAMPLES.glob("*.eml")):
        messages[path.stem] = padded(path)
    print(f"{'message':40} {'bytes':>7} {'kind':>10} {'msg/s':>8} {'µs/msg':>8}")
    for name, raw in messages.items():
        per_second = rate(raw, args.rounds, args.count)
        kind = classify(raw).kind
        print(
            f"{name:40} {len(raw):7} {kind:>10} {per_second:8.0f} {1e6 / per_second:8.0f}"
        )


if __name__ == "__main__":
    main()
