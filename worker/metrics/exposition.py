"""``/metrics``: every process's samples on the host, and the broker's gauges.

``asgi_app`` is what the API mounts at ``/metrics``; ``serve`` is ``mailworker worker
--metrics``'s server (a Dramatiq fork process). Both read the same directory, so they
show the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from prometheus_client import make_asgi_app, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from common.broker import connect_settings
from settings import Settings
from worker.metrics.broker import BrokerCollector
from worker.metrics.directory import directory_of, subdirectories, sweep

__all__ = [
    "LISTEN_ENV",
    "Exposition",
    "asgi_app",
    "parse_listen",
    "serve",
    "serve_forked",
]

# What `mailworker worker --metrics` hands its metrics process.
LISTEN_ENV = "mailworker_metrics_listen"  # lower case: not a MAILWORKER_ setting


class Exposition(Collector):
    """One scrape: the samples of every process in the directory, then the broker's.

    Args:
        directory: the host's metrics directory (``[metrics] directory``).
        broker: the broker's gauges, or None to leave them out.
    """

    def __init__(self, directory: Path, broker: Collector | None = None) -> None:
        self._directory = directory
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        sweep(self._directory)
        yield from self._merged()
        if self._broker is not None:
            yield from self._broker.collect()

    def _merged(self) -> Iterator[Metric]:
        for _ in range(3):
            files = [
                str(file)
                for path, _ in subdirectories(self._directory)
                for file in path.glob("*.db")
            ]
            try:
                return iter(list(MultiProcessCollector.merge(files, accumulate=True)))  # type: ignore[no-untyped-call]
            except FileNotFoundError:
                continue  # a launcher wiped its directory meanwhile: read again
        return iter(())


def exposition(settings: Settings, client: redis.Redis | None = None) -> Exposition:
    """The collector ``/metrics`` serves for this configuration."""
    client = client or connect_settings(settings)
    return Exposition(directory_of(settings), BrokerCollector(settings, client))


def asgi_app(
    settings: Settings, client: redis.Redis | None = None
) -> Callable[..., Any]:
    """The ASGI app of ``/metrics`` (Prometheus text format; gzip when asked).

    Args:
        settings: the configuration (``[metrics] directory``, the broker).
        client: Redis (default: one from ``broker_url``).
    """
    return make_asgi_app(exposition(settings, client))


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9191`` for IPv6) into its parts.

    Raises:
        ValueError: not ``host:port`` with a port from 1 to 65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]"), int(port)


def serve(settings: Settings, listen: str) -> None:
    """Serve ``/metrics`` on ``listen`` until SIGTERM."""
    host, port = parse_listen(listen)
    server, thread = start_http_server(port, host, registry=exposition(settings))
    try:
        while thread.is_alive():
            thread.join(timeout=1)
    finally:
        server.shutdown()


def serve_forked() -> int:
    """The fork process of ``mailworker worker --metrics`` (Dramatiq's ``--fork-function``).

    It inherits the environment: the configuration and the address to listen on.
    """
    from settings import load_settings

    # Dramatiq's handler makes SIGTERM a SystemExit in this thread: serve stops.
    serve(load_settings(), os.environ[LISTEN_ENV])
    return 0
