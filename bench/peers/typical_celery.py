"""3b. Typical Celery peer: the same ``EmailMessage`` task as the typical Dramatiq peer,
on Celery with the Redis broker; the harness runs it with ``--pool threads``."""

from __future__ import annotations

from bench.common import ENV_NAMESPACE, ENV_QUEUE, ENV_REDIS_URL, env
from bench.peers._celery import make_app
from bench.peers.typical import build, send_reused

app = make_app(env(ENV_REDIS_URL), env(ENV_NAMESPACE), env(ENV_QUEUE, "bench"))


@app.task(name="send_notification")
def send_notification(
    to: str, subject: str, text: str, html: str, **_job: object
) -> None:
    """Build and send one notification."""
    send_reused(build(to, subject, text, html))


__all__ = ["app", "send_notification"]
