"""The consumer: Dramatiq's Redis consumer, with quarantine, batched fetch and hand-backs.

It subclasses Dramatiq's private ``_RedisConsumer``, which is why the Dramatiq minor
version is pinned. ``tests/test_hostile_input.py`` and ``tests/test_dramatiq_layout.py``
fail if an upgrade breaks it.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import orjson
import redis
import structlog
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed, DecodeError
from dramatiq.message import Message

from worker.broker.attached import Attached, attached
from worker.broker.envelope import (
    MalformedMessageError,
    decode,
    jobs_of,
    message_id_of,
)
from worker.broker.keys import acks_key, delayed, queue_messages_key

if TYPE_CHECKING:
    from worker.broker.broker import MailBroker

__all__ = ["SafeConsumer"]

log = structlog.get_logger("mailworker.broker")


class SafeConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, made safe against bad messages and lost connections.

    A message that cannot be decoded, has a shape no actor can handle
    (``envelope_problem``) or names another queue than its own becomes a ``poison``
    dead letter. The messages fetched with it go on. Acks carry the job's status
    writes (``Attached``). Messages it cannot put back when it closes go to the
    queue's next consumer.
    """

    broker: MailBroker
    _event: threading.Event | None = None
    _wanting = False  # the consumer waits for room in its prefetch

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Dramatiq's, untyped
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # Bulk messages fetched and begun, kept back until a thread slot is free for
        # them (``BulkSlots``). Single jobs fetched after them go ahead. A consumer
        # restarted after a connection error starts with what its predecessor could
        # not put back.
        self._parked: list[MessageProxy] = self.broker.handed_over(self.queue_name)
        self.queued_message_ids.update(m.message_id for m in self._parked)
        # A delay queue hands its messages to no thread: they need no slot.
        self._is_delay_queue = delayed(self.queue_name)
        self._slots = None if self._is_delay_queue else self.broker.bulk_slots
        if self._slots is not None:
            self._slots.on_free(self._wake)
        # What a delayed-queue consumer handed to its thread's in-memory delay queue and
        # nobody acknowledged or put back yet, by redis message id. Dramatiq drops that
        # queue on a connection error while the messages stay in this live process' ack
        # set, where neither its maintenance nor our reaper looks: ``close`` hands them
        # back.
        self._delayed: dict[str, MessageProxy] | None = (
            {} if self._is_delay_queue else None
        )
        # What this process fetched from the queue and still holds, shared with the
        # consumers before and after this one: after a fetch whose reply was lost,
        # whatever else is in the ack set was moved there unseen (``_reclaim``).
        self._held: set[str] = self.broker.held.setdefault(self.queue_name, set())

    def ack(self, message: MessageProxy) -> None:
        """Apply the status writes the job left and acknowledge, in one round trip.

        When a retry or enqueues are pending: write, enqueue, then acknowledge. A retry
        that waits long goes into the scheduled set in the same script as the ack.

        A connection error in any step is raised as Dramatiq's ``ConnectionClosed``, so
        Dramatiq tries the whole ack again every few seconds until Redis is back: the
        message is never acknowledged without its records and its retry.
        """
        work = attached(message)
        try:
            if work.retry is None and not work.enqueues and work.writes:
                redis_id = message.options["redis_message_id"]
                try:
                    ack = (self.queue_name, self.broker.broker_id, redis_id)
                    self.broker.status.write_many(work.writes, ack=ack)
                finally:
                    self.queued_message_ids.discard(message.message_id)
                work.writes.clear()
                self._release(message)
                self._done()
                return
            self._apply(work)
            if work.retry is not None:
                copy, delay = work.retry
                if self.broker.schedule.takes(delay):
                    self._schedule_with_ack(message, copy, delay)
                    work.retry = None
                    return
                self.broker.enqueue(copy, delay=delay)
                work.retry = None
        except redis.RedisError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        # Dramatiq's, untyped
        super().ack(message)  # type: ignore[no-untyped-call]
        self._release(message)
        self._done()

    def _schedule_with_ack(
        self, message: MessageProxy, copy: Message[Any], delay: int
    ) -> None:
        """Put a long retry in the scheduled set and acknowledge, in one script."""
        schedule = self.broker.schedule
        entry = schedule.entry(copy, int(time.time() * 1000) + delay)
        redis_id = message.options["redis_message_id"]
        try:
            ack = (self.queue_name, self.broker.broker_id, redis_id)
            schedule.add([entry], ack=ack)
        finally:
            self.queued_message_ids.discard(message.message_id)
        self._release(message)
        self._done()

    def nack(self, message: MessageProxy) -> None:
        """Apply the status writes the message left, then let Dramatiq dead-letter it.

        The writes are those of a bulk message's jobs that were sent before it failed,
        and its own dead letter from ``DeadLetterCapture``.
        """
        try:
            self._apply(attached(message))
        except redis.RedisError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        # Dramatiq's, untyped
        super().nack(message)  # type: ignore[no-untyped-call]
        self._release(message)
        self._done()

    def _apply(self, work: Attached) -> None:
        """The status writes, then the enqueues, a message left.

        Each is dropped once made, so that a retried ack makes none twice.
        """
        if work.writes:
            self.broker.status.write_many(work.writes)
            work.writes.clear()
        while work.enqueues:
            later, delay = work.enqueues[0]
            self.broker.enqueue(later, delay=delay)
            work.enqueues.pop(0)

    def _release(self, message: MessageProxy, *, held: bool = False) -> None:
        """The message is off this consumer's hands (acknowledged or put back).

        ``held``: it stays in this process' ack set all the same (handed over).
        """
        redis_id = message.options.get("redis_message_id", "")
        if self._delayed is not None:
            self._delayed.pop(redis_id, None)
        if not held:
            self._held.discard(redis_id)

    def __next__(self) -> MessageProxy | None:
        message = self._next()
        if message is not None and self._delayed is not None:
            self._delayed[message.options["redis_message_id"]] = message
        return message

    def _next(self) -> MessageProxy | None:
        slots = self._slots
        while True:
            if (
                self._parked
                and not self.broker.stopping.is_set()
                and (slots is None or slots.take(self._parked[0]))
            ):
                return self._parked.pop(0)
            try:
                message = self._take()
            except DecodeError as exc:
                error = (
                    str(exc.error)
                    if isinstance(exc, MalformedMessageError)
                    else f"cannot decode the message: {exc.error}"
                )
                self._quarantine(exc.data, error, None)
                continue
            if message is None:
                return None
            problem = self._problem(message)
            if problem is None:
                self._prefetch(message)
                if slots is None or slots.take(message):
                    return message
                self._parked.append(message)
                continue
            self.queued_message_ids.discard(message.message_id)
            self._quarantine(
                message.encode(),
                problem,
                message.options.get("redis_message_id"),
                message_id=message.message_id,
            )

    def requeue(self, messages: Any) -> None:
        """Put unstarted messages back, and their jobs back to `queued`.

        This happens at a graceful shutdown, and for the delay queue of a consumer
        thread that restarts. When Redis cannot take them, they are handed to the
        queue's next consumer in this process (or, when the worker stops, left in its
        ack set for the reaper once it has exited). The error is not raised: Dramatiq's
        callers would leave the consumer unclosed, or its thread dead.
        """
        messages = list(messages)
        try:
            # Dramatiq's, untyped
            super().requeue(messages)  # type: ignore[no-untyped-call]
        except redis.RedisError:
            self._keep(messages)
            for message in messages:
                self._release(message, held=True)
            return
        for message in messages:
            self._release(message)
        try:
            self._unbegin(messages)
        except redis.RedisError:
            log.warning("unbegin_on_close_failed", queue=self.queue_name)

    def _keep(self, messages: list[MessageProxy]) -> None:
        """Messages Redis could not take back: the queue's next consumer takes them.

        They stay this process' own in Redis: nobody else would take them.
        """
        log.warning("requeue_on_close_failed", queue=self.queue_name)
        if not self.broker.stopping.is_set():
            self.broker.hand_over(self.queue_name, messages)

    def _unbegin(self, messages: list[MessageProxy]) -> None:
        if self._delayed is not None:
            return  # delayed messages are begun when they come back on their queue
        jobs = [job for m in messages for job in jobs_of(m.asdict())]
        if jobs:
            self.broker.status.unbegin(jobs)

    def close(self) -> None:
        """Put back at once what was fetched and not yet handed to the worker.

        Dramatiq would leave such messages to be recovered after its heartbeat timeout.
        Their jobs go back to ``queued``. When Redis cannot take them back and the
        worker is not stopping (Dramatiq restarts a consumer after a connection error),
        the queue's next consumer takes them instead.
        """
        if self._slots is not None:
            self._slots.off_free(self._wake)
        leftovers, self.message_cache = [d for d in self.message_cache if d], []
        messages, self._parked = self._parked, []
        if self._delayed:
            messages += self._delayed.values()
        for data in leftovers:
            try:
                messages.append(MessageProxy(decode(data)))
            except DecodeError:
                continue  # stays unacknowledged: recovered and quarantined later
            self._held.add(messages[-1].options.get("redis_message_id", ""))
        if messages:
            self.requeue(messages)
        super().close()

    def _take(self) -> MessageProxy | None:
        """Dramatiq's ``_RedisConsumer.__next__``, with two changes.

        - An empty queue is waited for on the queue's event (``Waker``) rather
          than slept on: a job enqueued while the consumer idles is fetched at once.
        - Messages are fetched in batches: once ``prefetch`` are outstanding, the next
          fetch waits until half of them are done (an ack sets the event), instead of
          fetching one message per ack. Each fetch is a round trip, and so is the
          status prefetch of what it brought.
        """
        event = self._event
        if event is None:
            waker = self.broker.waker
            event = self._event = (
                waker.event(self.queue_name)
                if waker is not None and not self._is_delay_queue
                else threading.Event()
            )
        is_delay_queue = self._is_delay_queue
        try:
            while True:
                if self.message_cache:
                    data = self.message_cache.pop(0)
                    if data is None:
                        continue
                    self.misses = 0
                    message = decode(data)
                    self.queued_message_ids.add(message.message_id)
                    self._held.add(message.options.get("redis_message_id", ""))
                    return MessageProxy(message)
                event.clear()  # a wake-up or an ack from now on ends the wait below
                if self.broker.stopping.is_set():
                    event.wait(self.timeout / 1000)  # what is fetched now is put back
                    return None
                slots = self._slots
                if self._parked and slots is not None and slots.room():
                    return None  # a slot freed before the clear: hand a parked one over
                # Set before counting: an ack that frees room after the count wakes us.
                self._wanting = True
                outstanding = self.outstanding_message_count
                room = self.prefetch - 1 if is_delay_queue else self.prefetch // 2
                if outstanding > room:
                    event.wait(self.timeout / 1000)
                    return None
                self._wanting = False
                self.message_cache = self._fetch(self.prefetch - outstanding)
                if self.message_cache:
                    continue
                self.misses, backoff_ms = compute_backoff(
                    self.misses, max_backoff=self.timeout
                )
                if is_delay_queue:
                    time.sleep(backoff_ms / 1000)
                elif event.wait(backoff_ms / 1000):
                    self.misses = 0
                return None
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def _fetch(self, count: int) -> list[bytes]:
        """Dramatiq's fetch; one whose reply was lost is sorted out before the next."""
        if self.queue_name in self.broker.fetch_lost:
            self._reclaim()
        try:
            return list(self.broker.do_fetch(self.queue_name, count) or [])
        except redis.ConnectionError:
            self.broker.fetch_lost.add(self.queue_name)
            raise

    def _reclaim(self) -> None:
        """Put back what a fetch whose reply was lost moved into this process' ack set.

        Such messages are no consumer's, and no reaper's either (this process still
        beats): they would wait there until it exits. Whatever is in the ack set that
        this process does not hold goes back on the queue (Dramatiq's ``requeue``,
        which takes only what is still in the ack set).
        """
        acks = acks_key(self.broker.namespace, self.broker.broker_id, self.queue_name)
        members = {
            m.decode() if isinstance(m, bytes) else str(m)
            for m in self.broker.client.smembers(acks)
        }
        stray = sorted(members - self._held)
        if stray:
            self.broker.do_requeue(self.queue_name, *stray)
            log.warning(
                "lost_fetch_requeued", queue=self.queue_name, messages=len(stray)
            )
        self.broker.fetch_lost.discard(self.queue_name)

    def _wake(self) -> None:
        """A thread slot for bulk messages freed: stop waiting, hand a parked one over."""
        if self._parked and self._event is not None:
            self._event.set()

    def _done(self) -> None:
        """A message was acknowledged, so let a waiting consumer fetch when it may.

        It may when it waits for room and half of its prefetch is free.
        """
        if self._wanting and self.outstanding_message_count <= self.prefetch // 2:
            self._wanting = False
            if self._event is not None:
                self._event.set()

    def _prefetch(self, message: MessageProxy) -> None:
        """Begin every job of a fetched batch in one round trip, with its first message.

        Beginning sets status ``sending`` and reads the delivery marker and earlier
        outcomes. So no job pays a round trip of its own before it is sent.
        """
        if self._is_delay_queue:
            return  # delayed messages are begun when they come back on their queue
        status = self.broker.status
        first = jobs_of(message.asdict())
        if not first or status.prefetched(first[0]):
            return
        jobs = list(first)
        for raw in self.message_cache:
            try:
                jobs += jobs_of(orjson.loads(raw)) if raw else []
            except orjson.JSONDecodeError:
                continue  # the consumer quarantines it when its turn comes
        try:
            status.prefetch(jobs)
        except redis.RedisError:
            # Each job's begin() will do it.
            log.warning("status_prefetch_failed", queue=self.queue_name)

    def _problem(self, message: MessageProxy) -> str | None:
        if message.queue_name != self.queue_name:
            return (
                f"queue_name {message.queue_name!r} does not match the queue "
                f"{self.queue_name!r} it was pushed to"
            )
        return None

    def _quarantine(
        self,
        raw: bytes,
        error: str,
        redis_id: str | None,
        *,
        message_id: str | None = None,
    ) -> None:
        if redis_id is None:
            found = self._find(raw, message_id)
            redis_id, raw = found if found else (None, raw)
        if redis_id is None:
            log.error("poison_message_not_found", queue=self.queue_name, error=error)
            return
        self.broker.dead_letters.add_poison(redis_id, raw, error, self.queue_name)
        self.broker.do_ack(self.queue_name, redis_id)
        self._held.discard(redis_id)
        log.error("job_dead_lettered", reason="poison", job_id=redis_id, error=error)

    def _find(self, raw: bytes, message_id: str | None) -> tuple[str, bytes] | None:
        """Redis id and stored bytes of a message we cannot acknowledge the usual way.

        Our own ack set is searched for the payload (or for its message id).
        """
        client = self.broker.client
        ns = self.broker.namespace
        acks = acks_key(ns, self.broker.broker_id, self.queue_name)
        ids = list(client.smembers(acks))
        if not ids:
            return None
        payloads = client.hmget(queue_messages_key(ns, self.queue_name), ids)
        for redis_id, payload in zip(ids, payloads, strict=True):
            if payload == raw or (
                payload is not None
                and message_id
                and message_id_of(payload) == message_id
            ):
                return str(redis_id.decode()), bytes(payload)
        return None
