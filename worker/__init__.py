"""The worker: delivers queued notifications and records what became of each.

The composition root is ``worker.app.build``. docs/design.md maps every package and
module. Subpackages: ``broker`` (all that knows Dramatiq's internals), ``middleware``
(one Dramatiq middleware a module), ``transports`` (SMTP, Microsoft Graph), ``cli``
(the ``mailworker`` command). Nothing is imported here, so that each command loads
only what it uses.
"""

__all__: list[str] = []
