"""Turning metrics on in a process of ours: launchers, and Dramatiq's worker processes."""

from __future__ import annotations

import os

import structlog

from settings import Settings
from worker.metrics.directory import ENV, mark_dead, prepare
from worker.metrics.recorder import Recorder, install, recorder

__all__ = ["launch", "stop", "worker_process"]

log = structlog.get_logger("mailworker.metrics")


def launch(settings: Settings, role: str, *, record: bool = True) -> Recorder:
    """Metrics for a launching process (``role``: worker, api, inbound).

    It wipes its subdirectory of the host's directory and points the processes it
    starts there. With ``record`` it counts in this process too (the API, inbound);
    ``mailworker worker``'s main process counts nothing, its worker processes do.

    Returns:
        This process's recorder. It records nothing when ``[metrics] enabled`` is off
        or the directory cannot be made (logged: delivery does not depend on metrics).
    """
    if not settings.metrics.enabled:
        return recorder()
    try:
        directory = prepare(settings, role)
    except OSError as exc:
        log.warning("metrics_unavailable", error=str(exc))
        return recorder()
    log.debug("metrics_directory", directory=str(directory))
    return install(Recorder.live()) if record else recorder()


def worker_process(settings: Settings) -> Recorder:
    """Metrics in a worker process, when its launcher prepared the directory."""
    if settings.metrics.enabled and os.environ.get(ENV):
        return install(Recorder.live())
    return recorder()


def stop() -> None:
    """Take this process's live gauges out as it ends (``mark_process_dead``)."""
    if recorder().enabled:
        mark_dead(os.getpid())
