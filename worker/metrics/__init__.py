"""Prometheus metrics (README, "Metrics"); importing the package imports none of its modules.

- ``directory.py``: the host's multi-process directory, a subdirectory per launcher:
  wiped at start, dead processes marked.
- ``recorder.py``: ``Recorder``, what a process counts, where an outcome is known.
- ``broker.py``: ``BrokerCollector``, the shared state read from Redis at each scrape.
- ``exposition.py``: ``/metrics`` as an ASGI app (``asgi_app``) or a server (``serve``).
"""
