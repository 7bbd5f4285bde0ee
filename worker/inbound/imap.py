"""The IMAP source: poll one folder, hand each message to the sink, then move it out.

Everything in ``folder`` is pending, because handled mail is moved to ``processed_folder``
or ``failed_folder``. The sink records each outcome (keyed by Message-ID) before the move,
so a message fetched again after a crash between the two is a duplicate and is only moved.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis
import structlog

from settings import ConfigError, InboundSource, MailworkerError, read_secret
from worker.inbound.imap_client import ImapClient, ImapError, ImapRefusedError
from worker.inbound.model import InboundUnavailableError, Received, Sink
from worker.transports.smtp import OUTLOOK_SCOPE

if TYPE_CHECKING:  # msal loads only where OpenAuth is configured
    from worker.transports.oauth import TokenProvider

__all__ = ["MAX_PER_POLL", "ImapSource", "state_key"]

log = structlog.get_logger("mailworker.inbound")

# At most this many messages a poll, so a huge folder never keeps ``stop`` waiting long.
MAX_PER_POLL = 100


def state_key(namespace: str, source: str) -> str:
    """The hash that remembers a source's folder and its UIDVALIDITY."""
    return f"{namespace}:inbound:{source}:imap"


class ImapSource:
    """One ``[[inbound]]`` source of ``kind = "imap"``.

    Args:
        config: the source's settings.
        sink: where messages are handed (``worker.inbound.handler.Inbound``).
        client: Redis, for the source's state.
        namespace: the key prefix.
        tokens: the integrated service account, for ``auth = "xoauth2"``.
        max_per_poll: the most messages one poll handles.
        backoff: the first wait after a failure; it doubles up to ``max_backoff``.
        max_backoff: the longest wait between attempts, in seconds.

    Raises:
        ConfigError: not an IMAP source, no token provider for xoauth2, or the
            password file cannot be read.
    """

    def __init__(
        self,
        config: InboundSource,
        *,
        sink: Sink,
        client: redis.Redis,
        namespace: str,
        tokens: TokenProvider | None = None,
        max_per_poll: int = MAX_PER_POLL,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
    ) -> None:
        field = f"inbound[{config.name}]"
        if config.kind != "imap":
            raise ConfigError(f"{field}.kind", f"{config.kind!r} is not an IMAP source")
        if config.auth == "xoauth2" and tokens is None:
            raise ConfigError(
                f"{field}.integrated_service", "xoauth2 needs a token provider"
            )
        self.name = config.name
        self.config = config
        self._sink = sink
        self._redis = client
        self._key = state_key(namespace, config.name)
        self._tokens = tokens
        self._max_per_poll = max_per_poll
        self._backoff = (backoff, max_backoff)
        self._session: ImapClient | None = None
        self._uidvalidity: int | None = None  # the last one saved in Redis
        self._selected = False  # the folder is selected, to be left after the poll
        self._password = self._password_reader()
        self._password()  # a missing or empty password file fails now, not at the first poll

    def __repr__(self) -> str:
        return f"ImapSource({self.name!r}, {self.config.server}:{self.config.effective_port})"

    def _password_reader(self) -> Callable[[], str | None]:
        config = self.config
        suffix = "_file" if config.password_file else ""

        def current() -> str | None:
            # Read each time a session opens: the file may have been rotated.
            secret = read_secret(
                config.password,
                config.password_file,
                f"inbound[{self.name}].password{suffix}",
            )
            return secret.get_secret_value() if secret is not None else None

        return current

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; errors are logged and retried with backoff."""
        first, cap = self._backoff
        wait = first
        try:
            while not stop.is_set():
                try:
                    count = self.poll_once(stop)
                except (
                    Exception
                ) as exc:  # never crash the inbound process: log, back off
                    self._failed(exc, wait)
                    stop.wait(wait)
                    wait = min(wait * 2, cap)
                    continue
                wait = first
                if count < self._max_per_poll:  # a full batch: more are waiting
                    stop.wait(self.config.poll_interval)
        finally:
            self.close()

    def _failed(self, exc: Exception, wait: float) -> None:
        fields = {
            "source": self.name,
            "error_type": type(exc).__name__,
            "retry_in": wait,
        }
        if isinstance(exc, MailworkerError):  # its message names what, never a secret
            log.warning("inbound_source_failed", error=str(exc), **fields)
        else:  # a bug: the traceback (rendered without locals) says where
            log.exception("inbound_source_failed", **fields)

    def poll_once(self, stop: threading.Event | None = None) -> int:
        """Connect when needed, then handle up to ``max_per_poll`` pending messages.

        Returns:
            How many messages were handled and moved out of the folder.

        Raises:
            ImapError: the server could not be reached, secured, logged in to or used.
            InboundUnavailableError: the sink could not record an outcome; that message
                and those after it stay in the folder for the next poll.
        """
        reused = self._session is not None
        try:
            session, uids = self._pending()
        except ImapError as exc:
            if not reused or isinstance(exc, ImapRefusedError):
                raise
            # A kept session the server dropped while we waited (idle timeout): once more.
            log.info("inbound_source_reconnecting", source=self.name, error=str(exc))
            session, uids = self._pending()
        count = 0
        try:
            for uid in uids:
                if stop is not None and stop.is_set():
                    break
                count += self._handle(session, uid)
            if self._selected:
                session.unselect()
                self._selected = False
        except ImapError as exc:
            self._drop(exc)
            raise
        return count

    def _pending(self) -> tuple[ImapClient, list[int]]:
        """The session with ``folder`` selected afresh, and the UIDs waiting in it.

        Each poll looks at the folder anew: a session that kept it selected may not
        see it deleted and made again, and a new UIDVALIDITY shows only there. Where
        the server has UNSELECT, the folder is left after each poll and an idle poll
        is one STATUS; SELECT and SEARCH follow only when the folder holds mail.
        Elsewhere each poll is SELECT and SEARCH.
        """
        session = self._connected()
        folder = self.config.folder
        try:
            if self._selected:  # left selected by a poll the sink cut short
                session.unselect()
                self._selected = False
            if "UNSELECT" in session.capabilities:
                messages, uidvalidity = session.status(folder)
                if messages == 0:
                    self._remember(uidvalidity)
                    return session, []
            uidvalidity = session.select(folder)
            self._selected = "UNSELECT" in session.capabilities
            uids = session.pending(self._max_per_poll)
        except ImapError as exc:
            self._drop(exc)
            raise
        self._remember(uidvalidity)
        return session, uids

    def _connected(self) -> ImapClient:
        """The open session, else a new one, logged in, with its folders made."""
        if self._session is not None:
            return self._session
        config = self.config
        token = self._token if config.auth == "xoauth2" else None
        password = self._password() if config.auth == "password" else None
        session = ImapClient(config, password=password, token=token)
        try:
            session.open()
            for folder in (config.processed_folder, config.failed_folder):
                session.ensure_folder(folder)
        except ImapError as exc:
            session.close(polite=isinstance(exc, ImapRefusedError))
            if exc.auth and self._tokens is not None:
                self._tokens.invalidate()  # the next session asks for a new token
            raise
        self._session = session
        log.info(
            "inbound_source_connected",
            source=self.name,
            server=f"{config.server}:{config.effective_port}",
            tls=session.tls,
            folder=config.folder,
            move="MOVE" in session.capabilities,
        )
        return session

    def _token(self) -> str:
        assert self._tokens is not None
        return self._tokens.acquire([OUTLOOK_SCOPE], service=self.name).access_token

    def _remember(self, uidvalidity: int) -> None:
        """Keep the folder's UIDVALIDITY; say so when it changed (the folder was re-made).

        Nothing depends on old UIDs (the whole folder is pending), so a Redis error here
        is only logged.
        """
        if uidvalidity == self._uidvalidity:
            return
        folder = self.config.folder
        try:
            before = self._redis.hmget(self._key, ["folder", "uidvalidity"])
            self._redis.hset(
                self._key, mapping={"folder": folder, "uidvalidity": uidvalidity}
            )
        except redis.RedisError as exc:
            log.warning(
                "inbound_state_unsaved", source=self.name, error_type=type(exc).__name__
            )
            return
        self._uidvalidity = uidvalidity
        old_folder, old = (v.decode() if isinstance(v, bytes) else v for v in before)
        if old is not None and old_folder == folder and int(old) != uidvalidity:
            log.warning(
                "inbound_uidvalidity_changed",
                source=self.name,
                folder=folder,
                old=int(old),
                new=uidvalidity,
            )

    def _handle(self, session: ImapClient, uid: int) -> int:
        """Fetch, hand to the sink, move. Returns 1 when the message left the folder."""
        raw = session.fetch(uid)
        if raw is None:
            return 0  # expunged by someone else meanwhile
        try:
            handled = self._sink.handle(Received(raw=raw, source=self.name))
        except InboundUnavailableError:
            raise  # it stays; so do the rest, until the next poll
        except Exception as exc:  # a broken message must not stop the ones after it
            log.exception(
                "inbound_message_failed",
                source=self.name,
                uid=uid,
                error_type=type(exc).__name__,
            )
            return 0
        folder = (
            self.config.failed_folder
            if handled.failed
            else self.config.processed_folder
        )
        try:
            session.move(uid, folder)
        except ImapRefusedError as exc:
            log.error(
                "inbound_message_not_moved",
                source=self.name,
                uid=uid,
                folder=folder,
                error=str(exc),
            )
            return 0
        log.info(
            "inbound_message_moved",
            source=self.name,
            uid=uid,
            folder=folder,
            message_id=handled.message_id,
            kind=handled.kind,
            outcome=handled.outcome,
            duplicate=handled.duplicate,
        )
        return 1

    def _drop(self, exc: ImapError) -> None:
        session, self._session = self._session, None
        self._selected = False
        if session is not None:
            session.close(polite=isinstance(exc, ImapRefusedError))

    def close(self) -> None:
        """Log out of the open session, if any. It never raises."""
        session, self._session = self._session, None
        if session is not None:
            session.close()
