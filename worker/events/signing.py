"""Standard Webhooks signatures: the key from a webhook's secret, and the signed headers."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from settings import ConfigError, Webhook, read_secret

__all__ = ["SECRET_PREFIX", "Signer", "signature", "signer_for", "signing_key"]

# A secret in the Standard Webhooks form: this prefix, then the key in base64.
SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix that marks the form, not a secret)


def signing_key(secret: str, *, field: str = "secret") -> bytes:
    """The HMAC key a webhook secret stands for.

    A secret that starts with ``whsec_`` is the base64 of the key (Standard Webhooks);
    any other secret is used as its UTF-8 bytes.

    Args:
        secret: the configured secret.
        field: the key that holds it, for the error.

    Returns:
        The key bytes.

    Raises:
        ConfigError: a ``whsec_`` secret whose rest is not base64, or an empty key.
    """
    if secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                field, "a secret that starts with whsec_ must be base64 after it"
            ) from None
    else:
        key = secret.encode()
    if not key:
        raise ConfigError(field, "the signing key is empty")
    return key


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256.

    The signed content is ``f"{message_id}.{timestamp}.{body}"``.
    """
    content = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Signer:
    """Signs one webhook's deliveries. Its key never shows in a repr.

    Args:
        key: the HMAC key (``signing_key``).
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "Signer(key=***)"

    def headers(self, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The three Standard Webhooks headers of one delivery attempt."""
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(self._key, message_id, timestamp, body),
        }


def signer_for(webhook: Webhook) -> Signer:
    """The signer of one webhook, from its ``secret`` or ``secret_file`` (read now).

    Raises:
        ConfigError: the secret file cannot be read, or the secret is not a key.
    """
    field = f"webhook[{webhook.name}]." + (
        "secret_file" if webhook.secret_file else "secret"
    )
    secret = read_secret(webhook.secret, webhook.secret_file, field)
    if secret is None:
        raise ConfigError(field, "needs secret_file (the key that signs each delivery)")
    return Signer(signing_key(secret.get_secret_value(), field=field))
