"""Lua scripts called over a Redis connection of the calling thread's own.

A worker thread's status write (with every acknowledgement) and a consumer thread's
fetches (Dramatiq's ``dispatch`` script, also while a queue is idle) are the Redis calls
made most often. Through the client each would also pay the pool's bookkeeping: a
connection taken and given back, a readiness check, the retry and deprecation wrappers
(docs/benchmarks.md has the cost). Every thread keeps one connection of its own per
pool, shared by all scripts.

With ``[broker] wait_replicas`` (``common.broker.replication``), a script made with
``wait=True`` sends ``WAIT`` right after its call, on the same connection and in the same
write: it returns once that many replicas have the write, or after ``wait_timeout`` with
a ``replication_short`` warning (the write stands on the primary; docs/scaling.md).

The connections follow a failover as the client's own do: they are made by the pool's
connection class (Sentinel's asks the Sentinels for the primary, the Cluster one asks
the cluster for the slot's node), and a demoted primary's ``READONLY`` or a ``MOVED``
is a connection error. A new primary that lacks a script answers ``NOSCRIPT``, and the
call is made again with its source.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
import structlog
from redis.exceptions import NoScriptError, ResponseError

from common.broker import replication

__all__ = ["DispatchScript", "ThreadLocalScript", "close_connections"]

log = structlog.get_logger("mailworker.broker")

_LOCAL = "_mailworker_threads"  # the attribute of a pool that holds its threads' own

# Bumped in a forked child, whose threads must never use the parent's connections.
_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_forked)


# A connection idle this long is checked before use, as redis-py's pool checks its own:
# Redis may have restarted, or closed it (its `timeout` setting).
_CHECK_AFTER_IDLE = 1.0

_lock = threading.Lock()  # guards the bookkeeping below (connections are made rarely)


class _ThreadConnections:
    """The connections ThreadLocalScripts made on one pool: each thread's, and all of them."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.made: weakref.WeakSet[Any] = weakref.WeakSet()


def close_connections(client: redis.Redis) -> None:
    """Close every connection ThreadLocalScripts made on ``client``'s pool.

    Call it once the threads that use them have stopped. A thread that calls one again
    later reconnects.
    """
    own: _ThreadConnections | None = getattr(client.connection_pool, _LOCAL, None)
    if own is None:
        return
    with _lock:
        made = list(own.made)
    for conn in made:
        conn.disconnect()


def _closed(conn: Any) -> bool:
    """Whether the server closed ``conn`` (or sent something unasked).

    It is a non-blocking look, as the pool takes before it lends a connection.
    """
    try:
        return bool(conn.can_read())
    except (redis.ConnectionError, OSError):
        return True


_SHORT_LOG_EVERY = 10.0  # seconds between two replication_short lines of a process
_short_state = {"logged": -_SHORT_LOG_EVERY, "since": 0}


def _short(acked: int, replicas: int, timeout_ms: int) -> None:
    """Log a write too few replicas confirmed: at most once per 10 s, with a count.

    Without replicas every write waits and comes back short (each consumer's polls
    too), so one line per write would flood the log.
    """
    now = time.monotonic()
    with _lock:
        _short_state["since"] += 1
        if now - _short_state["logged"] < _SHORT_LOG_EVERY:
            return
        writes, _short_state["since"], _short_state["logged"] = (
            _short_state["since"],
            0,
            now,
        )
    log.warning(
        "replication_short",
        replicas=acked,
        wait_replicas=replicas,
        wait_timeout_ms=timeout_ms,
        writes=writes,
        note="the writes stand on the primary; a failover now could lose them",
    )


