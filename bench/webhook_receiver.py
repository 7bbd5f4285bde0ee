"""A webhook receiver on loopback for ``bench.run --webhook``: 204 to every POST, counted.

Run as ``python -m bench.webhook_receiver --port P``. It answers each request at once
(HTTP/1.1 keep-alive, no signature check: the receiver's own cost is kept small so the
workers' side is what is measured), prints ``ready <port>`` first and then, every second
in which requests came, ``<time.time()> <requests so far>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time

_ANSWER = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"


class _Receiver(asyncio.Protocol):
    count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            _Receiver.count += 1
            self.transport.write(_ANSWER)


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Receiver, "127.0.0.1", port)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    seen = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1)
        if _Receiver.count != seen:
            seen = _Receiver.count
            print(f"{time.time():.3f} {seen}", flush=True)
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_receiver")
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(_serve(parser.parse_args().port))
    sys.exit(0)


if __name__ == "__main__":
    main()
