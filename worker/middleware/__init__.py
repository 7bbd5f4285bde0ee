"""Our Dramatiq middleware, one hook class a module.

- ``log_context``: ``LogContext`` binds each job's id, actor and attempt to log lines.
- ``retries``: ``ReliableRetries`` enqueues a retry with the acknowledgement.
- ``dead_letters``: ``DeadLetterCapture`` keeps what Dramatiq gives up on.
- ``heartbeat``: ``Heartbeat`` marks the process alive and reaps dead ones.
- ``draining``: ``Draining`` tells a bulk message that the worker stops.
- ``tuning``: ``WorkerTuning``: idle poll, delayed prefetch, malloc.
- ``bulk_slots``: ``BulkSlots`` keeps a thread free for single jobs.
- ``wake``: ``Waker`` wakes idle consumers when a producer enqueues.
- ``release``: ``Releaser`` moves due scheduled jobs onto their queues.
"""

__all__: list[str] = []
