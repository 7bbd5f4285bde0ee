"""``mailworker api``: the HTTP API on uvicorn (README, "HTTP API")."""

from __future__ import annotations

import click

from common.exits import EXIT_USAGE, fail, settings_or_fail

__all__ = ["api"]


@click.command()
@click.option(
    "--listen", help="HOST:PORT to bind (default: [api] listen, 127.0.0.1:8025)."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Processes serving the port (each has its own app; rate limits are shared).",
)
@click.option(
    "--forwarded-allow-ips",
    help="Proxies whose X-Forwarded-For/-Proto are trusted (comma-separated, or '*').",
)
@click.option(
    "--graceful-timeout",
    type=click.FloatRange(0, 600),
    default=30.0,
    show_default=True,
    help="Seconds requests in flight get to finish after SIGTERM.",
)
def api(
    listen: str | None,
    workers: int,
    forwarded_allow_ips: str | None,
    graceful_timeout: float,
) -> None:
    """Serve the HTTP API: enqueue, status, dead letters, events (Bearer API keys)."""
    from worker.api.server import ServerOptions, serve, split_listen
    from worker.logging import configure
    from worker.metrics.process import launch

    settings = settings_or_fail()
    address = listen or settings.api.listen
    try:
        host, port = split_listen(address)
    except ValueError:
        fail(EXIT_USAGE, f"--listen: {address!r} is not HOST:PORT")
    configure(log_format=settings.log_format, log_recipients=settings.log_recipients)
    # Counted in [metrics] directory, served at /metrics with the workers' counts.
    launch(settings, "api")
    scheme = "https" if settings.api.tls_certificate_file else "http"
    click.echo(f"mailworker api: serving {scheme}://{address}/", err=True)
    serve(
        settings,
        ServerOptions(
            host=host,
            port=port,
            workers=workers,
            forwarded_allow_ips=forwarded_allow_ips,
            graceful_seconds=graceful_timeout,
        ),
    )
