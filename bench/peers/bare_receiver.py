"""The receiver's peer: a bare aiosmtpd handler that only stores each message in Redis.

Run as ``python -m bench.peers.bare_receiver --port P --redis URL --prefix K``. It does
what the simplest receiver that loses nothing must: store the message (one ``SET``,
with a TTL) before it answers 250, through a thread pool as our receiver does, so that
the loop is never blocked by Redis. Prints ``ready <port>``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from aiosmtpd.smtp import SMTP


class _Store:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._pool = ThreadPoolExecutor(8)

    def _save(self, content: bytes) -> None:
        key = f"{self._prefix}:{hashlib.sha256(content).hexdigest()}"
        self._client.set(key, content, ex=3600)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        content: bytes = envelope.original_content or b""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._save, content)
        except redis.RedisError:
            return "451 4.3.0 try again later"
        return "250 2.0.0 stored"


async def _main(port: int, url: str, prefix: str, size: int) -> None:
    store = _Store(redis.Redis.from_url(url), prefix)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(store, hostname="bare.bench", data_size_limit=size, timeout=120),
        host="127.0.0.1",
        port=port,
        backlog=1024,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--size", type=int, default=10_485_760)
    args = parser.parse_args()
    asyncio.run(_main(args.port, args.redis, args.prefix, args.size))


if __name__ == "__main__":
    main()
