"""The ``/ops/`` dead-letter console for people (DESIGN §11, docs/design.md §2).

- ``app.py``: ``create_console_app``; a mount's path found from the request.
- ``session.py``: signed cookies naming sessions kept in Redis.
- ``csrf.py``: the forms' CSRF tokens.
- ``views.py``: login, logout, the overview, a job's status, suppressions.
- ``letters.py``: the dead letters: list, show, requeue, purge, requeue by filter.
- ``reads.py``: what the pages show, read from Redis.
- ``templates/``, ``static/console.css``: server-rendered pages, no script.
"""

from worker.console.app import ConsoleApp, create_console_app

__all__ = ["ConsoleApp", "create_console_app"]
