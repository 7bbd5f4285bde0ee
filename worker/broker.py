"""Our Redis broker: Dramatiq's, with a consumer that never lets one bad message stop the
others, and every message Dramatiq itself gives up on kept as one of our dead letters.

These subclasses use Dramatiq internals (``_RedisConsumer``), which is why the Dramatiq
minor version is pinned; ``tests/test_hostile_input.py`` fails if an upgrade breaks them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from typing import Any, cast

import orjson
import redis
import structlog
from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ActorNotFound, ConnectionClosed, DecodeError
from dramatiq.message import Message
from dramatiq.middleware import MiddlewareError

from common.keys import ACTOR_NAME, BATCH_ACTOR_NAME
from worker.clock import iso_millis
from worker.deadletter import DeadLetters
from worker.direct import DirectScript
from worker.express import BulkSlots
from worker.jobs import JOB_ID_RULE, is_job_id, single_message
from worker.reliability import (
    attach_write,
    attached_enqueues,
    attached_writes,
    clear_writes,
    pending_retry,
    set_pending_retry,
)
from worker.status import message_id_of
from worker.wake import Waker

__all__ = ["DeadLetterCapture", "MailBroker"]

log = structlog.get_logger("mailworker.broker")

# A message's attribute: the (reason, error) of the dead letter DeadLetterCapture packed.
_DEAD_PACKED = "_mailworker_dead"


# The options Dramatiq and our middleware compute with (a count, times in milliseconds).
_NUMBER_OPTIONS = ("retries", "eta", "time_limit")
# orjson writes at most 254 levels of nesting (it reads 1024): a message nested deeper
# could not be written again as a dead letter or a retry, so it is refused at once.
_MAX_DEPTH = 254


def _envelope_problem(fields: Any) -> str | None:
    """What makes a decoded message one no actor can run and Dramatiq cannot acknowledge
    or keep track of, or None. The field is named: a producer's bug is found at once."""
    if not isinstance(fields, dict):
        return "the message is not an object"
    options = fields.get("options")
    if not isinstance(options, dict):
        return "options is not an object"
    if not isinstance(options.get("redis_message_id"), str):
        return "options.redis_message_id is missing"
    for name in _NUMBER_OPTIONS:
        value = options.get(name)
        if value is not None and not _is_number(value):
            return f"options.{name} is not a number"
    if not is_job_id(fields.get("message_id")):
        return f"message_id is not {JOB_ID_RULE}"
    for name in ("queue_name", "actor_name"):
        if not isinstance(fields.get(name), str):
            return f"{name} is not a string"
    if not isinstance(fields.get("args"), list | tuple):
        return "args is not a list"
    if not isinstance(fields.get("kwargs"), dict):
        return "kwargs is not an object"
    stamp = fields.get("message_timestamp")
    if not isinstance(stamp, int) or isinstance(stamp, bool):
        return "message_timestamp is not a whole number of milliseconds"
    return None


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


class _MalformedError(DecodeError):
    """A message that decodes but is not one Dramatiq and our actors can handle."""


def _decode(data: bytes) -> Message[Any]:
    """``Message.decode`` with orjson, which also wrote the message (producers): about a
    third of the stdlib's time (76 against 27 µs for a 20-job bulk message). What orjson
    refuses and ``json`` would take (NaN, lone surrogates, integers past 64 bits) no
    producer of ours writes; such a message is quarantined like any undecodable one, and
    so is one of the wrong shape (``_envelope_problem``)."""
    try:
        fields = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("Failed to decode message.", data, exc) from exc  # type: ignore[no-untyped-call]
    problem = _envelope_problem(fields)
    if problem is None and data.count(b"{") + data.count(b"[") > _MAX_DEPTH:
        try:  # only where so many brackets make the depth possible
            orjson.dumps(fields)
        except orjson.JSONEncodeError:
            problem = f"the message nests deeper than {_MAX_DEPTH} levels"
    if problem is not None:
        raise _MalformedError(problem, data, ValueError(problem))  # type: ignore[no-untyped-call]
    try:
        fields["args"] = tuple(fields["args"])
        return Message(**fields)
    except Exception as exc:  # as Dramatiq's Message.decode
        raise DecodeError("Failed to decode message.", data, exc) from exc  # type: ignore[no-untyped-call]


