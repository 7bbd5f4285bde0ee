"""Tells a running bulk message that the worker is stopping."""

from __future__ import annotations

import threading

from dramatiq import Broker, Middleware, Worker

__all__ = ["Draining"]


class Draining(Middleware):
    """Sets ``event`` when the worker begins to shut down.

    A bulk message in progress can then hand its remaining jobs back to the queue instead
    of outliving the stop timeout.
    """

    def __init__(self) -> None:
        self.event = threading.Event()

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self.event.clear()

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self.event.set()
