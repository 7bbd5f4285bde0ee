"""Everything that knows Dramatiq's internals or its Redis key layout.

- ``broker``: ``MailBroker``, Dramatiq's ``RedisBroker`` with our consumer.
- ``consumer``: ``SafeConsumer``: quarantine, batched fetch, acks that carry records.
- ``envelope``: broker messages as they arrive: shape checks, decoding, their jobs.
- ``attached``: what a job leaves on its message for the ack (writes, enqueues, retry).
- ``keys``: Dramatiq's key names, for Python and as a Lua prelude.
- ``scripts``: Lua scripts over each thread's own Redis connection.
- ``heartbeats``: heartbeats, host records and the reaper of dead workers' messages.
- ``schedule``: ``Schedule``: the scheduled set; long delays wait there, due ones go out.

The Dramatiq minor version is pinned. ``tests/test_dramatiq_layout.py`` fails when an
upgrade changes what is mirrored here.
"""

__all__: list[str] = []
