"""The Dramatiq broker every Dramatiq peer uses: Dramatiq's own ``RedisBroker`` with its
default middleware, on the harness's Redis and namespace."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.common import ENV_NAMESPACE, ENV_QUEUE, ENV_REDIS_URL, env

QUEUE = env(ENV_QUEUE, "bench")
broker = RedisBroker(url=env(ENV_REDIS_URL), namespace=env(ENV_NAMESPACE))
dramatiq.set_broker(broker)

__all__ = ["QUEUE", "broker"]
