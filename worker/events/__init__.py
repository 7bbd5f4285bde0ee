"""The events stream's webhooks: each event POSTed, signed, to every enabled ``[[webhook]]``.

- ``model``: names and shapes: the event as POSTed, dead-letter ids, Redis keys.
- ``signing``: Standard Webhooks signatures and the key a secret stands for.
- ``scripts``: the Lua that moves a delivery (stream, retry schedule, dead letter).
- ``store``: ``DeliveryStore``, a webhook's consumer group and retry schedule in Redis.
- ``sender``: ``WebhookSender``, one POST and what its answer means.
- ``deliverer``: ``WebhookDeliverer``, one webhook's loop in one worker process.
- ``letters``: webhook deliveries as dead letters (record, payload, requeue).
- ``runner``: ``WebhookDelivery``, the middleware that runs the deliverers.

Importing the package imports none of them: ``mailworker dead`` needs ``letters``
alone, which does not import ``requests``.
"""

__all__: list[str] = []