class ThreadLocalScript:
    """``body`` run with EVALSHA (EVAL when the server does not have it yet).

    Args:
        client: whose connection settings (host, TLS, password, timeouts) to use.
        body: the Lua source.
        idempotent: whether running the script twice does no harm. Only then is a call
            whose reply was lost made again (see ``run``).
        wait: whether its calls wait for ``[broker] wait_replicas`` replicas.
    """

    def __init__(
        self,
        client: redis.Redis,
        body: str | bytes,
        *,
        idempotent: bool = True,
        wait: bool = False,
    ) -> None:
        self._client = client
        self._wait = wait
        self._pool = client.connection_pool
        self._body = body.encode() if isinstance(body, str) else body
        self._sha = hashlib.sha1(self._body).hexdigest()  # noqa: S324 - Redis' script id
        self._idempotent = idempotent
        # Each thread's own connection, shared by every ThreadLocalScript of this pool (it
        # lives as long as the pool).
        with _lock:
            own = getattr(self._pool, _LOCAL, None)
            if own is None:
                own = _ThreadConnections()
                setattr(self._pool, _LOCAL, own)
        self._own: _ThreadConnections = own
        self._local: Any = own.local
        # redis-py's packer first walks every argument in Python. Ours are only str, int
        # and bytes, which hiredis packs directly (a bulk ack carries ~30 a job). The
        # embedded broker (fakeredis) keeps the client's own path.
        self._packed = not self._pool.connection_class.__module__.startswith(
            "fakeredis"
        )

    def __call__(self, *args: Any) -> Any:
        """Run the script with no keys and ``args`` as ARGV (see ``run``)."""
        return self.run((), args)

    def run(
        self, keys: Sequence[Any], args: Sequence[Any], *, wait: bool | None = None
    ) -> Any:
        """Run the script with ``keys`` as KEYS and ``args`` as ARGV.

        A connection idle for a second is checked first, and replaced when the server
        has closed it. A call that fails on the way out (nothing reached Redis) is sent
        once more on a new connection. A call whose reply is lost drops its connection.
        An idempotent script's call is then made once more on a new one, if the old one
        had served calls before (Redis may have restarted since). Any other is raised,
        as the client would raise it. ``wait`` overrides the script's own ``wait``.

        Raises:
            redis.RedisError: as the client would.
        """
        command = (len(keys), *keys, *args)
        replicas, timeout_ms = (
            replication(self._client)
            if (self._wait if wait is None else wait)
            else (0, 0)
        )
        local = self._local
        now = time.monotonic()
        conn: Any = getattr(local, "conn", None)
        fresh = conn is None or local.generation != _generation
        if not fresh and now - local.used > _CHECK_AFTER_IDLE and _closed(conn):
            conn.disconnect()
            fresh = True
        if fresh:
            conn = self._connection(local)
        local.used = now
        try:
            return self._run(conn, command, replicas, timeout_ms)
        except (redis.ConnectionError, redis.TimeoutError):
            if fresh or not self._idempotent:
                raise
        return self._run(self._connection(local), command, replicas, timeout_ms)

    def _connection(self, local: Any) -> Any:
        conn = self._pool.connection_class(**self._pool.connection_kwargs)
        with _lock:
            self._own.made.add(conn)
        local.conn, local.generation = conn, _generation
        return conn

    def _run(
        self, conn: Any, command: tuple[Any, ...], replicas: int, timeout_ms: int
    ) -> Any:
        try:
            try:
                self._send(conn, ("EVALSHA", self._sha, *command), replicas, timeout_ms)
                return self._read(conn, replicas, timeout_ms)
            except NoScriptError:
                self._send(conn, ("EVAL", self._body, *command), replicas, timeout_ms)
                return self._read(conn, replicas, timeout_ms)
        except ResponseError:
            raise  # the script failed, the connection is fine
        except BaseException:
            conn.disconnect()  # a reply may still be on its way: never reuse this one
            raise

    def _read(self, conn: Any, replicas: int, timeout_ms: int) -> Any:
        if not replicas:
            return conn.read_response()
        try:
            reply = conn.read_response()
        except ResponseError:
            conn.read_response()  # WAIT's answer: the connection stays in step
            raise
        acked = int(conn.read_response())
        if acked < replicas:
            _short(acked, replicas, timeout_ms)
        return reply

    def _send(
        self, conn: Any, command: tuple[Any, ...], replicas: int, timeout_ms: int
    ) -> None:
        commands = [command]
        if replicas:
            commands.append(("WAIT", replicas, timeout_ms))
        try:
            self._write(conn, commands)
        except (redis.ConnectionError, redis.TimeoutError):
            # A command cut off is never executed, but the script goes out before its
            # WAIT: cut in the WAIT, it has run. Only an idempotent one is sent again
            # then; any other call is raised (a lost fetch is sorted out by its consumer).
            if len(commands) > 1 and not self._idempotent:
                raise
            # Once more, on a new socket (the connection reconnects when it sends).
            conn.disconnect()
            self._write(conn, commands)

    def _write(self, conn: Any, commands: list[tuple[Any, ...]]) -> None:
        if getattr(conn, "_sock", True) is None:
            # Through connect(): a Sentinel-managed connection asks for the primary
            # there (sending would reconnect to the address it had).
            conn.connect()
        if self._packed:
            try:
                packed = [hiredis.pack_command(command) for command in commands]
            except TypeError as exc:  # what redis-py's packer raises as DataError
                raise redis.DataError(str(exc)) from exc
            conn.send_packed_command(packed)
        else:
            for command in commands:
                conn.send_command(*command)


class DispatchScript:
    """A ``ThreadLocalScript`` called as Dramatiq calls its scripts: ``(args=, keys=)``.

    A timeout is raised as ``redis.ConnectionError``, the error Dramatiq's consumer, ack
    and requeue recover from (reconnecting, trying again).
    """

    def __init__(self, script: ThreadLocalScript) -> None:
        self._script = script

    # The commands that wait for [broker] wait_replicas. A fetch too: a fetch a failover
    # loses leaves its messages on the queue of the new primary while this process
    # sends them, and a second fetch there would send them again (the begin that went
    # with the first is lost as well, so nothing would say "in doubt").
    _WAITING = frozenset({"enqueue", "fetch", "ack", "nack", "requeue"})

    def __call__(self, args: list[Any], keys: list[Any]) -> Any:
        # Dramatiq's script is not idempotent (made once: a lost reply is raised): a
        # fetch whose reply is lost is sorted out by its consumer (SafeConsumer._reclaim).
        try:
            return self._script.run(keys, args, wait=args[0] in self._WAITING)
        except redis.TimeoutError as exc:
            raise redis.ConnectionError(str(exc)) from exc
