"""The HTTP API (docs/design.md §11): ``mailworker api``, its keys and its routes.

- ``keys.py``: API keys with scopes, stored hashed (``mailworker api-key``).
"""
