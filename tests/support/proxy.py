"""A loopback TCP proxy that cuts its first matching connection at a chosen byte."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.env import HOST


class CuttingProxy:
    """Forwards connections to ``HOST:port``; cuts one once, where the test says.

    ``cut_reply(marker, after)``: cut the first connection on which the server sends
    ``marker``, ``after`` bytes past it. ``cut_request(marker)``: cut the first one on
    which the client sends ``marker``, before the server gets it. Later connections
    pass untouched.

    Args:
        port: the server's port on ``HOST``.
        host: the server's address (a loopback one).
    """

    def __init__(self, port: int, host: str = HOST) -> None:
        self.target = (host, port)
        self._listener = socket.create_server((HOST, 0))
        self.port = int(self._listener.getsockname()[1])
        self._reply: tuple[bytes, int] | None = None
        self._request: bytes | None = None
        self.cuts = 0
        self._sent = bytearray()  # what clients sent, all connections in order
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def cut_reply(self, marker: bytes, after: int) -> None:
        self._reply = (marker, after)

    def cut_request(self, marker: bytes) -> None:
        self._request = marker

    def commands(self) -> list[str]:
        """The lines clients have sent so far (IMAP commands, SMTP commands…)."""
        with self._lock:
            sent = bytes(self._sent)
        return [line.decode("latin-1") for line in sent.split(b"\r\n") if line]

    def start(self) -> None:
        self._spawn(self._accept)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            server = socket.create_connection(self.target, timeout=10)
            with self._lock:
                self._sockets += [client, server]
            self._spawn(self._pump, server, client, "reply")
            self._spawn(self._pump, client, server, "request")

    def _cut(self, *socks: socket.socket) -> None:
        with self._lock:
            self.cuts += 1
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        tail, left = b"", None  # left: bytes still to forward before the cut
        while True:
            try:
                chunk = src.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            if direction == "request":
                with self._lock:
                    self._sent += chunk
            if direction == "request" and self._request is not None:
                if self._request in tail + chunk:
                    self._request = None
                    self._cut(src, dst)
                    return
            elif direction == "reply" and self._reply is not None and left is None:
                marker, after = self._reply
                found = (tail + chunk).find(marker)
                if found >= 0:
                    self._reply = None
                    left = max(0, found - len(tail)) + len(marker) + after
            if left is not None and len(chunk) >= left:
                with contextlib.suppress(OSError):
                    dst.sendall(chunk[:left])
                self._cut(src, dst)
                return
            if left is not None:
                left -= len(chunk)
            with contextlib.suppress(OSError):
                dst.sendall(chunk)
            tail = (tail + chunk)[-64:]

    def stop(self) -> None:
        """Close the listener and every connection; join the threads."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(
                socket.SHUT_RDWR
            )  # wakes accept(); close() does not
        self._listener.close()
        with self._lock:
            socks = list(self._sockets)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)
