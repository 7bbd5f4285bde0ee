"""The signed per-job return path: ``bounces+<token>@domain``, which only we can make.

The token is ``<signature>`` or ``<signature>=<job id>``: the signature is the first
80 bits of HMAC-SHA256(secret, job id), in lowercase base32. The job id rides along
when the address stays within RFC 5321's 64-octet local part; otherwise the bounce's
quoted Message-ID names the job and the signature vouches for it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from settings import BouncesSettings, read_secret

__all__ = ["ReturnPath", "Token"]

_LOCAL_MAX = 64
_SIGNATURE_CHARS = 16  # 80 bits, base32
_DOT_ATOM = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")


class Token:
    """A token read back from an address: its signature and the job id, when carried."""

    __slots__ = ("job_id", "signature")

    def __init__(self, signature: str, job_id: str | None) -> None:
        self.signature = signature
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"Token(job_id={self.job_id!r})"


class ReturnPath:
    """Makes and checks per-job return paths under ``[bounces] return_path``.

    Args:
        address: the base address, e.g. ``bounces@workflow.example.com``.
        secret: the key that signs each job's token (never logged).
    """

    def __init__(self, address: str, secret: bytes) -> None:
        self.local, _, self.domain = address.rpartition("@")
        self.domain = self.domain.lower()
        self._secret = secret

    @classmethod
    def from_settings(cls, bounces: BouncesSettings) -> ReturnPath | None:
        """The return path ``[bounces]`` configures, or None when it sets none.

        Raises:
            ConfigError: the secret file cannot be read.
        """
        if not bounces.return_path:
            return None
        secret = read_secret(bounces.secret, bounces.secret_file, "bounces.secret_file")
        assert secret is not None  # the settings require one with a return path
        return cls(bounces.return_path, secret.get_secret_value().encode())

    def __repr__(self) -> str:
        return f"ReturnPath({self.local}@{self.domain})"

    def sign(self, job_id: str) -> str:
        """The job's signature: 16 lowercase base32 characters."""
        digest = hmac.new(self._secret, job_id.encode(), hashlib.sha256).digest()
        return base64.b32encode(digest[:10]).decode().lower()

    def address(self, job_id: str) -> str:
        """The envelope sender for ``job_id``."""
        signature = self.sign(job_id)
        local = f"{self.local}+{signature}={job_id}"
        if len(local) > _LOCAL_MAX or not _DOT_ATOM.match(job_id):
            local = f"{self.local}+{signature}"
        return f"{local}@{self.domain}"

    def token_of(self, address: str) -> Token | None:
        """The token of an address under this return path, or None for other addresses."""
        local, _, domain = address.strip().strip("<>").rpartition("@")
        base, plus, token = local.partition("+")
        if (
            not plus
            or domain.lower() != self.domain
            or base.lower() != self.local.lower()
        ):
            return None
        signature, _, job_id = token.partition("=")
        return Token(signature.lower(), job_id or None)

    def verifies(self, token: Token, job_id: str) -> bool:
        """Whether ``token`` was made for ``job_id`` (and, if it names one, that job)."""
        if token.job_id is not None and token.job_id != job_id:
            return False
        return hmac.compare_digest(token.signature, self.sign(job_id))
