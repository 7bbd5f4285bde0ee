"""The HTTP API (docs/design.md §11): ``mailworker api``, its keys and its routes.

- ``app.py``: ``create_app(settings)``, the composition root; ``context.py`` the stores.
- ``keys.py``: API keys with scopes, stored hashed (``mailworker api-key``).
- ``auth.py``, ``ratelimit.py``: the bearer key, its scope, its rate limit.
- ``notifications.py``, ``batches.py``, ``enqueuer.py``: enqueue one or many, status.
- ``deadletters.py``, ``filters.py``, ``events.py``, ``health.py``: the other routes.
- ``bodies.py``, ``ids.py``, ``problems.py``: bodies, ids and errors (RFC 9457).
- ``schemas.py``, ``docs.py``, ``openapi.py``: the OpenAPI document.
- ``accesslog.py``, ``server.py``: the access log line and uvicorn.
"""
