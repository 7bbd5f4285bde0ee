"""Prometheus metrics (README, "Metrics"); importing the package imports none of its modules.

- ``directory.py``: the host's multi-process directory, a subdirectory per launcher:
  wiped at start, dead processes marked.
- ``recorder.py``: ``Recorder``, what a process counts, where an outcome is known.
- ``process.py``: turning it on: ``launch`` (a launching command), ``worker_process``
  (each Dramatiq worker process), ``stop``.
- ``broker.py``: ``BrokerCollector``, the shared state read from Redis at each scrape.
- ``exposition.py``: ``/metrics`` as an ASGI app (``asgi_app``) or a server (``serve``).
"""
