"""One SMTP session over smtplib.

It connects, uses TLS by the security rule, does AUTH, and sends pipelined (RFC 2920).
Every library error is mapped here, in ``map_errors``.
"""

from __future__ import annotations

import base64
import io
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from common.sockets import kernel_timeouts
from settings import SmtpConnection
from worker.errors import (
    DeliveryError,
    MessageRefusedError,
    TransientDeliveryError,
    TransportUnavailableError,
)
from worker.metrics.recorder import recorder
from worker.mime import Mime
from worker.transports.base import Receipt, SendResult

__all__ = [
    "QUOTA_HOLD",
    "Content",
    "Envelope",
    "SmtpClient",
    "StepReporter",
    "TlsTrust",
    "map_errors",
    "tls_context",
]

StepReporter = Callable[[str, str], None]  # (step, detail) after each step succeeded
Content = bytes | Mime  # a message as one bytes object or rendered in pieces
Envelope = tuple[str, tuple[str, ...], Content]  # sender, recipients, message
_CRLF = b"\r\n"
_WRITE = 64 * 1024  # a message goes out in writes of at least this size
# The step named when the reply to a message's final dot is lost: the server read the
# whole message and may have taken it (RFC 5321 6.1).
_FINAL_REPLY = "the reply to the final dot (the message may have been delivered)"
_LOCAL_HOSTNAME = socket.gethostname() or "localhost"
# Exchange's daily quota (5.2.0) or a full mailbox (5.2.2): the service, not the message
_QUOTA = ("5.2.0", "5.2.2")
# Exchange's daily quota is a sliding 24 h: its reply holds the circuit breaker open
# this long, and a probe every hour finds out when it has cleared.
QUOTA_HOLD = 3600.0


class TlsTrust(Protocol):
    """The two keys of a section that decide which certificates are trusted."""

    @property
    def ca_bundle(self) -> Path | None: ...

    @property
    def verify_certificates(self) -> bool: ...


def tls_context(conn: TlsTrust) -> ssl.SSLContext:
    """Certificates verified unless the connection opts out. ``ca_bundle`` adds trust.

    Args:
        conn: an ``[[smtp]]`` connection or an IMAP ``[[inbound]]`` source.
    """
    context = ssl.create_default_context()
    if conn.ca_bundle is not None:
        context.load_verify_locations(cafile=str(conn.ca_bundle))
    if not conn.verify_certificates:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _reply(code: int, text: bytes | str) -> str:
    message = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return f"{code} {' '.join(message.split())}"[:300]


def _quota_hold(code: int, detail: str) -> float | None:
    """How long Exchange's daily-quota reply (554 5.2.0) keeps the service closed."""
    if code == 554 and ("5.2.0" in detail or "Quota" in detail):
        return QUOTA_HOLD
    return None


def _unavailable(
    detail: str, *, service: str, code: int, auth: bool = False
) -> TransportUnavailableError:
    """The service cannot be used now, held closed when the reply was a quota."""
    return TransportUnavailableError(
        detail, service=service, code=code, auth=auth, hold=_quota_hold(code, detail)
    )


def _classify(code: int, text: str, service: str, what: str) -> DeliveryError:
    """docs/design.md §5 for a whole-message SMTP reply."""
    detail = f"{what}: {text}"
    if 400 <= code < 500:
        return TransientDeliveryError(detail, service=service, code=code)
    if code == 530 or any(mark in text for mark in _QUOTA):
        # 530 is TLS or AUTH required (our configuration). 5.2.0 is the service's quota.
        return _unavailable(detail, service=service, code=code)
    return MessageRefusedError(detail, service=service, code=code)


def _tls_hint(conn: SmtpConnection, exc: ssl.SSLError) -> str:
    """The likely mistake behind a TLS error, when there is one to name."""
    if exc.reason == "WRONG_VERSION_NUMBER" and conn.effective_security == "tls":
        # The server answered the TLS handshake in plain text: an SMTP greeting.
        return (
            "; the server answered in plain text, so this port likely expects "
            'STARTTLS: try security = "starttls" (port 587 is usually STARTTLS, '
            "465 implicit TLS)"
        )
    return ""


