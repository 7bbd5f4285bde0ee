"""``ProcessMetrics``: a worker process's live gauges, and its mark when it stops."""

from __future__ import annotations

from dramatiq import Broker, Middleware, Worker
from dramatiq.broker import MessageProxy

from worker.broker.keys import q_name
from worker.metrics.process import stop
from worker.metrics.recorder import recorder

__all__ = ["ProcessMetrics"]

_COUNTED = "_mailworker_in_progress"


class ProcessMetrics(Middleware):
    """Counts the messages in progress and the threads, and marks the process dead at exit.

    Its live gauges must leave with the process (``mark_process_dead``), and Dramatiq's
    worker processes end in ``os._exit``, where no ``atexit`` runs: so it is done once
    the worker stopped. A process killed outright is marked by the next scrape
    (``worker.metrics.directory.sweep``).
    """

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        recorder().threads(worker.worker_threads)

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        # Marked, so that a message another middleware skipped first is not taken off.
        vars(message)[_COUNTED] = True
        recorder().in_progress(q_name(message.queue_name), 1)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        self._done(message)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self._done(message)

    @staticmethod
    def _done(message: MessageProxy) -> None:
        if vars(message).pop(_COUNTED, False):
            recorder().in_progress(q_name(message.queue_name), -1)

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        stop()
