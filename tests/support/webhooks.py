"""A webhook receiver on loopback (HTTPS or plain HTTP) that checks every signature itself."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.env import HOST

HANG = "hang"  # an answer: hold the request without answering until released
REDIRECT = "redirect"  # an answer: 302 to /elsewhere


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Check a delivery the way the README tells receivers to (Standard Webhooks)."""
    if secret.startswith("whsec_"):
        key = base64.b64decode(secret.removeprefix("whsec_"))
    else:
        key = secret.encode()
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(value.removeprefix("v1,"), expected)
        for value in headers["webhook-signature"].split()
        if value.startswith("v1,")
    )


@dataclass
class Received:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    answer: Any

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Answers each POST with the next planned answer (a status, ``HANG``, ``REDIRECT``),
    then with ``default``; records every request and whether its signature verifies."""

    def __init__(self, secret: str, tls: ssl.SSLContext | None = None) -> None:
        self.secret = secret
        self.plan: list[Any] = []
        self.default: Any = 200
        self.received: list[Received] = []
        self.release = threading.Event()
        self.hanging = threading.Event()  # set while a request is held
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                receiver.handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self._server.server_address[1]}/hooks/mail"

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def delivered(self) -> list[Received]:
        """The requests answered 2xx."""
        with self._lock:
            return [r for r in self.received if r.answer == 200]

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("content-length", 0)))
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            answer = self.plan.pop(0) if self.plan else self.default
            try:
                verified = verify(self.secret, headers, body)
            except (KeyError, ValueError):
                verified = False
            self.received.append(
                Received(request.path, headers, body, verified, answer)
            )
        if answer == HANG:
            self.hanging.set()
            self.release.wait(timeout=30)
            answer = 200
        with contextlib.suppress(OSError):  # a client that gave up has gone
            if answer == REDIRECT:
                request.send_response(302)
                request.send_header("location", "/elsewhere")
            else:
                request.send_response(int(answer))
            request.send_header("content-length", "2")
            request.end_headers()
            request.wfile.write(b"ok")
