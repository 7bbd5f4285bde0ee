"""CSRF protection of the console's forms: Litestar's double-submit cookie, kept strict.

Every form carries the token (``{{ csrf_input | safe }}`` in the templates) and every
POST, the login's too, must send it back matching the cookie; the cookie is Secure,
HttpOnly and SameSite=Strict, and named apart from any other app on the same host. A
missing or wrong token is refused 403 with a page that says what happened.
"""

from __future__ import annotations

import hashlib
import hmac

from litestar.config.csrf import CSRFConfig

__all__ = ["CSRF_COOKIE", "CSRF_FIELD", "csrf_config"]

CSRF_COOKIE = "mailworker_ops_csrf"
CSRF_FIELD = "_csrf_token"  # the form field Litestar's middleware reads


def csrf_config(secret: bytes) -> CSRFConfig:
    """The console's CSRF settings.

    The cookie's path is ``/``: the mount path is known only per request, and the
    cookie's own name keeps it apart from other apps' on the same host.

    Args:
        secret: the console's secret (``session.console_secret``); a key for tokens
            is derived from it, never the secret itself.
    """
    key = hmac.new(secret, b"console csrf", hashlib.sha256).hexdigest()
    return CSRFConfig(
        secret=key,
        cookie_name=CSRF_COOKIE,
        cookie_path="/",
        cookie_secure=True,
        cookie_httponly=True,
        cookie_samesite="strict",
        header_name="x-mailworker-csrf",
    )
