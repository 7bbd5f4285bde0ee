"""A stand-in for Microsoft Entra ID (token endpoint) and Microsoft Graph (sendMail).

One HTTPS server on 127.0.0.1 serves both, so the real ``msal`` and ``requests`` libraries
can talk to it: use ``fake.url`` as MSAL's authority host (``authority=f"{fake.url}/{tenant}"``,
``instance_discovery=False``) and as the Graph endpoint. Replies follow the shapes documented in
``/work/shared/research/msal-graph-smtp-facts.md`` sections 2-4.

Entra ID:
    GET  /{tenant}/v2.0/.well-known/openid-configuration
    POST /{tenant}/oauth2/v2.0/token          (client_credentials; secret or client assertion)
Graph:
    POST /v1.0/users/{mailbox}/sendMail       (JSON message or base64 MIME)
Graph, a mailbox (``fake.mailboxes``, ``tests/support/fake_mailbox.py``; every call needs
``Prefer: IdType="ImmutableId"`` and is logged in ``fake.mailboxes.log``):
    GET  /v1.0/users/{mailbox}/mailFolders[?$filter=displayName eq 'NAME']
    POST /v1.0/users/{mailbox}/mailFolders    {"displayName": NAME}: under msgFolderRoot
    GET  /v1.0/users/{mailbox}/mailFolders/{id or well-known name}
    GET  /v1.0/users/{mailbox}/mailFolders/{id}/messages/delta  ($top, $skiptoken, $deltatoken)
    GET  /v1.0/users/{mailbox}/messages/{id}/$value
    POST /v1.0/users/{mailbox}/messages/{id}/move  {"destinationId": id or well-known name}
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import datetime
import http.server
import json
import re
import secrets
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.support.env import HOST
from tests.support.fake_mailbox import FakeMailboxes, MailboxRequest, op_of

# Graph: "The maximum request length supported is 4MB"; a longer body gets 413.
GRAPH_MAX_REQUEST_BYTES = 4 * 1024 * 1024
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

# (status, headers, body): headers a mapping or (name, value) pairs; body a dict/list (sent
# as JSON), a str (sent as text/plain), bytes (sent as-is) or None (empty body).
ScriptedReply = tuple[int, Mapping[str, str] | Iterable[tuple[str, str]] | None, Any]


def _now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def entra_error(error: str, code: int, description: str) -> dict[str, Any]:
    """The JSON body Entra ID returns with a token or discovery error."""
    now, trace, correlation = _now_text(), str(uuid.uuid4()), str(uuid.uuid4())
    return {
        "error": error,
        "error_description": (
            f"AADSTS{code}: {description}\r\nTrace ID: {trace}\r\n"
            f"Correlation ID: {correlation}\r\nTimestamp: {now}"
        ),
        "error_codes": [code],
        "timestamp": now,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }


def graph_error(code: str, message: str) -> dict[str, Any]:
    """The JSON body Microsoft Graph returns with an error."""
    return {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": datetime.datetime.now(datetime.UTC).strftime(
                    "%Y-%m-%dT%H:%M:%S"
                ),
                "request-id": str(uuid.uuid4()),
                "client-request-id": str(uuid.uuid4()),
            },
        }
    }


class _ReplyError(Exception):
    """Raised inside a handler to send an error reply and stop processing."""

    def __init__(self, status: int, body: Any, headers: Any = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True  # server_close() joins the handler threads
    fake: FakeMicrosoft

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: a client that hangs up or fails the TLS handshake is not a test failure."""
        self.fake.errors.append(sys.exc_info()[1])


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as requests' sessions expect
    timeout = 30  # seconds a kept-alive connection may sit idle
    server: _Server

    # ------------------------------------------------------------ plumbing

    def setup(self) -> None:
        # The listening socket is wrapped with do_handshake_on_connect=False so one slow
        # client cannot stall accept(); the handshake happens here, in this request's thread.
        self.request.settimeout(self.timeout)
        self.request.do_handshake()
        self.server.fake._track(self.request, add=True)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.request, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: Any = None, headers: Any = None) -> None:
        if body is None:
            raw, content_type = b"", None
        elif isinstance(body, bytes):
            raw, content_type = body, "application/octet-stream"
        elif isinstance(body, str):
            raw, content_type = body.encode(), "text/plain; charset=utf-8"
        else:
            raw, content_type = (
                json.dumps(body).encode(),
                "application/json; charset=utf-8",
            )
        pairs = list(
            (headers.items() if isinstance(headers, Mapping) else headers) or ()
        )
        self.send_response(status)
        if content_type and not any(k.lower() == "content-type" for k, _ in pairs):
            self.send_header("Content-Type", content_type)
        for name, value in pairs:
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def _not_found(self) -> None:
        self._send(
            404,
            graph_error(
                "ResourceNotFound",
                f"Resource not found for the segment '{self.path.split('?')[0]}'.",
            ),
        )

    # ------------------------------------------------------------ routing

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        parts = path.strip("/").split("/")
        if len(parts) == 4 and parts[1:] == [
            "v2.0",
            ".well-known",
            "openid-configuration",
        ]:
            status, body = self.server.fake._discovery(parts[0])
            self._send(status, body)
        elif _is_mailbox_path(parts):
            self.server.fake._mailbox_request(self, "GET", parts)
        else:
            self._not_found()

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        parts = path.strip("/").split("/")
        fake = self.server.fake
        if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            body = self._read_body()
            try:
                status, reply, headers = fake._token(parts[0], body, self.headers)
            except _ReplyError as exc:
                status, reply, headers = exc.status, exc.body, exc.headers
            self._send(status, reply, headers)
        elif (
            len(parts) == 4
            and parts[0] == "v1.0"
            and parts[1].lower() == "users"
            and parts[3].lower() == "sendmail"
        ):
            fake._send_mail(self, urllib.parse.unquote(parts[2]))
        elif _is_mailbox_path(parts):
            fake._mailbox_request(self, "POST", parts)
        else:
            self._read_body()
            self._not_found()

    def _other(self) -> None:
        self._read_body()
        self._not_found()

    def do_PUT(self) -> None:
        self._other()

    def do_PATCH(self) -> None:
        self._other()

    def do_DELETE(self) -> None:
        self._other()