@contextmanager
def map_errors(conn: SmtpConnection, step: str) -> Iterator[None]:
    """Turn smtplib, ssl and socket errors into docs/design.md §5's classes.

    Each message names host, port and step, never a credential.
    """
    where = f"{conn.server}:{conn.effective_port}"
    name = conn.name
    try:
        yield
    except DeliveryError:
        raise
    except smtplib.SMTPAuthenticationError as exc:
        raise _unavailable(
            f"authentication failed at {where}: {_reply(exc.smtp_code, exc.smtp_error)}",
            service=name,
            code=exc.smtp_code,
            auth=True,
        ) from exc
    except ssl.SSLCertVerificationError as exc:
        raise TransportUnavailableError(
            f"TLS failed at {where}: certificate not trusted ({exc.verify_message})",
            service=name,
        ) from exc
    except ssl.SSLError as exc:
        raise TransportUnavailableError(
            f"TLS failed at {where}: {exc.reason or exc.__class__.__name__}"
            f"{_tls_hint(conn, exc)}",
            service=name,
        ) from exc
    except smtplib.SMTPServerDisconnected as exc:
        # smtplib turns a read that timed out into "...: timed out", and a write that did
        # into "Server not connected" (with the socket error as the context).
        timed_out = str(exc).endswith("timed out") or isinstance(
            exc.__context__, TimeoutError | BlockingIOError
        )
        what = "timed out" if timed_out else "closed the connection"
        raise TransientDeliveryError(
            f"{where} {what} during {step}", service=name
        ) from exc
    except smtplib.SMTPResponseException as exc:
        code = exc.smtp_code
        error: DeliveryError = _classify(
            code, _reply(code, exc.smtp_error), name, f"{step} at {where}"
        )
        if step in ("connect", "ehlo", "auth") and not isinstance(
            error, TransientDeliveryError
        ):
            error = _unavailable(str(error), service=name, code=code)
        raise error from exc
    except TimeoutError as exc:
        raise TransientDeliveryError(
            f"{where} timed out during {step}", service=name
        ) from exc
    except (ConnectionError, OSError) as exc:
        reason = exc.strerror or exc.__class__.__name__
        if step == "connect":
            raise TransportUnavailableError(
                f"cannot connect to {where}: {reason}", service=name
            ) from exc
        raise TransientDeliveryError(
            f"{where} failed during {step}: {reason}", service=name
        ) from exc
    except smtplib.SMTPException as exc:
        raise TransportUnavailableError(
            f"{step} at {where}: {exc}", service=name
        ) from exc


def _timed(service: str, report: StepReporter | None) -> StepReporter:
    """``report``, which also times each step of opening a session since the one before.

    The steps are ``connect`` (to the greeting), ``tls`` and ``auth`` (each with the
    EHLO before it). A step that was not taken ("none") is not timed.
    """
    last = time.perf_counter()

    def note(step: str, detail: str) -> None:
        nonlocal last
        now = time.perf_counter()
        if not detail.startswith("none"):
            recorder().smtp_stage(service, step, now - last)
            last = now
        if report is not None:
            report(step, detail)

    return note


def _stuffed(chunk: bytes, last: bytes) -> bytes:
    """Dot-stuffing (RFC 5321 4.5.2) of one chunk of a message.

    ``last`` holds the last two bytes written before it, since a line may start in this
    chunk or at its first byte.
    """
    if b"\r\n." in chunk:
        chunk = chunk.replace(b"\r\n.", b"\r\n..")
    if chunk[:1] == b"." and last == _CRLF:
        return b"." + chunk
    if chunk[:2] == b"\n." and last[-1:] == b"\r":
        return b"\n." + chunk[1:]
    return chunk


def _size(data: Content) -> int:
    return len(data) if isinstance(data, bytes) else data.size


