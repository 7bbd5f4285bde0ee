"""``[email_actions]``: replying to a notification acts on the workflow task (DESIGN §10)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from settings.durations import Duration

if TYPE_CHECKING:
    from settings.models import InboundSource

__all__ = ["EmailActionsSettings", "receiving_source"]

_ADDRESS = re.compile(
    r"^[A-Za-z0-9!#$%&'*./=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$"
)
_AUTHSERV_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
# "actions+" and the 26-character key must fit the local part's 64 octets (RFC 5321).
KEY_LENGTH = 26
MAX_BASE_LOCAL = 64 - 1 - KEY_LENGTH


def _reply_address(value: str) -> str:
    if value and not _ADDRESS.match(value):
        raise ValueError(
            f"{value!r} is not a plain e-mail address without '+' "
            "(each key is added after one)"
        )
    local = value.partition("@")[0]
    if len(local) > MAX_BASE_LOCAL:
        raise ValueError(
            f"its local part is {len(local)} characters; at most {MAX_BASE_LOCAL}, so "
            f"that '+' and the {KEY_LENGTH}-character key fit in 64"
        )
    return value.lower()


# Room for "/a/", the key, "/" and a 32-character action id in a URL far below what
# mail clients and browsers open (shared research, "mailto links": ~2,000).
MAX_LINKS_BASE_URL = 200
_LOOPBACK_NAMES = {"localhost"}


def _loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _links_base_url(value: str) -> str:
    """An https origin (with an optional path), or http on a loopback host for dev."""
    if not value:
        return value
    if len(value) > MAX_LINKS_BASE_URL:
        raise ValueError(f"longer than {MAX_LINKS_BASE_URL} characters")
    try:
        url = urlsplit(value)
        host, port = url.hostname or "", url.port
    except ValueError as exc:
        raise ValueError(f"not a URL ({exc})") from None
    if url.scheme not in ("https", "http") or not host:
        raise ValueError("not an https:// URL with a host")
    if url.scheme == "http" and not _loopback(host):
        raise ValueError(
            "https is required (http only on a loopback host such as 127.0.0.1, "
            "for development)"
        )
    if url.username is not None or url.password is not None:
        raise ValueError("a user name or password has no place in it")
    if url.query or url.fragment or "?" in value or "#" in value:
        raise ValueError("no query or fragment: each link adds /a/<key>/<action> to it")
    if port == 0 or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError("not a URL (a port of 0, a space or a control character)")
    return value.rstrip("/")


def _authserv_id(value: str) -> str:
    if not _AUTHSERV_ID.match(value):
        raise ValueError(f"{value!r} is not an authserv-id (a host name)")
    return value.lower()


class EmailActionsSettings(BaseModel):
    """``[email_actions]``: notifications with actions, and the replies that act.

    A reply is accepted once, from the recipient its key was issued for, and only as
    authenticated as ``authentication`` demands.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    reply_address: Annotated[str, AfterValidator(_reply_address)] = ""
    key_ttl: Duration = 14 * 86400.0
    authentication: Literal["auto", "require", "none"] = "auto"
    trusted_authserv_ids: list[Annotated[str, AfterValidator(_authserv_id)]] = Field(
        default_factory=list
    )
    confirm_by_email: bool = False
    links_base_url: Annotated[str, AfterValidator(_links_base_url)] = ""

    @model_validator(mode="after")
    def _rules(self) -> EmailActionsSettings:
        if self.enabled and not self.reply_address:
            raise ValueError(
                "reply_address: enabled = true needs the address replies go to"
            )
        if self.key_ttl < 60:
            raise ValueError("key_ttl must be at least 1m")
        return self

    @property
    def domain(self) -> str:
        """The reply address's domain."""
        return self.reply_address.rpartition("@")[2]

    @property
    def local_part(self) -> str:
        """The reply address's local part, before the ``+key``."""
        return self.reply_address.partition("@")[0]


def receiving_source(
    address: str, sources: Sequence[InboundSource]
) -> InboundSource | None:
    """The enabled ``[[inbound]]`` source that receives ``address``, or None.

    An SMTP receiver receives what its ``accept`` lists (plus tags included), a Graph
    source its ``mailbox``. An IMAP source receives for its ``username`` when that is an
    address, and for any address when the login is a bare user name (the server's
    own delivery decides, which the configuration cannot show).
    """
    wanted = address.lower()
    for source in sources:
        if not source.enabled:
            continue
        if source.kind == "smtp" and wanted in {a.lower() for a in source.accept}:
            return source
        if source.kind == "graph" and source.mailbox.lower() == wanted:
            return source
        if source.kind == "imap" and (
            "@" not in source.username or source.username.lower() == wanted
        ):
            return source
    return None
