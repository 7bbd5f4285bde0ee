"""``broker_url`` read as the Redis endpoint it names: one server, Sentinel, or Cluster.

The forms (README, "Redis high availability"; docs/configuration.md):

- ``redis://[user:password@]host:port/db`` and ``rediss://…``: one server (redis-py's
  URL, query options included).
- ``redis+sentinel://[user:password@]h1:26379,h2:26379,h3:26379/SERVICE[/db]`` and
  ``rediss+sentinel://…``: the primary Sentinel names ``SERVICE``. The user info is the
  data nodes' login; ``sentinel_username`` and ``sentinel_password`` query parameters
  are the Sentinels' own, when they require one. ``rediss+`` is TLS to both.
- ``redis+cluster://[user:password@]h1:6379,h2:6379[/]`` and ``rediss+cluster://…``: any
  nodes of a Redis Cluster; the namespace must be a hash tag (``{mailworker}``).

Every error names ``broker_url`` and shows the URL with its passwords masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from settings.errors import ConfigError

__all__ = ["BrokerEndpoint", "parse_broker_url"]

Kind = Literal["redis", "sentinel", "cluster"]

_KINDS: dict[str, tuple[Kind, bool]] = {
    "redis": ("redis", False),
    "rediss": ("redis", True),
    "unix": ("redis", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_DEFAULT_PORT = {"sentinel": 26379, "cluster": 6379}
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class BrokerEndpoint:
    """What ``broker_url`` names. ``repr`` never shows a password."""

    kind: Kind
    tls: bool
    url: str = field(repr=False)  # as given (a "redis" kind is opened from it)
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    service: str = ""  # Sentinel's name of the primary
    db: int = 0
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def _error(url: str, reason: str) -> ConfigError:
    from settings.loading import public_url  # loading imports the models, which use us

    try:
        shown = public_url(url)
    except ValueError:
        shown = url.partition("://")[0] + "://…"
    return ConfigError("broker_url", f"{shown}: {reason}")


def _hosts(url: str, netloc: str, kind: Kind) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        item = item.strip()
        if not item:
            raise _error(url, "an empty host in the list (h1:port,h2:port)")
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise _error(url, f"{item!r} has no host name")
        try:
            port = int(port_text) if port_text else _DEFAULT_PORT[kind]
        except ValueError:
            raise _error(url, f"{item!r}: the port is not a number") from None
        if not 0 < port < 65536:
            raise _error(url, f"{item!r}: the port is out of range")
        hosts.append((host, port))
    return tuple(hosts)


def parse_broker_url(url: str) -> BrokerEndpoint:
    """Read ``url``.

    Raises:
        ConfigError: on ``broker_url``: an unknown scheme, no hosts, a Sentinel URL
            without its service name, an unknown option. No password is shown.
    """
    scheme, sep, _ = url.partition("://")
    known = _KINDS.get(scheme.lower()) if sep else None
    if known is None:
        raise _error(
            url,
            "the scheme must be redis://, rediss://, unix://, redis+sentinel://, "
            "rediss+sentinel://, redis+cluster:// or rediss+cluster://",
        )
    kind, tls = known
    if kind == "redis":
        return BrokerEndpoint(kind, tls, url)
    parts = urlsplit(url)
    hosts = _hosts(url, parts.netloc, kind)
    userinfo = parts.netloc.rpartition("@")[0]
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    allowed = _SENTINEL_OPTIONS if kind == "sentinel" else ()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hint = f" (it takes {', '.join(allowed)})" if allowed else ""
        raise _error(url, f"unknown option {unknown[0]!r}{hint}")
    path = [p for p in parts.path.split("/") if p]
    service, db = "", 0
    if kind == "sentinel":
        if not path:
            raise _error(
                url,
                "name the primary's Sentinel service: redis+sentinel://hosts/NAME/db",
            )
        service = unquote(path[0])
        rest = path[1:]
    else:
        rest = path
    if len(rest) > 1 or (rest and not rest[0].isdigit()):
        raise _error(url, "after the hosts give at most a database number")
    if rest:
        db = int(rest[0])
    if kind == "cluster" and db != 0:
        raise _error(url, "Redis Cluster has only database 0")
    return BrokerEndpoint(
        kind,
        tls,
        url,
        hosts=hosts,
        username=username,
        password=password,
        service=service,
        db=db,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
    )
