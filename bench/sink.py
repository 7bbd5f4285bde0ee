"""An SMTP sink on loopback (aiosmtpd) that times every accepted message.

Run as ``python -m bench.sink --port P``. For each message it accepts it writes one line
to stdout: ``<time.time()> <Message-ID local part or -> <first recipient>``, flushed every
20 ms (the time is taken when the message is accepted, not when the line is written).
It prints ``ready <port>`` first. Used for the latency and priority phases (smtp-sink
cannot report a message's id), and for throughput when Postfix's smtp-sink is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
import time
from typing import Any

from aiosmtpd.smtp import SMTP

_MESSAGE_ID = re.compile(
    rb"^message-id:[ \t]*<([^@>\s]+)@", re.IGNORECASE | re.MULTILINE
)


class _Handler:
    def __init__(self) -> None:
        self.lines: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        now = time.time()
        content: bytes = envelope.original_content or envelope.content or b""
        head = content.split(b"\r\n\r\n", 1)[0]
        found = _MESSAGE_ID.search(head)
        ref = found.group(1).decode("ascii", "replace") if found else "-"
        rcpt = envelope.rcpt_tos[0] if envelope.rcpt_tos else "-"
        self.lines.append(f"{now:.6f} {ref} {rcpt}\n")
        return "250 2.0.0 Ok: queued"


async def _flusher(handler: _Handler, stop: asyncio.Event) -> None:
    out = sys.stdout
    while not stop.is_set():
        if handler.lines:
            lines, handler.lines = handler.lines, []
            out.write("".join(lines))
            out.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)


async def _main(host: str, port: int) -> None:
    handler = _Handler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.bench", ident="bench-sink", timeout=120),
        host=host,
        port=port,
        backlog=1024,
    )
    bound = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {bound}", flush=True)
    flusher = asyncio.create_task(_flusher(handler, stop))
    await stop.wait()
    server.close()
    await flusher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("the sink listens on loopback only")
    asyncio.run(_main(args.host, args.port))


if __name__ == "__main__":
    main()
