"""The Celery app of the typical Celery peer, shared by its worker and the harness."""

from __future__ import annotations

from celery import Celery


def make_app(url: str, namespace: str, queue: str) -> Celery:
    """A Celery app on ``url`` whose keys all start with ``namespace:`` (kombu's
    ``global_keyprefix``), so the harness can remove them without touching anything else."""
    celery = Celery("bench_typical", broker=url, set_as_current=False)
    celery.conf.update(
        broker_transport_options={"global_keyprefix": f"{namespace}:"},
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    return celery


__all__ = ["make_app"]