def _write_content(smtp: smtplib.SMTP, data: Content, after: bytes = b"") -> None:
    """Write a message dot-stuffed, its final dot, then ``after`` (the next commands).

    Chunks are gathered into writes of at least ``_WRITE`` bytes, so a small message,
    its dot and what follows go in one write. Two small writes in a row meet Nagle's
    algorithm and the peer's delayed ACK, a stall of up to 40 ms. A large message goes
    out as its attachments are encoded, never whole.
    """
    out: list[bytes] = []
    held = 0
    last = _CRLF  # the message starts a line
    for chunk in (data,) if isinstance(data, bytes) else data.chunks():
        if not chunk:
            continue
        chunk = _stuffed(chunk, last)
        last = chunk[-2:] if len(chunk) > 1 else last[-1:] + chunk
        out.append(chunk)
        held += len(chunk)
        if held >= _WRITE:
            smtp.send(out[0] if len(out) == 1 else b"".join(out))
            out, held = [], 0
    out.append(b".\r\n" if last == _CRLF else b"\r\n.\r\n")
    out.append(after)
    smtp.send(b"".join(out))


def _commands(
    sender: str, recipients: tuple[str, ...], size: int | None, *, reset: bool = False
) -> list[str]:
    """[RSET,] MAIL FROM (with SIZE unless ``size`` is None), RCPT TO each, DATA."""
    mail = f"MAIL FROM:<{sender}>{'' if size is None else f' SIZE={size}'}\r\n"
    return [
        *(("RSET\r\n",) if reset else ()),
        mail,
        *(f"RCPT TO:<{r}>\r\n" for r in recipients),
        "DATA\r\n",
    ]


def _receipt(recipients: tuple[str, ...], replies: list[tuple[int, bytes]]) -> Receipt:
    """Per-recipient outcomes from the RCPT replies (``replies[1:]``)."""
    receipt = Receipt()
    for rcpt, (code, text) in zip(
        recipients, replies[1 : 1 + len(recipients)], strict=False
    ):
        if code in (250, 251):
            receipt.accepted.append(rcpt)
        elif 400 <= code < 500:
            receipt.deferred[rcpt] = (code, _reply(code, text))
        else:
            receipt.refused[rcpt] = (code, _reply(code, text))
    return receipt


