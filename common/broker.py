"""The one factory of Redis clients, and what a broker failure means.

Every connection mailworker opens to its broker comes from ``connect`` (or, for a
connection of its own kind such as the wake-up listener, from ``sibling`` of such a
client): producers, workers (Dramatiq's broker, the per-thread scripts, the status
store, heartbeats, webhooks), ``mailworker inbound`` and the CLI. What ``broker_url``
names (``settings.endpoints``) decides the client:

- one server: ``redis.Redis.from_url``;
- Sentinel: ``Sentinel(...).master_for(service)``. Each new connection asks the
  Sentinels for the primary; a connection to a primary that died fails, and one to a
  primary demoted to replica fails on its first write (``READONLY`` becomes a
  connection error): the callers' reconnecting follows the new primary;
- Cluster: a client pinned to the primary of the namespace's slot (``SlotConnection``):
  a hash-tagged namespace keeps every key of mailworker's, Dramatiq's included, in one
  slot, so one node serves them all. Each new connection asks the cluster which node
  serves the slot; ``MOVED`` or ``CLUSTERDOWN`` become connection errors, so a failover
  or a moved slot is followed the same way.

Every client answers bytes (as Dramatiq needs) and connects lazily.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    TryAgainError,
)
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

from common import sockets
from settings import (
    BrokerAuthenticationError,
    BrokerUnavailableError,
    ConfigError,
    Settings,
)
from settings.endpoints import BrokerEndpoint, parse_broker_url

__all__ = [
    "SlotConnection",
    "SlotOwner",
    "broker_error",
    "connect",
    "connect_settings",
    "replication",
    "require_replicas",
    "sibling",
    "wait_replicas",
]

_WAIT = "_mailworker_wait"  # the attribute of a pool that holds its replication policy

CONNECT_TIMEOUT = 5.0
IO_TIMEOUT = 10.0


def broker_error(label: str, exc: redis.RedisError) -> BrokerUnavailableError:
    """The error for a failed broker call, in words that say what the broker did.

    Args:
        label: the broker URL with its password masked (``public_url``).
        exc: what redis-py raised.

    Returns:
        A ``BrokerAuthenticationError`` when the broker refused the login or a command
        (its message says which, and how to fix it), else a ``BrokerUnavailableError``.
        Neither message holds a secret.
    """
    parts = urlsplit(label)
    user = f"ACL user {parts.username!r}" if parts.username else "the default user"
    kind = exc.__class__.__name__
    if isinstance(exc, MasterNotFoundError):
        return BrokerUnavailableError(
            f"broker {label}: no Sentinel named a primary ({kind}): check the Sentinel "
            "hosts, the service name after them, sentinel_password if the Sentinels "
            "require one, and that they see a primary"
        )
    if isinstance(exc, redis.AuthenticationError):
        if parts.password is None and "password=" not in parts.query:
            return BrokerAuthenticationError(
                f"broker {label} requires a password ({kind}): give it in broker_url "
                "or MAILWORKER_BROKER_URL as redis://[user]:password@host:port/db"
            )
        return BrokerAuthenticationError(
            f"broker {label} refused the login ({kind}): the password in broker_url is "
            f"wrong, or {user} is unknown or disabled"
        )
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return BrokerAuthenticationError(
            f"broker {label} refused a command to {user} ({kind}: {exc}): its ACL must "
            "allow mailworker's commands on the namespace's keys and channels"
        )
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return BrokerUnavailableError(
            f"broker {label} is a read-only replica ({kind}): point broker_url at the "
            "primary"
        )
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return BrokerUnavailableError(
            f"broker {label} is still loading its data set ({kind}): try again"
        )
    return BrokerUnavailableError(f"broker {label} unreachable: {kind}")


def connect(
    url: str,
    *,
    ca_bundle: Path | None = None,
    namespace: str | None = None,
    timeout: float = IO_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
    replicas: int = 0,
    replica_timeout: float = 1.0,
) -> redis.Redis:
    """Return a Redis client for ``url`` (bytes replies, as Dramatiq needs).

    Args:
        url: ``broker_url`` in any of its forms (``settings.endpoints``).
        ca_bundle: extra trust for TLS (``rediss://``, ``rediss+sentinel://``,
            ``rediss+cluster://``).
        namespace: the key namespace; a Cluster URL needs it (its slot picks the node).
        timeout: the bound of each read and write, in seconds.
        connect_timeout: the bound of each connect, in seconds.
        replicas: ``[broker] wait_replicas``: how many replicas must have an enqueue,
            an acknowledgement or a status write before it returns (``replication``).
        replica_timeout: ``[broker] wait_timeout``, in seconds.

    Returns:
        A client. It connects lazily.

    Raises:
        ConfigError: on ``broker_url`` (or ``namespace`` for a Cluster URL). No
            password is shown.
    """
    client = _client(url, ca_bundle, namespace, timeout, connect_timeout)
    require_replicas(client, replicas, replica_timeout)
    return client


def connect_settings(
    settings: Settings, url: str | None = None, **options: Any
) -> redis.Redis:
    """``connect`` with the configuration's CA bundle, namespace and ``[broker]``.

    Args:
        settings: the configuration.
        url: a ``--broker-url`` that overrides ``settings.broker_url``.
        options: ``connect``'s timeouts.
    """
    return connect(
        url or settings.broker_url.get_secret_value(),
        ca_bundle=settings.broker_ca_bundle,
        namespace=settings.namespace,
        replicas=settings.broker.wait_replicas,
        replica_timeout=settings.broker.wait_timeout,
        **options,
    )


def _client(
    url: str,
    ca_bundle: Path | None,
    namespace: str | None,
    timeout: float,
    connect_timeout: float,
) -> redis.Redis:
    endpoint = parse_broker_url(url)
    if endpoint.kind == "sentinel":
        return _sentinel(endpoint, ca_bundle, timeout, connect_timeout)
    if endpoint.kind == "cluster":
        return _cluster(endpoint, ca_bundle, namespace, timeout, connect_timeout)
    options: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": timeout,
    }
    if ca_bundle is not None and url.startswith("rediss://"):
        options["ssl_ca_certs"] = str(ca_bundle)
    if url.startswith("redis://") and sockets.supported():
        # The same bound, kept by the kernel: no poll before each send and read.
        del options["socket_timeout"]
        options.update(
            connection_class=sockets.KernelTimeoutConnection, io_timeout=timeout
        )
    return redis.Redis.from_url(url, **options)


def _tls(endpoint: BrokerEndpoint, ca_bundle: Path | None) -> dict[str, Any]:
    if not endpoint.tls:
        return {}
    options: dict[str, Any] = {"ssl": True}
    if ca_bundle is not None:
        options["ssl_ca_certs"] = str(ca_bundle)
    return options


def _sentinel(
    endpoint: BrokerEndpoint,
    ca_bundle: Path | None,
    timeout: float,
    connect_timeout: float,
) -> redis.Redis:
    timeouts = {"socket_timeout": timeout, "socket_connect_timeout": connect_timeout}
    tls = _tls(endpoint, ca_bundle)
    sentinel_kwargs: dict[str, Any] = {**timeouts, **tls}
    if endpoint.sentinel_password is not None:
        sentinel_kwargs["password"] = endpoint.sentinel_password
        if endpoint.sentinel_username is not None:
            sentinel_kwargs["username"] = endpoint.sentinel_username
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(endpoint.hosts),
        sentinel_kwargs=sentinel_kwargs,
        username=endpoint.username,
        password=endpoint.password,
        db=endpoint.db,
        **timeouts,
        **tls,
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        endpoint.service, redis_class=redis.Redis
    )
    return client


class SlotOwner:
    """Which node serves one slot of a Redis Cluster, asked of the cluster's nodes.

    The answer is kept until a connection to it fails (``forget``).

    Args:
        seeds: nodes to ask (any of the cluster's).
        slot: the slot.
        options: connection options (login, TLS, timeouts) for asking.
    """

    def __init__(
        self, seeds: list[tuple[str, int]], slot: int, options: dict[str, Any]
    ) -> None:
        self.seeds = seeds
        self.slot = slot
        self._options = options
        self._lock = threading.Lock()
        self._known: tuple[str, int] | None = None

    def address(self) -> tuple[str, int]:
        """The node serving the slot now.

        Raises:
            redis.ConnectionError: no seed answered, or none serves the slot.
        """
        with self._lock:
            if self._known is not None:
                return self._known
            known = self._ask()
            self._known = known
            return known

    def forget(self) -> None:
        with self._lock:
            self._known = None

    def _ask(self) -> tuple[str, int]:
        try:
            cluster = RedisCluster(
                startup_nodes=[
                    ClusterNode(h, p)  # type: ignore[no-untyped-call]
                    for h, p in self.seeds
                ],
                **self._options,
            )
        except (redis.RedisError, OSError) as exc:
            raise redis.ConnectionError(
                f"no node of the cluster answered ({type(exc).__name__})"
            ) from None
        try:
            node = cluster.nodes_manager.get_node_from_slot(self.slot)
            if node is None:
                raise redis.ConnectionError(f"no node serves slot {self.slot}")
            # Next time, ask the nodes the cluster has now first.
            nodes = [(n.host, n.port) for n in cluster.get_primaries()]  # type: ignore[no-untyped-call]
            self.seeds = list(dict.fromkeys([*nodes, *self.seeds]))
            return str(node.host), int(node.port)
        except (redis.RedisError, OSError) as exc:
            raise redis.ConnectionError(
                f"the cluster did not say which node serves slot {self.slot} "
                f"({type(exc).__name__})"
            ) from None
        finally:
            cluster.close()


# What a node answers a script whose keys (declared or not) it does not serve.
_NOT_LOCAL = "Script attempted to access a non local key"


class _SlotMixin:
    """Connects to whichever node serves ``slot_owner``'s slot now."""

    def __init__(self, *, slot_owner: SlotOwner, **kwargs: Any) -> None:
        self.slot_owner = slot_owner
        super().__init__(**kwargs)

    def _connect(self) -> Any:
        self.host, self.port = self.slot_owner.address()
        try:
            return super()._connect()  # type: ignore[misc]
        except OSError:
            self.slot_owner.forget()
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            moved = isinstance(
                exc, MovedError | AskError | ClusterDownError | TryAgainError
            ) or str(exc).startswith(_NOT_LOCAL)
            if not moved and not isinstance(exc, ReadOnlyError):
                raise
            # The slot moved, or its node failed over: reconnect (and ask again).
            self.slot_owner.forget()
            self.disconnect()  # type: ignore[attr-defined]
            raise redis.ConnectionError(
                f"the cluster's node for the slot changed ({type(exc).__name__})"
            ) from None


class SlotConnection(_SlotMixin, redis.Connection):
    """A connection to the node that serves one slot (plain TCP)."""


class SlotSSLConnection(_SlotMixin, redis.SSLConnection):
    """A connection to the node that serves one slot (TLS)."""


def _cluster(
    endpoint: BrokerEndpoint,
    ca_bundle: Path | None,
    namespace: str | None,
    timeout: float,
    connect_timeout: float,
) -> redis.Redis:
    if namespace is None or not namespace.startswith("{"):
        raise ConfigError(
            "namespace",
            f"{namespace!r} is not a hash tag; on Redis Cluster every key must be in "
            "one slot: write it as {name}",
        )
    login: dict[str, Any] = {
        "username": endpoint.username,
        "password": endpoint.password,
    }
    timeouts = {"socket_timeout": timeout, "socket_connect_timeout": connect_timeout}
    tls = _tls(endpoint, ca_bundle)
    owner = SlotOwner(
        list(endpoint.hosts), key_slot(namespace.encode()), {**login, **timeouts, **tls}
    )
    kwargs: dict[str, Any] = {**login, **timeouts, "slot_owner": owner}
    if "ssl_ca_certs" in tls:
        kwargs["ssl_ca_certs"] = tls["ssl_ca_certs"]
    pool = redis.ConnectionPool(
        connection_class=SlotSSLConnection if endpoint.tls else SlotConnection, **kwargs
    )
    return redis.Redis(connection_pool=pool)


def sibling(
    client: redis.Redis, *, without: tuple[str, ...] = (), **overrides: Any
) -> redis.Redis:
    """A client to the same endpoint as ``client``, on a pool of its own.

    Args:
        client: a client from ``connect``.
        without: connection options to drop.
        overrides: connection options to change (``client_name``, timeouts), and the
            pool's ``max_connections``.

    Returns:
        A client that follows a failover as ``client`` does (Sentinel, Cluster).
    """
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    kwargs.pop("connection_pool", None)  # Sentinel's pool sets its own
    for name in without:
        kwargs.pop(name, None)
    kwargs.update(overrides)
    connection_class = kwargs.pop("connection_class", pool.connection_class)
    if isinstance(pool, SentinelConnectionPool):
        new: redis.ConnectionPool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
            pool.service_name,
            pool.sentinel_manager,
            connection_class=connection_class,
            **kwargs,
        )
    else:
        new = redis.ConnectionPool(connection_class=connection_class, **kwargs)
    setattr(new, _WAIT, replication(client))
    return redis.Redis(connection_pool=new)


def require_replicas(client: redis.Redis, replicas: int, timeout: float) -> None:
    """Make ``client``'s enqueues, acknowledgements and status writes wait for replicas.

    Args:
        client: the broker client (its pool carries the policy, its siblings too).
        replicas: how many replicas must have each such write (0: the primary's word).
        timeout: how long to wait for them, in seconds.
    """
    setattr(client.connection_pool, _WAIT, (replicas, max(1, round(timeout * 1000))))


def replication(client: redis.Redis) -> tuple[int, int]:
    """``client``'s (replicas, timeout in ms) for writes that must be replicated."""
    policy: tuple[int, int] = getattr(client.connection_pool, _WAIT, (0, 1000))
    return policy


def wait_replicas(conn: Any, replicas: int, timeout_ms: int) -> int:
    """Send ``WAIT`` on ``conn`` (a connection that just wrote) and read its answer.

    Returns:
        How many replicas have every write of this connection so far.
    """
    conn.send_command("WAIT", replicas, timeout_ms)
    return int(conn.read_response())
