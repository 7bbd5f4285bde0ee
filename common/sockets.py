"""Socket timeouts kept by the kernel rather than by Python, and free loopback ports.

CPython polls a socket that has a timeout before every send and every receive: one more
system call and one more release and re-acquire of the GIL per I/O. With eight worker
threads a process, each GIL hand-off tends to be a context switch. Per message that was
about 8 polls. A blocking socket with ``SO_RCVTIMEO`` and ``SO_SNDTIMEO`` keeps the same
bound: a stalled peer still fails the call after the timeout, as ``EAGAIN`` (which the
callers below turn into a timeout error).

Only plain TCP sockets on Linux get this. The ``ssl`` module retries a blocking read
that returns ``EAGAIN`` for ever, so TLS sockets keep their Python timeouts.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys
from typing import Any

import redis

__all__ = ["KernelTimeoutConnection", "free_port", "kernel_timeouts", "supported"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def supported() -> bool:
    """Whether this platform's ``SO_RCVTIMEO`` takes the ``struct timeval`` packed here."""
    return sys.platform.startswith("linux")


def kernel_timeouts(sock: socket.socket, seconds: float | None) -> bool:
    """Make ``sock`` blocking, with send and receive bounded by the kernel.

    Returns:
        True when applied. False (nothing changed) for a TLS socket, no timeout or a
        platform without support.
    """
    if (
        not supported()
        or not seconds
        or seconds <= 0
        or isinstance(sock, ssl.SSLSocket)
    ):
        return False
    micros = max(1, round(seconds * 1_000_000))  # 0 would mean "no timeout"
    value = struct.pack("ll", micros // 1_000_000, micros % 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    sock.settimeout(None)
    return True


class KernelTimeoutConnection(redis.Connection):
    """A plain-TCP Redis connection whose read and write timeout the kernel enforces.

    redis-py is given no ``socket_timeout``, so its socket stays blocking, including after
    the non-blocking peeks it makes when a pooled connection is taken. ``io_timeout`` is
    set with ``SO_RCVTIMEO``/``SO_SNDTIMEO`` instead. A stalled server fails a call
    after ``io_timeout`` with ``redis.ConnectionError`` ("Error while reading from
    socket"), which redis-py and Dramatiq retry as they do a lost connection.
    """

    def __init__(self, *, io_timeout: float = 10.0, **kwargs: Any) -> None:
        kwargs["socket_timeout"] = None
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self.io_timeout = io_timeout

    def _connect(self) -> socket.socket:
        sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]
        kernel_timeouts(sock, self.io_timeout)
        return sock
