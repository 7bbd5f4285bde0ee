"""``mailworker api``'s server: uvicorn with our logging, TLS, workers, graceful stop.

``factory`` is what each uvicorn worker process imports: it loads the configuration
(``MAILWORKER_CONFIG``, the environment) once and builds the app.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from common.sockets import free_port
from settings import Settings, load_settings
from worker.api.accesslog import AccessLog
from worker.api.app import create_app

__all__ = [
    "BackgroundServer",
    "ServerOptions",
    "factory",
    "serve",
    "split_listen",
    "uvicorn_options",
]


def factory() -> AccessLog:
    """The app, from the configuration this process finds (uvicorn's ``--factory``)."""
    from worker.logging import configure
    from worker.metrics.process import worker_process

    settings = load_settings()
    configure(log_format=settings.log_format, log_recipients=settings.log_recipients)
    worker_process(settings)  # counts in the directory `mailworker api` prepared
    return AccessLog(create_app(settings))


@dataclass(frozen=True)
class ServerOptions:
    """How ``mailworker api`` serves: where, how many processes, behind which proxies."""

    host: str
    port: int
    workers: int = 1
    forwarded_allow_ips: str | None = None  # proxies whose X-Forwarded-* are trusted
    graceful_seconds: float = 30.0


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8025`` too) as (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def uvicorn_options(settings: Settings, options: ServerOptions) -> dict[str, Any]:
    """uvicorn's options: our logging, TLS from ``[api]``, no server banner."""
    api = settings.api
    return {
        "host": options.host,
        "port": options.port,
        "log_config": None,  # uvicorn's loggers go through ours (worker.logging)
        "access_log": False,  # worker.api.accesslog writes one line per request
        "proxy_headers": options.forwarded_allow_ips is not None,
        "forwarded_allow_ips": options.forwarded_allow_ips,
        "ssl_certfile": str(api.tls_certificate_file)
        if api.tls_certificate_file
        else None,
        "ssl_keyfile": str(api.tls_key_file) if api.tls_key_file else None,
        "timeout_graceful_shutdown": int(options.graceful_seconds),
        "timeout_keep_alive": 5,
        "server_header": False,
        "lifespan": "off",
    }


def serve(settings: Settings, options: ServerOptions) -> None:
    """Serve until SIGINT or SIGTERM; then finish the requests in flight and stop.

    One process serves the app built here; with ``workers`` > 1 uvicorn runs that many
    processes, each building its own app from the same configuration (``factory``).
    """
    opts = uvicorn_options(settings, options)
    if options.workers > 1:
        uvicorn.run(
            "worker.api.server:factory", factory=True, workers=options.workers, **opts
        )
    else:
        uvicorn.run(AccessLog(create_app(settings)), **opts)


class BackgroundServer:
    """The API served by uvicorn in a thread of this process (``mailworker dev``, tests).

    Args:
        app: the ASGI app.
        settings: for uvicorn's options (TLS).
        host: the address to bind.
        port: the port (0: a free one, then read ``port``).
    """

    def __init__(self, app: Any, settings: Settings, host: str, port: int) -> None:
        self.port = port or free_port()
        options = uvicorn_options(settings, ServerOptions(host=host, port=self.port))
        self._server = uvicorn.Server(uvicorn.Config(app, **options))
        self._thread = threading.Thread(
            target=self._server.run, name="mailworker-api", daemon=True
        )

    def start(self, timeout: float = 15.0) -> None:
        """Serve, and return once the port listens.

        Raises:
            RuntimeError: it did not start within ``timeout`` seconds.
        """
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the API did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Finish the requests in flight and stop."""
        self._server.should_exit = True
        self._thread.join(10)
