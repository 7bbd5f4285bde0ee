"""What the ``dramatiq`` CLI imports in each worker process: the only import-time wiring."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from settings import load_settings
from worker.app import build, secrets_of
from worker.logging import configure
from worker.metrics.process import worker_process

__all__ = ["app", "broker"]

_Handler = Callable[[int, FrameType | None], Any]


class _StopOnce:
    """A worker process's handler for SIGTERM, SIGHUP and SIGINT.

    The first of them stops the process gracefully. Further SIGTERMs and SIGHUPs do
    nothing more.

    A supervisor that signals the whole group (systemd's default
    ``KillMode=control-group``, foreman, honcho, ``kill -TERM -PGID``) reaches each
    worker process twice: directly, and through the main process, which forwards
    what it gets. Dramatiq's own handler takes the second as "kill now", mid-send.
    Escalation is left to SIGKILL, at the supervisor's stop timeout (which is above
    ``--shutdown-timeout``, the longest a stopping process waits for its jobs).

    Only a second SIGINT kills: Ctrl-C twice at a terminal means "hurry up" (a
    terminal sends SIGINT to the group, and the main process forwards it as SIGTERM).
    """

    def __init__(self, dramatiq_handler: _Handler) -> None:
        self._dramatiq_handler = dramatiq_handler
        self._stopping = False
        self._interrupts = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
        if not self._stopping or self._interrupts > 1:
            self._stopping = True
            # Its first call stops the process, a second one exits it at once.
            self._dramatiq_handler(signum, frame)


def _stop_once() -> None:
    # Relies on one Dramatiq internal (minor version pinned): dramatiq.cli's
    # worker_process installs its SIGTERM handler, the same for SIGHUP, before it
    # imports this module. That handler stops the process on its first call and kills
    # it on its second. There is no hook before that, so the handler is wrapped here,
    # before the slow part of the import. Anywhere else (SIGTERM not handled by a
    # function) nothing changes.
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        stop_once = _StopOnce(handler)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, stop_once)


_stop_once()  # first: loading and building take a while
settings = load_settings()
configure(
    log_format=settings.log_format,
    log_recipients=settings.log_recipients,
    secrets=secrets_of(settings),
)
worker_process(settings)  # before build: its metrics exist from the first job
app = build(settings)
broker = app.broker
