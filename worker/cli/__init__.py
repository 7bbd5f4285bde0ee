"""The ``mailworker`` command (``main``) and its groups, one module each.

- ``main``: the root group, ``worker``, ``status``, ``test-connection``, ``config
  check`` and ``health``.
- ``dead``: ``dead list|show|requeue|purge``.
- ``stats``: ``queue stats``.
- ``events``: ``events tail``.
- ``scheduled``: ``scheduled list|cancel``.
- ``dev``: ``dev``, with its embedded broker and capture mailbox.
- ``testconn``: the steps of ``test-connection``.
- ``output``: how status records and the configuration are printed.
"""

__all__: list[str] = []
