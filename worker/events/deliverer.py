"""One webhook's delivery loop in one worker process: new events, due retries, stale claims."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import redis
import structlog

from settings import RetryPolicy, Webhook
from worker.clock import iso_millis
from worker.events.letters import error_record, letter_fields, letter_payload
from worker.events.model import Delivery, Event, dead_id
from worker.events.sender import Failure, WebhookSender
from worker.events.store import DeliveryStore

__all__ = ["BATCH", "WebhookDeliverer", "claim_timeout_for"]

log = structlog.get_logger("mailworker.webhook")

BATCH = 16  # entries claimed at a time


def claim_timeout_for(webhook: Webhook) -> float:
    """How long a delivery may be held before another process takes it over.

    A POST is bounded by ``timeout`` to connect and again to read, so three timeouts,
    and at least 30 s, is well beyond a live process's hold.
    """
    return max(30.0, 3 * webhook.timeout)


class WebhookDeliverer:
    """Delivers one webhook's events from this process, in a thread of its own.

    Every worker process runs one per enabled webhook. They share the webhook's
    consumer group, so each event goes to one of them. An event leaves the stream's
    pending list after its first attempt: delivered (any 2xx), not of the webhook's
    ``types`` (acknowledged unsent), scheduled for a retry with ``[retry]``'s backoff,
    or (after ``retry.max_attempts``) a dead letter with reason ``webhook``.

    Args:
        webhook: its settings.
        store: its deliveries in Redis.
        sender: its HTTP side.
        retry: the ``[retry]`` policy (``max_attempts``, ``backoff``).
        consumer: this deliverer's name in the group (default: host, pid, random).
        claim_timeout: seconds after which another deliverer takes over what this one
            holds (default: ``claim_timeout_for(webhook)``).
        poll: seconds between looks at due retries and stale claims; also the longest
            a read waits for a new event (and so how soon ``stop`` is seen).
    """

    def __init__(
        self,
        webhook: Webhook,
        *,
        store: DeliveryStore,
        sender: WebhookSender,
        retry: RetryPolicy,
        consumer: str | None = None,
        claim_timeout: float | None = None,
        poll: float = 1.0,
    ) -> None:
        self.name = webhook.name
        self.types = frozenset(webhook.types)
        self.store = store
        self.sender = sender
        self.retry = retry
        self.consumer = consumer or (
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.claim_timeout = claim_timeout or claim_timeout_for(webhook)
        # A POST takes at most a timeout to connect and another to read: one is begun
        # only while it can end before the claim on it runs out.
        self._budget = max(0.0, self.claim_timeout - 2 * webhook.timeout)
        self.batch = BATCH
        self.poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sweep_at = 0.0
        self._acks: list[str] = []  # delivered first attempts, acknowledged per batch

    def __repr__(self) -> str:
        return f"WebhookDeliverer({self.name!r}, consumer={self.consumer!r})"

    def start(self) -> None:
        """Deliver in a background thread until ``stop``."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"mailworker-webhook-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end after the POST in flight (no wait)."""
        self._stop.set()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the thread, then close the HTTP session."""
        if self._thread is not None:
            self._thread.join(timeout)
        self.sender.close()

    def run_once(self, *, block_ms: int | None = None) -> int:
        """One pass: due retries and stale claims (at most every ``poll``), then new events.

        Args:
            block_ms: how long to wait for a new event when there is none (None: not).

        Returns:
            How many deliveries this pass handled.
        """
        handled = 0
        now = time.monotonic()
        if now >= self._sweep_at:
            due = self.store.claim_due(lease=self.claim_timeout, count=self.batch)
            handled += self._work(due)
            stale, lost = self.store.claim_stale(
                self.consumer, idle_ms=int(self.claim_timeout * 1000), count=self.batch
            )
            if lost:  # trimmed off the stream (events.max_len) before anyone sent them
                log.warning("webhook_events_lost", webhook=self.name, count=len(lost))
            handled += self._work(_fresh(e) for e in stale)
            # A full batch: there may be more, so look again at once.
            full = len(due) == self.batch or len(stale) == self.batch
            self._sweep_at = now if full else now + self.poll
            block_ms = None if full else block_ms
        events = self.store.read_new(self.consumer, count=self.batch, block_ms=block_ms)
        return handled + self._work(_fresh(e) for e in events)

    def _run(self) -> None:
        ready = False
        while not self._stop.is_set():
            try:
                if not ready:
                    self.store.ensure_group()
                    self.store.prune()
                    ready = True
                self.run_once(block_ms=max(1, int(self.poll * 1000)))
            except redis.RedisError as exc:  # Redis away: again after a poll
                log.warning(
                    "webhook_loop_failed",
                    webhook=self.name,
                    error_type=type(exc).__name__,
                )
                ready = False  # the group again, in case the stream was deleted
                self._stop.wait(self.poll)
            except Exception:  # a bug: logged, and the thread lives on
                log.exception("webhook_loop_failed", webhook=self.name)
                self._stop.wait(self.poll)
        with contextlib.suppress(redis.RedisError):
            self.store.forget(self.consumer)

    def _work(self, deliveries: Iterable[Delivery]) -> int:
        """Attempt claimed deliveries in turn while their claim lasts.

        What is left when it runs out (or the worker stops) stays claimed, and is taken
        over once the claim timeout has passed.
        """
        started, done = time.monotonic(), 0
        try:
            for delivery in deliveries:
                late = done > 0 and time.monotonic() - started > self._budget
                if late or self._stop.is_set():
                    break
                self._attempt(delivery)
                done += 1
        finally:
            # One XACK for the batch: a process that dies before it only sends those
            # events again (at least once), and a round trip an event is saved.
            acks, self._acks = self._acks, []
            self.store.ack(acks)
        return done

    def _attempt(self, delivery: Delivery) -> None:
        event = delivery["event"]
        attempt = int(delivery.get("attempts", 0)) + 1
        scheduled = bool(delivery.get("scheduled"))
        if not scheduled and event["type"] not in self.types:
            self._acks.append(event["stream_id"])  # not of this webhook's types: unsent
            return
        failure = self.sender.post(event)
        if failure is None:
            self._finish(delivery, attempt)
            log.info("webhook_delivered", attempt=attempt, **_about(self.name, event))
        elif attempt >= self.retry.max_attempts:
            self._bury(delivery, attempt, failure)
        else:
            self._reschedule(delivery, attempt, failure)

    def _finish(self, delivery: Delivery, attempt: int) -> None:
        """A delivered event leaves the pending list, or the retry schedule."""
        if not delivery.get("scheduled"):
            self._acks.append(delivery["event"]["stream_id"])
            return
        fields = history = None
        if delivery.get("requeued"):  # its record, from the dead letter, says so
            at = iso_millis()
            fields = {"state": "sent", "attempts": attempt, "service": self.name}
            fields["updated_at"] = at
            fields |= {"error": "", "reason": "", "next_attempt_at": ""}
            history = [_entry(at, attempt, "delivered", self.name)]
        self.store.finish(delivery, fields, history)

    def _reschedule(self, delivery: Delivery, attempt: int, failure: Failure) -> None:
        wait = self.retry.backoff(attempt)
        due = time.time() + wait
        error = error_record(self.name, failure.code, failure.message)
        at = iso_millis()
        failed = _entry(at, attempt, "failed", self.name, error=error)
        kept = {**delivery, "attempts": attempt}
        fields = history = None
        if delivery.get("requeued"):  # its record shows it waits (others have none)
            next_at = datetime.fromtimestamp(due, UTC).isoformat(
                timespec="milliseconds"
            )
            fields = {"state": "retrying", "attempts": attempt, "error": error}
            fields |= {"next_attempt_at": next_at, "updated_at": at}
            history = [failed]
        else:
            kept["failures"] = [*delivery.get("failures", []), failed]
        if self.store.schedule(kept, due, fields=fields, history=history):
            log.warning(
                "webhook_retry_scheduled",
                attempt=attempt,
                retry_in_s=round(wait, 1),
                http_status=failure.code,
                error=failure.message,
                **_about(self.name, delivery["event"]),
            )

    def _bury(self, delivery: Delivery, attempt: int, failure: Failure) -> None:
        event = delivery["event"]
        error = error_record(self.name, failure.code, failure.message)
        at = iso_millis()
        history = [
            *delivery.get("failures", []),
            _entry(at, attempt, "failed", self.name, error=error),
            {"at": at, "event": "dead", "reason": "webhook", "error": error},
        ]
        buried = self.store.bury(
            delivery,
            dead_id=dead_id(self.name, event["id"]),
            payload=letter_payload(self.name, delivery),
            fields=letter_fields(self.name, delivery, attempt, error),
            history=history,
        )
        if buried:
            log.error(
                "webhook_dead_lettered",
                attempt=attempt,
                http_status=failure.code,
                error=failure.message,
                **_about(self.name, event),
            )


def _fresh(event: Event) -> Delivery:
    """A delivery not yet attempted, straight off the stream."""
    return {"event": event, "attempts": 0, "failures": []}


def _entry(
    at: str, attempt: int, outcome: str, webhook: str, **more: Any
) -> dict[str, Any]:
    return {"at": at, "attempt": attempt, "event": outcome, "service": webhook, **more}


def _about(webhook: str, event: Event) -> dict[str, Any]:
    return {
        "webhook": webhook,
        "event_id": event["id"],
        "event_type": event["type"],
        "job_id": event.get("job_id"),
    }