class SafeConsumer(_RedisConsumer):
    """Takes out of the stream, as `poison` dead letters, messages that cannot be decoded,
    that are of a shape Dramatiq and the actors cannot handle (``_envelope_problem``: no
    redis message id, so Dramatiq could never acknowledge them; a message id that cannot
    be a job id; kwargs no object; ...), or that name another queue than the one they were
    pushed to; the messages fetched with them go on."""

    broker: MailBroker
    _event: threading.Event | None = None
    _wanting = False  # the consumer waits for room in its prefetch

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # Dramatiq's
        # Bulk messages fetched and begun, kept back until a thread slot is free for
        # them (``worker.express.BulkSlots``); single jobs fetched after them go ahead.
        # A consumer restarted after a connection error starts with what its
        # predecessor could not put back.
        self._parked: list[MessageProxy] = self.broker.carried(self.queue_name)
        self.queued_message_ids.update(m.message_id for m in self._parked)
        delayed = self.queue_name.endswith(".DQ")  # handed to no thread: no slot
        self._slots = None if delayed else self.broker.bulk_slots
        if self._slots is not None:
            self._slots.on_free(self._wake)
        # What a delayed-queue consumer handed to its thread's in-memory delay queue and
        # nobody acknowledged or put back yet, by redis message id. Dramatiq drops that
        # queue on a connection error while the messages stay in this live process' ack
        # set, where neither its maintenance nor our reaper looks: ``close`` hands them
        # back.
        self._delayed: dict[str, MessageProxy] | None = {} if delayed else None

    def ack(self, message: MessageProxy) -> None:
        """Apply the status writes the job left (see ``attach_write``) and acknowledge the
        message in one round trip; or, when a retry is pending, write, enqueue the retry,
        then acknowledge.

        A connection error in any step is raised as Dramatiq's ``ConnectionClosed``, so
        Dramatiq tries the whole ack again every few seconds until Redis is back: the
        message is never acknowledged without its records and its retry.
        """
        writes = attached_writes(message)
        pending = pending_retry(message)
        enqueues = attached_enqueues(message)
        status = self.broker.dead_letters.status
        try:
            if pending is None and not enqueues and writes:
                redis_id = message.options["redis_message_id"]
                try:
                    ack = (self.queue_name, self.broker.broker_id, redis_id)
                    status.write_many(writes, ack=ack)
                finally:
                    self.queued_message_ids.discard(message.message_id)
                clear_writes(message)
                self._release(message)
                self._done()
                return
            self._apply(message)
            if pending is not None:
                copy, delay = pending
                self.broker.enqueue(copy, delay=delay)
                set_pending_retry(message, None)
        except redis.RedisError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        super().ack(message)  # type: ignore[no-untyped-call]  # Dramatiq's, untyped
        self._release(message)
        self._done()

    def nack(self, message: MessageProxy) -> None:
        """Apply the status writes the message left (jobs of a bulk message that were
        sent before it failed, and its own dead letter from ``DeadLetterCapture``), then
        let Dramatiq dead-letter it."""
        try:
            self._apply(message)
        except redis.RedisError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        super().nack(message)  # type: ignore[no-untyped-call]  # Dramatiq's, untyped
        self._release(message)
        self._done()

    def _apply(self, message: MessageProxy) -> None:
        """The status writes, then the enqueues, the message left; each dropped once
        made, so that a retried ack makes none twice."""
        writes = attached_writes(message)
        if writes:
            self.broker.dead_letters.status.write_many(writes)
            clear_writes(message)
        enqueues = attached_enqueues(message)
        while enqueues:
            later, delay = enqueues[0]
            self.broker.enqueue(later, delay=delay)
            enqueues.pop(0)

    def _release(self, message: MessageProxy) -> None:
        """The message is off this consumer's hands (acknowledged or put back)."""
        if self._delayed is not None:
            self._delayed.pop(message.options.get("redis_message_id", ""), None)

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
                self._quarantine(
                    exc.data,
                    str(exc.error)
                    if isinstance(exc, _MalformedError)
                    else f"cannot decode the message: {exc.error}",
                    None,
                )
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
        """Put unstarted messages back (graceful shutdown, or the delay queue of a
        consumer thread that restarts) and their jobs back to `queued`.

        When Redis cannot take them, they are handed to the queue's next consumer in
        this process (or, when the worker stops, left in its ack set for the reaper once
        it has exited); the error is not raised: Dramatiq's callers would leave the
        consumer unclosed, or its thread dead."""
        messages = list(messages)
        try:
            super().requeue(messages)  # type: ignore[no-untyped-call]  # Dramatiq's
        except redis.RedisError:
            self._keep(messages)
            return
        finally:
            for message in messages:
                self._release(message)
        try:
            self._unbegin(messages)
        except redis.RedisError:
            log.warning("unbegin_on_close_failed", queue=self.queue_name)

    def _keep(self, messages: list[MessageProxy]) -> None:
        """Messages Redis could not take back: the queue's next consumer hands them over
        (they stay this process' own in Redis: nobody else would take them)."""
        log.warning("requeue_on_close_failed", queue=self.queue_name)
        if not self.broker.stopping.is_set():
            self.broker.carry_over(self.queue_name, messages)

    def _unbegin(self, messages: list[MessageProxy]) -> None:
        if self._delayed is not None:
            return  # delayed messages are begun when they come back on their queue
        jobs = [job for m in messages for job in _jobs_of(m.asdict())]
        if jobs:
            self.broker.dead_letters.status.unbegin(jobs)

    def close(self) -> None:
        """The consumer stops: messages fetched but not yet handed to the worker go back
        on the queue now (Dramatiq would leave them to be recovered after its heartbeat
        timeout), and their jobs back to ``queued``. When Redis cannot take them back
        and the worker is not stopping (Dramatiq restarts a consumer after a connection
        error), the next consumer of the queue hands them over instead."""
        if self._slots is not None:
            self._slots.off_free(self._wake)
        leftovers, self.message_cache = [d for d in self.message_cache if d], []
        messages, self._parked = self._parked, []
        if self._delayed:
            messages += self._delayed.values()
        for data in leftovers:
            try:
                messages.append(MessageProxy(_decode(data)))
            except DecodeError:
                continue  # stays unacknowledged: recovered and quarantined later
        if messages:
            self.requeue(messages)
        super().close()

    def _take(self) -> MessageProxy | None:
        """Dramatiq's ``_RedisConsumer.__next__``, with two changes.

        - An empty queue is waited for on the queue's event (``worker.wake``) rather
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
                if waker is not None and not self.queue_name.endswith(".DQ")
                else threading.Event()
            )
        delayed = self.queue_name.endswith(".DQ")
        try:
            while True:
                if self.message_cache:
                    data = self.message_cache.pop(0)
                    if data is None:
                        continue
                    self.misses = 0
                    message = _decode(data)
                    self.queued_message_ids.add(message.message_id)
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
                if outstanding > (self.prefetch - 1 if delayed else self.prefetch // 2):
                    event.wait(self.timeout / 1000)
                    return None
                self._wanting = False
                self.message_cache = self.broker.do_fetch(
                    self.queue_name, self.prefetch - outstanding
                )
                if self.message_cache:
                    continue
                self.misses, backoff_ms = compute_backoff(
                    self.misses, max_backoff=self.timeout
                )
                if delayed:
                    time.sleep(backoff_ms / 1000)
                elif event.wait(backoff_ms / 1000):
                    self.misses = 0
                return None
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def _wake(self) -> None:
        """A thread slot for bulk messages freed: stop waiting, hand a parked one over."""
        if self._parked and self._event is not None:
            self._event.set()

    def _done(self) -> None:
        """A message was acknowledged: if the consumer waits for room, and half of its
        prefetch is free, let it fetch."""
        if self._wanting and self.outstanding_message_count <= self.prefetch // 2:
            self._wanting = False
            if self._event is not None:
                self._event.set()

    def _prefetch(self, message: MessageProxy) -> None:
        """With the first message of a fetched batch, begin every job of the batch in one
        round trip (status ``sending``, delivery marker, earlier outcomes), so that no
        job pays a round trip of its own before it is sent."""
        if self.queue_name.endswith(".DQ"):
            return  # delayed messages are begun when they come back on their queue
        status = self.broker.dead_letters.status
        first = _jobs_of(message.asdict())
        if not first or status.prefetched(first[0][0], first[0][3]):
            return
        jobs = list(first)
        for raw in self.message_cache:
            try:
                jobs += _jobs_of(orjson.loads(raw)) if raw else []
            except orjson.JSONDecodeError:
                continue  # the consumer quarantines it when its turn comes
        try:
            status.prefetch(jobs)
        except redis.RedisError:
            log.warning(
                "status_prefetch_failed", queue=self.queue_name
            )  # begin() will do

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
        log.error("job_dead_lettered", reason="poison", job_id=redis_id, error=error)

    def _find(self, raw: bytes, message_id: str | None) -> tuple[str, bytes] | None:
        """Redis id and stored bytes of a message we cannot acknowledge the usual way:
        search our own ack set for the payload (or for its message id)."""
        client = self.broker.client
        ns = self.broker.namespace
        acks = f"{ns}:__acks__.{self.broker.broker_id}.{self.queue_name}"
        ids = list(client.smembers(acks))
        if not ids:
            return None
        payloads = client.hmget(f"{ns}:{self.queue_name}.msgs", ids)
        for redis_id, payload in zip(ids, payloads, strict=True):
            if payload == raw or (
                payload is not None
                and message_id
                and message_id_of(payload) == message_id
            ):
                return str(redis_id.decode()), bytes(payload)
        return None


def _jobs_of(message: Any) -> list[tuple[str, int, str, str]]:
    """(job id, attempt, queue, redis message id) of each job a broker message carries."""
    if _envelope_problem(message) is not None:
        return []  # the consumer quarantines it when its turn comes
    options = message["options"]
    redis_id = options["redis_message_id"]
    attempt = int(options.get("retries") or 0) + 1
    queue = message["queue_name"].removesuffix(".DQ")
    if message["actor_name"] == BATCH_ACTOR_NAME:
        jobs = message["kwargs"].get("jobs")
        if not isinstance(jobs, list):
            return []
        ids = {
            job["id"]: None
            for job in jobs
            if isinstance(job, dict) and is_job_id(job.get("id"))
        }  # each once, in order (``JobHandler.batch`` sends a repeated id once)
        return [(job_id, attempt, queue, redis_id) for job_id in ids]
    if message["actor_name"] == ACTOR_NAME:
        return [(message["message_id"], attempt, queue, redis_id)]
    return []


class _Dispatch:
    """A ``DirectScript`` called as Dramatiq calls its scripts: ``(args=..., keys=...)``.

    A timeout is raised as ``redis.ConnectionError``, the error Dramatiq's consumer, ack
    and requeue recover from (reconnecting, trying again)."""

    def __init__(self, script: DirectScript) -> None:
        self._script = script

    def __call__(self, args: list[Any], keys: list[Any]) -> Any:
        try:
            return self._script.run(keys, args)
        except redis.TimeoutError as exc:
            raise redis.ConnectionError(str(exc)) from exc


class MailBroker(RedisBroker):
    """``RedisBroker`` with the safe consumer and a handle on our dead letters."""

    def __init__(
        self,
        *,
        dead_letters: DeadLetters,
        waker: Waker | None = None,
        stopping: threading.Event | None = None,
        bulk_slots: BulkSlots | None = None,
        **kwargs: Any,
    ) -> None:
        self._hooks: dict[
            str, list[Any]
        ] = {}  # add_middleware (from __init__) resets it
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]  # Dramatiq's, untyped
        # Fetches (idle queues are polled too), enqueues and acks run Dramatiq's dispatch
        # script: over each thread's own connection, as our status writes do. Fetches and
        # enqueues are not idempotent: a lost reply is raised, never retried.
        source = self.scripts["dispatch"].script
        assert isinstance(source, str | bytes)
        self.scripts["dispatch"] = _Dispatch(
            DirectScript(self.client, source, idempotent=False)
        )
        self.dead_letters = dead_letters
        self.waker = waker  # also in the middleware list: it runs the listener thread
        self.stopping = stopping or threading.Event()  # set: consumers fetch no more
        self.bulk_slots = bulk_slots  # also in the middleware list: it counts the slots
        self._carried: dict[str, list[MessageProxy]] = {}
        self._carried_lock = threading.Lock()

    @property
    def consumer_class(self) -> type[SafeConsumer]:
        return SafeConsumer

    def carry_over(self, queue: str, messages: list[MessageProxy]) -> None:
        """Keep messages a closing consumer could not put back for the queue's next one
        (they stay this process' own in Redis: nobody else would take them)."""
        with self._carried_lock:
            self._carried.setdefault(queue, []).extend(messages)

    def carried(self, queue: str) -> list[MessageProxy]:
        """Take what ``carry_over`` kept for ``queue``."""
        with self._carried_lock:
            return self._carried.pop(queue, [])

    def add_middleware(self, middleware: Middleware, **kwargs: Any) -> None:
        super().add_middleware(middleware, **kwargs)
        self._hooks = {}

    def _hooks_for(self, name: str) -> list[Any]:
        """The middleware methods that implement hook ``name``, in middleware order.

        Dramatiq calls every middleware's method for every signal, the base class's
        no-ops included (about ten per message per signal here); this skips those.
        """
        hooks = self._hooks.get(name)
        if hooks is None:
            base = getattr(Middleware, name, None)
            hooks = [
                getattr(m, name)
                for m in self.middleware
                if getattr(type(m), name, None) is not base
            ]
            self._hooks[name] = hooks
        return hooks

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        name = "before_" + signal
        self._emit(name, self._hooks_for(name), args, kwargs, reraise=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        name = "after_" + signal
        self._emit(name, reversed(self._hooks_for(name)), args, kwargs, reraise=False)

    def _emit(
        self,
        name: str,
        hooks: Iterable[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        reraise: bool,
    ) -> None:
        """Dramatiq's semantics: a failing hook is logged and the others still run; only
        a ``MiddlewareError`` from a ``before_`` hook stops the signal."""
        for hook in hooks:
            try:
                hook(self, *args, **kwargs)
            except MiddlewareError:
                if reraise:
                    raise
                self._hook_failed(name, hook)
            except Exception:
                self._hook_failed(name, hook)

    def _hook_failed(self, name: str, hook: Any) -> None:
        self.logger.critical(
            "Unexpected failure in %s of %r.", name, hook.__self__, exc_info=True
        )


def _dead_jobs(message: MessageProxy, queue: str) -> list[tuple[str, bytes]]:
    """(job id, dead-letter payload) for each job a message Dramatiq gives up on
    carries: a bulk message's jobs each get their own, as the single job it would have
    been (requeueable on its own; one already sent stays sent), any other message one
    under its message id."""
    data = message.asdict()
    if data["actor_name"] == BATCH_ACTOR_NAME and isinstance(
        data["kwargs"].get("jobs"), list
    ):
        items = {
            item["id"]: item.get("job")
            for item in data["kwargs"]["jobs"]
            if isinstance(item, dict) and is_job_id(item.get("id"))
        }
        if items:
            stamp = data["message_timestamp"]
            return [
                (job_id, orjson.dumps(single_message(job_id, queue, job, stamp)))
                for job_id, job in items.items()
            ]
    data["options"] = {k: v for k, v in data["options"].items() if k != "traceback"}
    return [(message.message_id, orjson.dumps(data))]


class DeadLetterCapture(Middleware):
    """Keeps every message Dramatiq itself dead-letters (an unknown actor, an unexpected
    exception after every retry) as our dead letters, with status records: one for
    each job of a bulk message (a job already sent stays sent), else one.

    The record is written before Dramatiq's nack takes the message off its queue
    (``SafeConsumer.nack`` applies it with the message's other writes), so a worker that
    dies between the two leaves the message to be redelivered, never a job whose record
    still says it waits."""

    def before_nack(self, broker: Broker, message: MessageProxy) -> None:
        if vars(message).get(_DEAD_PACKED):
            return  # Dramatiq retries a nack that met a connection error
        mail = cast(MailBroker, broker)
        exc = getattr(message, "_exception", None)
        reason = "unknown_actor" if isinstance(exc, ActorNotFound) else "unhandled"
        error = {
            "type": reason,
            "code": None,
            "service": None,
            "message": f"{type(exc).__name__}: {exc}"
            if exc
            else "dead-lettered by Dramatiq",
        }
        status = mail.dead_letters.status
        queue = message.queue_name.removesuffix(".DQ")
        attempts = int(message.options.get("retries") or 0)
        for job_id, payload in _dead_jobs(message, queue):
            fields: dict[str, Any] = {
                "id": job_id,
                "state": "dead",
                "reason": reason,
                "error": error,
                "queue": queue,
                "attempts": attempts,
                "dead_at": iso_millis(),
            }
            event = {"attempt": attempts, "event": "dead", "reason": reason}
            attach_write(
                message,
                status.pack(
                    job_id,
                    fields,
                    event={**event, "error": error},
                    dead_payload=payload,
                ),
            )
        vars(message)[_DEAD_PACKED] = (reason, error["message"])

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        reason, error = vars(message).get(_DEAD_PACKED) or ("unhandled", None)
        log.error(
            "job_dead_lettered", reason=reason, job_id=message.message_id, error=error
        )
