"""The SMTP/LMTP receiver for Mail Forwarding: 250 only once the outcome is recorded.

The company's mail server forwards the reply (and bounce) addresses here. RCPT takes only
the configured addresses and their tags (``actions+task42@…`` for ``actions@…``). The
size cap is advertised (``SIZE``) and enforced while DATA is read: past it, the rest is
discarded, not kept, and the answer is 552. A message whose outcome cannot be recorded
is answered 451, so the sending server tries again and nothing is lost.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from settings import InboundSource
from worker.inbound.classify import classify
from worker.inbound.model import InboundUnavailableError, Received, Sink

__all__ = ["SmtpReceiver"]

log = structlog.get_logger("mailworker.inbound.smtp")

_HANDLER_THREADS = 8  # records are Redis round trips: a few threads keep DATA moving
_READ_ON_LOOP = 256 * 1024  # bytes: larger messages are read on a handler thread


def _box(address: str) -> tuple[str, str]:
    """(local part without its tag, domain), both lowercased."""
    local, _, domain = address.strip().strip("<>").rpartition("@")
    return local.partition("+")[0].lower(), domain.lower()


def _line(text: str) -> str:
    """``text`` safe for one SMTP reply line."""
    return " ".join(text.split())[:400]


class _Handler:
    """aiosmtpd's hooks: who may be a recipient, and what DATA answers."""

    def __init__(self, config: InboundSource, sink: Sink, pool: ThreadPoolExecutor):
        self._name = config.name
        self._accept = {_box(a) for a in config.accept}
        self._sink = sink
        self._pool = pool

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if _box(address) not in self._accept:
            return f"550 5.1.1 <{_line(address)}>: no such recipient here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        received = Received(
            raw=bytes(content),
            source=self._name,
            mail_from=envelope.mail_from or "",
            rcpt_to=tuple(envelope.rcpt_tos),
        )
        loop = asyncio.get_running_loop()
        try:
            # Reading a message is CPU work: done on a handler thread it holds the GIL
            # while the loop waits for it to answer the other sessions (the switch
            # interval, 5 ms, each time). Small messages are read here instead, and
            # only the Redis round trips go to the threads.
            found = classify(received.raw) if len(content) <= _READ_ON_LOOP else None
            handled = await loop.run_in_executor(
                self._pool, self._sink.handle, received, found
            )
        except InboundUnavailableError as exc:
            log.warning("inbound_not_recorded", source=self._name, error=str(exc))
            reply = "451 4.3.0 cannot record the message now, try again later"
        except Exception as exc:  # a bug must not turn into a permanent refusal
            log.error(
                "inbound_failed_unexpectedly",
                source=self._name,
                error_type=type(exc).__name__,
                exc_info=True,
            )
            reply = "451 4.3.0 cannot handle the message now, try again later"
        else:
            if handled.failed:
                reply = f"554 5.6.0 not accepted: {_line(handled.reason)}"
            else:
                reply = f"250 2.0.0 {handled.kind} {handled.outcome}"
        if isinstance(server, LMTP):
            # RFC 2033: one reply per accepted recipient, in RCPT order.
            return "\r\n".join(reply for _ in envelope.rcpt_tos)
        return reply


class _Controller(Controller):
    """A controller that speaks LMTP when asked to."""

    def __init__(self, handler: _Handler, *, lmtp: bool, **kwargs: Any) -> None:
        self._lmtp = lmtp
        super().__init__(handler, **kwargs)

    def factory(self) -> SMTP:
        if self._lmtp:
            return LMTP(self.handler, **self.SMTP_kwargs)
        return SMTP(self.handler, **self.SMTP_kwargs)


class SmtpReceiver:
    """One ``[[inbound]]`` source of ``kind = "smtp"``.

    Args:
        config: the source's settings.
        sink: where each message is handed (the handler).
    """

    def __init__(self, config: InboundSource, *, sink: Sink) -> None:
        self.name = config.name
        self._config = config
        self._pool = ThreadPoolExecutor(
            _HANDLER_THREADS, thread_name_prefix=f"inbound-{config.name}"
        )
        self._controller = _Controller(
            _Handler(config, sink, self._pool),
            lmtp=config.protocol == "lmtp",
            hostname=config.listen_host,
            port=config.listen_port,
            data_size_limit=config.max_message_bytes,
            ready_timeout=10,
            tls_context=self._tls(),
            require_starttls=False,
            enable_SMTPUTF8=True,
        )

    def _tls(self) -> ssl.SSLContext | None:
        config = self._config
        if config.tls_certificate_file is None or config.tls_key_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.tls_certificate_file, config.tls_key_file)
        return context

    def __repr__(self) -> str:
        return f"SmtpReceiver({self.name!r}, {self._config.listen})"

    def start(self) -> None:
        """Listen; returns once the receiver answers."""
        self._controller.start()
        log.info(
            "inbound_listening",
            source=self.name,
            listen=self._config.listen,
            protocol=self._config.protocol,
            starttls=self._config.tls_certificate_file is not None,
        )

    def stop(self) -> None:
        """Stop listening and wait for the messages being recorded."""
        self._controller.stop()
        self._pool.shutdown(wait=True)

    def run(self, stop: threading.Event) -> None:
        """Receive until ``stop`` is set."""
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()