class _KernelTimeoutReader(socket.SocketIO):
    """smtplib's reply reader for a socket whose receive timeout the kernel keeps.

    Such sockets come from ``common.sockets``. A read that ends in ``EAGAIN`` timed out.
    ``SocketIO`` would report it as "no data yet", which smtplib takes for a closed
    connection.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, "rb")

    def readinto(self, b: Any) -> int:
        count = super().readinto(b)
        if count is None:
            raise TimeoutError("timed out")
        return count


class _ImplicitTls(smtplib.SMTP_SSL):
    """SMTP_SSL that reports the TCP connection before the TLS handshake."""

    def __init__(self, *, on_connected: Callable[[], None], **kwargs: Any) -> None:
        self._on_connected = on_connected
        super().__init__(**kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        self._on_connected()
        return self.context.wrap_socket(sock, server_hostname=self._host)  # type: ignore[attr-defined]


class SmtpClient:
    """A connected, secured and authenticated SMTP session for one connection."""

    def __init__(
        self,
        conn: SmtpConnection,
        password: str | None,
        *,
        oauth_token: Callable[[], str] | None = None,
    ) -> None:
        self.conn = conn
        self._password = password
        self._oauth_token = oauth_token
        self._smtp: smtplib.SMTP | None = None
        self.pipelining = False
        self.broken = False  # set when the session can no longer be trusted for reuse
        self.on_close: Callable[[], None] | None = None  # e.g. release a lease

    def __repr__(self) -> str:
        return f"SmtpClient({self.conn.name!r}, {self.conn.server}:{self.conn.effective_port})"

    def open(self, report: StepReporter | None = None) -> None:
        """Connect, EHLO, TLS per the security rule, AUTH.

        Raises:
            TransportUnavailableError: connect, TLS or AUTH failed.
            TransientDeliveryError: a timeout or a 4xx greeting.
        """
        conn, note = self.conn, _timed(self.conn.name, report)
        security = conn.effective_security
        with map_errors(conn, "connect"):
            if security == "tls":
                where = f"TCP connected to {conn.server}:{conn.effective_port}"
                smtp: smtplib.SMTP = _ImplicitTls(
                    on_connected=lambda: note("connect", where),
                    local_hostname=_LOCAL_HOSTNAME,
                    timeout=conn.timeout,
                    context=tls_context(conn),
                )
            else:
                smtp = smtplib.SMTP(
                    local_hostname=_LOCAL_HOSTNAME, timeout=conn.timeout
                )
            self._smtp = smtp
            smtp._host = conn.server  # type: ignore[attr-defined]  # TLS server_hostname
            code, banner = smtp.connect(conn.server, conn.effective_port)
            # We always write whole commands or whole messages: never wait to coalesce.
            if smtp.sock is not None:
                smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if security == "none" and kernel_timeouts(smtp.sock, conn.timeout):
                    smtp.file = io.BufferedReader(_KernelTimeoutReader(smtp.sock))
        if security == "tls":
            note("tls", f"implicit TLS, {self._tls_detail()}; {_reply(code, banner)}")
        else:
            note("connect", _reply(code, banner))
        with map_errors(conn, "ehlo"):
            smtp.ehlo()
        if security == "starttls":
            self._starttls(smtp, note)
        elif security == "none":
            note("tls", "none (security = none)")
        if conn.effective_auth == "password":
            self._login(smtp, note)
        elif conn.effective_auth == "xoauth2":
            self._xoauth2(smtp, note)
        else:
            note("auth", "none")
        self.pipelining = smtp.has_extn("pipelining")

    def _tls_detail(self) -> str:
        sock = self._smtp.sock if self._smtp else None
        version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
        verified = (
            "verified" if self.conn.verify_certificates else "NOT verified (opt-out)"
        )
        return f"{version or 'TLS'}, certificate {verified}"

    def _starttls(self, smtp: smtplib.SMTP, note: StepReporter) -> None:
        if not smtp.has_extn("starttls"):
            raise TransportUnavailableError(
                f"{self.conn.server}:{self.conn.effective_port} does not offer STARTTLS; "
                "nothing is sent in plaintext (security = starttls)",
                service=self.conn.name,
            )
        with map_errors(self.conn, "starttls"):
            smtp.starttls(context=tls_context(self.conn))
            smtp.ehlo()
        note("tls", f"STARTTLS, {self._tls_detail()}")

    def _login(self, smtp: smtplib.SMTP, note: StepReporter) -> None:
        if not smtp.has_extn("auth"):
            raise TransportUnavailableError(
                f"{self.conn.server}:{self.conn.effective_port} does not offer AUTH "
                "(it may require TLS first)",
                service=self.conn.name,
            )
        with map_errors(self.conn, "auth"):
            code, text = smtp.login(self.conn.username, self._password or "")
        note("auth", f"{_reply(code, text)} as {self.conn.username}")

    def _xoauth2(self, smtp: smtplib.SMTP, note: StepReporter) -> None:
        conn = self.conn
        if "xoauth2" not in smtp.esmtp_features.get("auth", "").lower().split():
            raise TransportUnavailableError(
                f"{conn.server}:{conn.effective_port} does not offer AUTH XOAUTH2",
                service=conn.name,
            )
        assert self._oauth_token is not None, "xoauth2 needs a token source"
        token = self._oauth_token()
        sasl = f"user={conn.username}\x01auth=Bearer {token}\x01\x01"
        with map_errors(conn, "auth"):
            code, text = smtp.docmd(
                "AUTH", "XOAUTH2 " + base64.b64encode(sasl.encode()).decode()
            )
            # An error challenge (JSON): an empty line gets the final reply.
            if code == 334:
                code, text = smtp.docmd("")
            if code != 235:
                raise smtplib.SMTPAuthenticationError(code, text)
        note("auth", f"{_reply(code, text)} XOAUTH2 as {conn.username}")

    def send(self, sender: str, recipients: tuple[str, ...], data: Content) -> Receipt:
        """One transaction: MAIL, RCPT for each recipient, DATA.

        It is pipelined when the server offers it.

        Returns:
            Per-recipient outcomes. When none was accepted, no message was sent.

        Raises:
            MessageRefusedError: the sender or the message was refused for good.
            TransportUnavailableError: a quota reply (5.2.0), with ``hold`` for 554 5.2.0.
            TransientDeliveryError: a 4xx reply, a timeout or a lost connection.
                ``in_doubt`` when it came after the whole message was written.
        """
        smtp = self._smtp
        assert smtp is not None, "open() first"
        began = time.perf_counter()
        with map_errors(self.conn, "send"):
            size = _size(data) if smtp.has_extn("size") else None
            commands = _commands(sender, recipients, size)
            if self.pipelining:
                smtp.send("".join(commands))
                replies = [smtp.getreply() for _ in commands]
            else:
                replies = self._lockstep(smtp, commands)
            receipt = self._finish(smtp, recipients, replies, data)
        recorder().smtp_stage(self.conn.name, "data", time.perf_counter() - began)
        return receipt

    @staticmethod
    def _lockstep(smtp: smtplib.SMTP, commands: list[str]) -> list[tuple[int, bytes]]:
        replies = []
        for command in commands:
            smtp.send(command)
            replies.append(smtp.getreply())
            if replies[0][0] != 250:
                break
        return replies

    def _finish(
        self,
        smtp: smtplib.SMTP,
        recipients: tuple[str, ...],
        replies: list[tuple[int, bytes]],
        data: Content,
    ) -> Receipt:
        name = self.conn.name
        mail_code = replies[0][0]
        data_code = replies[-1][0] if len(replies) == len(recipients) + 2 else 0
        receipt = _receipt(recipients, replies)
        if mail_code != 250 or not receipt.accepted or data_code != 354:
            if data_code == 354:
                # RFC 2920: DATA was accepted with nothing valid to send, so end it empty.
                smtp.send(".\r\n")
                smtp.getreply()
            self._quiet_rset(smtp)
            refusal = self._refusal(recipients, replies, receipt)
            if isinstance(refusal, DeliveryError):
                raise refusal
            return refusal  # nothing accepted: the per-recipient replies say why
        _write_content(smtp, data)
        code, text = self._final_reply(smtp)
        if code != 250:
            self._quiet_rset(smtp)
            raise _classify(
                code, _reply(code, text), name, "message refused after DATA"
            )
        receipt.response = _reply(code, text)
        return receipt

    def send_many(
        self, messages: Sequence[Envelope], *, stop: Callable[[], bool] | None = None
    ) -> list[SendResult]:
        """Many transactions in a row on this session, pipelined across messages.

        Each message's content goes in one write with the next transaction's MAIL, RCPT
        and DATA (RFC 2920 lets the content lead a command group). So a message costs one
        round trip instead of two.

        Returns:
            One entry per message: its Receipt, the DeliveryError of that message alone,
            or None for a message not sent because the session failed or ``stop`` (checked
            before each message) became true. A message whose content was sent when the
            session failed gets that error (it is in doubt).
        """
        smtp = self._smtp
        assert smtp is not None, "open() first"
        if not self.pipelining:
            return self._send_each(messages, stop)
        results: list[SendResult] = [None] * len(messages)
        tail: Content | None = None  # the content of the message in flight, unwritten
        flight: tuple[int, Receipt] | None = None  # that message and its receipt
        reset = False  # the last transaction failed: RSET before the next
        sized = smtp.has_extn("size")
        try:
            with map_errors(self.conn, "send"):
                for index, (sender, recipients, data) in enumerate(messages):
                    if stop is not None and stop():
                        break
                    size = _size(data) if sized else None
                    head = "".join(_commands(sender, recipients, size, reset=reset))
                    self._write(smtp, tail, head.encode(smtp.command_encoding))
                    tail = None
                    if flight is not None:
                        self._land(smtp, flight, results)
                        flight = None
                    if reset:
                        self._expect(smtp, 250, "RSET")
                    replies = [smtp.getreply() for _ in range(len(recipients) + 2)]
                    receipt = _receipt(recipients, replies)
                    mail, data_reply = replies[0], replies[-1]
                    if mail[0] == 250 and receipt.accepted and data_reply[0] == 354:
                        tail, flight, reset = data, (index, receipt), False
                        continue
                    reset = True
                    if data_reply[0] == 354:  # RFC 2920: end an empty DATA, then RSET
                        tail, flight = b"", (-1, receipt)
                    results[index] = self._refusal(recipients, replies, receipt)
                if flight is not None:  # the last content, alone
                    self._write(smtp, tail, b"")
                    self._land(smtp, flight, results)
                    flight = None
                if reset:
                    self._quiet_rset(smtp)
        except DeliveryError as exc:
            self.broken = True
            if flight is not None and flight[0] >= 0:
                # Its content went out, or part of it: the error says whether the whole
                # message was written (``in_doubt``).
                results[flight[0]] = exc
        return results

    @staticmethod
    def _write(smtp: smtplib.SMTP, content: Content | None, head: bytes) -> None:
        """The content in flight (if any) and its final dot, then the next commands."""
        if content is None:
            smtp.send(head)
        else:
            _write_content(smtp, content, head)

    def _send_each(
        self, messages: Sequence[Envelope], stop: Callable[[], bool] | None
    ) -> list[SendResult]:
        """``send_many`` without pipelining: one ``send`` after another."""
        return [
            None if stop and stop() else self._send_or_error(*message)
            for message in messages
        ]

    def _send_or_error(
        self, sender: str, recipients: tuple[str, ...], data: Content
    ) -> SendResult:
        if self.broken:
            return None
        try:
            return self.send(sender, recipients, data)
        except MessageRefusedError as exc:
            return exc
        except DeliveryError as exc:
            self.broken = True
            return exc

    def _land(
        self, smtp: smtplib.SMTP, flight: tuple[int, Receipt], results: list[SendResult]
    ) -> None:
        """Read the reply to the content in flight.

        The result is the message's receipt, or its own error. Index -1 is an empty DATA
        ended after every recipient was refused.
        """
        index, receipt = flight
        if index < 0:
            smtp.getreply()
            return
        code, text = self._final_reply(smtp)
        if code != 250:
            results[index] = _classify(
                code, _reply(code, text), self.conn.name, "message refused after DATA"
            )
            return
        receipt.response = _reply(code, text)
        results[index] = receipt

    def _final_reply(self, smtp: smtplib.SMTP) -> tuple[int, bytes]:
        """The reply to a message's final dot.

        A timeout or a lost connection now is the in-doubt case of RFC 5321 6.1. The
        error says so (``in_doubt``).
        """
        try:
            with map_errors(self.conn, _FINAL_REPLY):
                return smtp.getreply()
        except TransientDeliveryError as exc:
            exc.in_doubt = True
            raise

    def _expect(self, smtp: smtplib.SMTP, wanted: int, what: str) -> None:
        code, text = smtp.getreply()
        if code != wanted:
            raise TransientDeliveryError(
                f"{what} at {self.conn.server}:{self.conn.effective_port}: "
                f"{_reply(code, text)}",
                service=self.conn.name,
            )

    def _refusal(
        self,
        recipients: tuple[str, ...],
        replies: list[tuple[int, bytes]],
        receipt: Receipt,
    ) -> Receipt | DeliveryError:
        """What a pipelined transaction that did not reach its content means."""
        name = self.conn.name
        mail_code, mail_text = replies[0]
        if mail_code != 250:
            return _classify(
                mail_code, _reply(mail_code, mail_text), name, "MAIL FROM refused"
            )
        if receipt.accepted:
            code, text = replies[-1]
            return _classify(code, _reply(code, text), name, "DATA refused")
        return receipt  # nothing accepted: the per-recipient replies say why

    def _quiet_rset(self, smtp: smtplib.SMTP) -> None:
        try:
            smtp.rset()
        except (smtplib.SMTPException, OSError):
            self.broken = True

    def reset(self) -> None:
        """RSET, to check a pooled session is still alive before reuse."""
        assert self._smtp is not None
        with map_errors(self.conn, "rset"):
            self._smtp.rset()

    def close(self) -> None:
        """QUIT politely. It never raises."""
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()