class FakeMicrosoft:
    """Entra ID token endpoint + Graph sendMail and mailboxes on one HTTPS loopback server.

    Use ``start()``/``stop()`` or ``with FakeMicrosoft(server_tls) as fake: ...``.
    """

    def __init__(
        self,
        server_tls: ssl.SSLContext,
        *,
        tenant: str = "contoso-tenant",
        client_id: str = "app-1234",
        client_secret: str = "fake-client-secret-123",  # noqa: S107 - a test value
    ) -> None:
        self.server_tls = server_tls
        self.tenant = tenant
        self.client_id = client_id
        self.client_secret = client_secret
        self.certificate_pem: bytes | None = None
        # token endpoint
        self.discovery_requests = 0
        self.token_requests: list[dict[str, str]] = []
        self.tokens_issued: list[str] = []
        # access token -> the scope (space-joined) it was issued for
        self.token_scopes: dict[str, str] = {}
        # verified client assertions: {"header": {...}, "claims": {...}}
        self.client_assertions: list[dict[str, Any]] = []
        self.expires_in = 3599
        # when set, token responses carry "refresh_in" (MSAL then sets refresh_on)
        self.refresh_in: int | None = None
        self.token_responses: collections.deque[ScriptedReply] = collections.deque()
        # graph
        self.sent: list[dict[str, Any]] = []
        self.requests_seen = 0
        self.graph_responses: collections.deque[ScriptedReply] = collections.deque()
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        # graph, mailboxes: folders, messages, delta, move, the request log
        self.mailboxes = FakeMailboxes()
        # internals
        self.errors: list[BaseException | None] = []  # swallowed handler exceptions
        self._lock = threading.Lock()
        # token -> time.time() when Graph stops accepting it (issue time + expires_in)
        self._token_expiry: dict[str, float] = {}
        self._revoked: set[str] = set()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeMicrosoft is not started")
        return f"https://{HOST}:{self._server.server_address[1]}"

    @property
    def authority(self) -> str:
        """MSAL's ``authority=`` for this tenant."""
        return f"{self.url}/{self.tenant}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/{self.tenant}/oauth2/v2.0/token"

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FakeMicrosoft is already started")
        server = _Server((HOST, 0), _Handler, bind_and_activate=True)
        server.fake = self
        server.socket = self.server_tls.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-microsoft",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        thread.join(timeout=5)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # wake handlers idling on kept-alive connections
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
        server.server_close()  # closes the listener and joins the handler threads
        self._server = self._thread = None

    def __enter__(self) -> FakeMicrosoft:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # ------------------------------------------------------------ controls

    def accept_certificate(self, cert_pem: bytes | str) -> None:
        """Accept client assertions signed by this certificate's key (PS256 + x5t#S256,
        or the legacy RS256 + x5t SHA-1 form)."""
        if isinstance(cert_pem, str):
            cert_pem = cert_pem.encode()
        x509.load_pem_x509_certificate(cert_pem)  # fail early on garbage
        self.certificate_pem = cert_pem

    def revoke_all_tokens(self) -> None:
        """Graph answers 401 to every token issued so far."""
        with self._lock:
            self._revoked.update(self.tokens_issued)

    def issue_token(self, scope: str = "https://graph.microsoft.com/.default") -> str:
        """Mint a valid token without a token request (for Graph-only tests)."""
        token = "fake-at-" + secrets.token_urlsafe(32)
        with self._lock:
            self.tokens_issued.append(token)
            self.token_scopes[token] = scope
            self._token_expiry[token] = time.time() + self.expires_in
        return token

    # ------------------------------------------------------------ Entra ID

    def _discovery(self, tenant: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.discovery_requests += 1
        if tenant != self.tenant:
            return 400, entra_error(
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct "
                "tenant ID and are signing into the correct cloud.",
            )
        base = f"{self.url}/{tenant}"
        return 200, {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_types_supported": ["code", "id_token", "code id_token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
        }

    def _token(self, tenant: str, raw: bytes, headers: Any) -> tuple[int, Any, Any]:
        form = dict(urllib.parse.parse_qsl(raw.decode("utf-8", "replace")))
        with self._lock:
            self.token_requests.append(form)
            scripted = self.token_responses.popleft() if self.token_responses else None
        if scripted is not None:
            status, reply_headers, reply = scripted
            if status == 200 and isinstance(reply, dict) and "access_token" in reply:
                self._remember(reply["access_token"], form.get("scope", ""), reply)
            return status, reply, reply_headers

        def fail(status: int, error: str, code: int, description: str) -> _ReplyError:
            return _ReplyError(status, entra_error(error, code, description))

        if tenant != self.tenant:
            raise fail(
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct "
                "tenant ID and are signing into the correct cloud.",
            )
        if not headers.get("Content-Type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            raise fail(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            )
        if form.get("grant_type") != "client_credentials":
            raise fail(
                400,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type "
                f"'{form.get('grant_type')}'.",
            )
        if form.get("client_id") != self.client_id:
            raise fail(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{form.get('client_id')}' was not found in "
                f"the directory '{tenant}'. This can happen if the application has not "
                "been installed by the administrator of the tenant or consented to by any "
                "user in the tenant.",
            )
        if "client_assertion" in form or "client_assertion_type" in form:
            self._check_assertion(form)
        elif form.get("client_secret") != self.client_secret:
            raise fail(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the "
                "request is the client secret value, not the client secret ID, for a "
                f"secret added to app '{self.client_id}'.",
            )
        scope = form.get("scope", "")
        scopes = scope.split()
        if not scopes or not all(s.endswith("/.default") for s in scopes):
            raise fail(
                400,
                "invalid_scope",
                70011,
                f"The provided value for scope {scope} is not valid. Client credential "
                "flows must have a scope value with /.default suffixed to the resource "
                "identifier (application ID URI).",
            )
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "ext_expires_in": self.expires_in,
            "access_token": "fake-at-" + secrets.token_urlsafe(32),
        }
        if self.refresh_in is not None:
            body["refresh_in"] = self.refresh_in
        self._remember(body["access_token"], scope, body)
        return 200, body, None

    def _remember(self, token: str, scope: str, body: Mapping[str, Any]) -> None:
        lifetime = float(body.get("expires_in", self.expires_in))
        with self._lock:
            self.tokens_issued.append(token)
            self.token_scopes[token] = scope
            self._token_expiry[token] = time.time() + lifetime

    def _check_assertion(self, form: dict[str, str]) -> None:
        def fail(code: int, description: str) -> _ReplyError:
            return _ReplyError(401, entra_error("invalid_client", code, description))

        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise _ReplyError(
                400,
                entra_error(
                    "invalid_request",
                    50027,
                    "client_assertion_type must be "
                    f"'{ASSERTION_TYPE}' when client_assertion is sent.",
                ),
            )
        assertion = form.get("client_assertion", "")
        if self.certificate_pem is None:
            raise fail(
                700027,
                "Client assertion failed signature validation. "
                "[Reason - The key was not found.]",
            )
        cert = x509.load_pem_x509_certificate(self.certificate_pem)
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            raise fail(50012, f"Client assertion is not a valid JWT. ({exc})") from None
        thumbprints = {
            "x5t#S256": cert.fingerprint(hashes.SHA256()),
            "x5t": cert.fingerprint(hashes.SHA1()),  # noqa: S303 - x5t is SHA-1 by definition
        }
        algorithm = {"x5t#S256": "PS256", "x5t": "RS256"}
        matched = [
            name
            for name in ("x5t#S256", "x5t")
            if name in header and _b64url(header[name]) == thumbprints[name]
        ]
        if not matched or header.get("alg") not in ("PS256", "RS256"):
            raise fail(
                700027,
                "Client assertion failed signature validation. "
                "[Reason - The key was not found.]",
            )
        expected_alg = algorithm[matched[0]]
        try:
            claims = jwt.decode(
                assertion,
                cert.public_key(),  # type: ignore[arg-type]
                algorithms=[expected_alg],
                audience=self.token_endpoint,
                issuer=self.client_id,
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.InvalidSignatureError:
            raise fail(
                700027, "Client assertion failed signature validation."
            ) from None
        except jwt.ExpiredSignatureError:
            raise fail(
                700024, "Client assertion is not within its valid time range."
            ) from None
        except jwt.PyJWTError as exc:
            raise fail(
                50012, f"Client assertion contains invalid claims. ({exc})"
            ) from None
        if claims.get("sub") != self.client_id:
            raise fail(
                50012,
                "Client assertion contains an invalid subject: sub must be the client_id.",
            )
        with self._lock:
            self.client_assertions.append({"header": header, "claims": claims})

    # ------------------------------------------------------------ Graph

    def _send_mail(self, handler: _Handler, mailbox: str) -> None:
        with self._lock:
            self.requests_seen += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            scripted = self.graph_responses.popleft() if self.graph_responses else None
        try:
            body = handler._read_body()
            if self.delay:
                time.sleep(self.delay)
            if scripted is not None:
                status, headers, reply = scripted
            else:
                try:
                    self._accept_mail(handler, mailbox, body)
                    status, headers, reply = 202, None, None
                except _ReplyError as exc:
                    status, headers, reply = exc.status, exc.headers, exc.body
        finally:
            with self._lock:
                self.in_flight -= 1
        handler._send(status, reply, headers)

    def _accept_mail(self, handler: _Handler, mailbox: str, body: bytes) -> None:
        if len(body) > GRAPH_MAX_REQUEST_BYTES:
            raise _ReplyError(
                413,
                graph_error(
                    "RequestEntityTooLarge",
                    "The maximum request length supported is 4MB.",
                ),
            )
        token = self._authenticate(handler.headers.get("Authorization", ""))
        content_type = handler.headers.get("Content-Type", "")
        media_type = content_type.split(";")[0].strip().lower()
        record: dict[str, Any] = {
            "mailbox": mailbox,
            "content_type": content_type,
            "json": None,
            "mime": None,
            "authorization_token": token,
        }
        if media_type == "application/json":
            try:
                payload = json.loads(body)
            except ValueError:
                raise _ReplyError(
                    400,
                    graph_error("BadRequest", "Unable to read JSON request payload."),
                ) from None
            if not isinstance(payload, dict) or not isinstance(
                payload.get("message"), dict
            ):
                raise _ReplyError(
                    400,
                    graph_error(
                        "ErrorInvalidParameter",
                        "The value of the parameter 'Message' is empty.",
                    ),
                )
            record["json"] = payload
        elif media_type == "text/plain":
            try:
                mime = base64.b64decode(b"".join(body.split()), validate=True)
            except (binascii.Error, ValueError):
                mime = b""
            if not mime:
                raise _ReplyError(
                    400,
                    graph_error(
                        "ErrorMimeContentInvalidBase64String",
                        "Invalid base64 string for MIME content.",
                    ),
                )
            record["mime"] = mime
        else:
            raise _ReplyError(
                415,
                graph_error(
                    "UnsupportedMediaType",
                    f"Content-Type '{content_type}' is not supported: send "
                    "application/json or text/plain (base64 MIME).",
                ),
            )
        with self._lock:
            self.sent.append(record)

    def _mailbox_request(
        self, handler: _Handler, method: str, parts: list[str]
    ) -> None:
        """A call to a user's mailbox: logged, counted in flight, injected faults first."""
        at = time.monotonic()
        split = urllib.parse.urlsplit(handler.path)
        query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        mailbox, route = urllib.parse.unquote(parts[2]), _route_of(parts[3:])
        op = op_of(method, route)
        immutable = FakeMailboxes.immutable(handler.headers.get("Prefer", ""))
        boxes = self.mailboxes
        boxes.begin(mailbox.lower())
        try:
            raw = handler._read_body()
            if boxes.delay:
                time.sleep(boxes.delay)
            status, headers, reply = self._mailbox_reply(
                handler, method, mailbox, route, query, raw, op, immutable
            )
        finally:
            boxes.end(mailbox.lower())
        boxes.record(
            MailboxRequest(
                mailbox, method, op, split.path, query, status, immutable, at
            )
        )
        handler._send(status, reply, headers)

    def _mailbox_reply(
        self,
        handler: _Handler,
        method: str,
        mailbox: str,
        route: list[str],
        query: dict[str, str],
        raw: bytes,
        op: str,
        immutable: bool,
    ) -> tuple[int, Any, Any]:
        injected = self.mailboxes.injected(op)
        if injected is not None:
            return injected
        try:
            self._authenticate(handler.headers.get("Authorization", ""))
        except _ReplyError as exc:
            return exc.status, exc.headers, exc.body
        if not immutable:
            return (
                400,
                None,
                graph_error(
                    "FakeImmutableIdRequired",
                    "The stand-in answers mailbox calls only with Prefer: "
                    'IdType="ImmutableId".',
                ),
            )
        body: Any = None
        if method == "POST":
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                return (
                    400,
                    None,
                    graph_error("BadRequest", "Unable to read JSON request payload."),
                )
        return self.mailboxes.answer(self.url, method, mailbox, route, query, body)

    def _authenticate(self, authorization: str) -> str:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        challenge = {
            "WWW-Authenticate": 'Bearer realm="", authorization_uri='
            '"https://login.microsoftonline.com/common/oauth2/authorize", '
            'client_id="00000003-0000-0000-c000-000000000000"'
        }

        def deny(message: str) -> _ReplyError:
            return _ReplyError(
                401, graph_error("InvalidAuthenticationToken", message), challenge
            )

        if scheme.lower() != "bearer" or not token:
            raise deny("Access token is empty.")
        with self._lock:
            known = token in self._token_expiry
            revoked = token in self._revoked
            expires = self._token_expiry.get(token, 0.0)
        if not known:
            raise deny("IDX14100: JWT is not well formed, there are no dots (.).")
        if revoked:
            raise deny("Access token has been revoked.")
        if time.time() >= expires:
            raise deny("Lifetime validation failed, the token is expired.")
        return token


def _is_mailbox_path(parts: list[str]) -> bool:
    """``/v1.0/users/{mailbox}/...`` other than sendMail."""
    return (
        len(parts) >= 4
        and parts[0] == "v1.0"
        and parts[1].lower() == "users"
        and parts[3].lower() != "sendmail"
    )


_KEY_SEGMENT = re.compile(r"^(\w+)\('([^']*)'\)$")


def _route_of(parts: list[str]) -> list[str]:
    """Path segments after the user, with Graph's ``mailFolders('ID')`` form split."""
    route: list[str] = []
    for part in parts:
        part = urllib.parse.unquote(part)
        match = _KEY_SEGMENT.match(part)
        route.extend(match.groups() if match else (part,))
    return route


def _b64url(value: Any) -> bytes | None:
    """Decode a base64url thumbprint; MSAL sends it with '=' padding, RFC 7515 without."""
    if not isinstance(value, str):
        return None
    try:
        stripped = value.rstrip("=")
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        return None
