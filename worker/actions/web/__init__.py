"""Action links (DESIGN §10): the pages behind ``<links_base_url>/a/<key>/<action>``.

- ``app``: ``create_links_app``: the Litestar app ``mailworker api`` mounts at ``/a``.
- ``links``: ``ActionLinks``: what a page shows, and a POST's acceptance (the replies' rules
  and script); ``loggable_path``: a request path without its key, for access logs.
- ``tokens``: ``FormTokens``: the pages' form tokens (HMAC over key, action, expiry).
- ``pages``: the templates, their words, and the headers of every response.
"""

from worker.actions.web.app import create_links_app
from worker.actions.web.links import loggable_path

__all__ = ["create_links_app", "loggable_path"]
