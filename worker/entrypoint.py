"""What the ``dramatiq`` CLI imports in each worker process: the only import-time wiring."""

from __future__ import annotations

from settings import load_settings
from worker.app import build, secrets_of
from worker.logging import configure

settings = load_settings()
configure(
    log_format=settings.log_format,
    log_recipients=settings.log_recipients,
    secrets=secrets_of(settings),
)
app = build(settings)
broker = app.broker

__all__ = ["app", "broker"]
