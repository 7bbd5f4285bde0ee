"""One IMAP session over imaplib: connect, TLS by the security rule, log in, move mail.

Every library error is mapped here, in ``_map_errors``. The research behind each step is
``inbound-mail-facts.md`` §8: UIDs only, ``BODY.PEEK[]``, post-login capabilities, MOVE or
COPY + ``\\Deleted`` + ``UID EXPUNGE``.
"""

from __future__ import annotations

import imaplib
import re
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from settings import InboundSource, MailworkerError
from worker.inbound.imap_names import mailbox_argument
from worker.transports.smtp_client import tls_context

__all__ = ["ImapClient", "ImapError", "ImapRefusedError"]

_LITERAL_HEAD = re.compile(rb"\bBODY\[\]")
_STATUS_MESSAGES = re.compile(rb"\bMESSAGES (\d+)", re.IGNORECASE)
_STATUS_UIDVALIDITY = re.compile(rb"\bUIDVALIDITY (\d+)", re.IGNORECASE)
_UIDVALIDITY = re.compile(rb"\d+")


class ImapError(MailworkerError):
    """An IMAP source could not connect, secure, log in or talk: the session is gone.

    Its message names the source, host, port and step, never a credential.

    Attributes:
        source: the ``[[inbound]]`` source's name.
        auth: the server refused the credentials.
    """

    def __init__(self, message: str, *, source: str, auth: bool = False) -> None:
        super().__init__(message)
        self.source = source
        self.auth = auth


class ImapRefusedError(ImapError):
    """The server answered NO or BAD to one command: the session is still usable."""


def _text(value: object) -> str:
    """A server reply or imaplib message as one short line of text."""
    if isinstance(value, list | tuple):
        value = b" ".join(v if isinstance(v, bytes) else str(v).encode() for v in value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value)
    if text.startswith(("b'", 'b"')) and text[-1:] in "'\"":
        text = text[2:-1]  # imaplib puts the repr of the reply's bytes in its errors
    return " ".join(text.split())[:300]


def _tls_hint(config: InboundSource, exc: ssl.SSLError) -> str:
    if exc.reason == "WRONG_VERSION_NUMBER" and config.security == "tls":
        # The server answered the TLS handshake in plain text: an IMAP greeting.
        return (
            "; the server answered in plain text, so this port likely expects STARTTLS: "
            'try security = "starttls" (port 143 is usually STARTTLS, 993 implicit TLS)'
        )
    return ""


class ImapClient:
    """A connected, secured and logged-in IMAP session for one ``[[inbound]]`` source.

    Args:
        config: the source's settings (``kind = "imap"``).
        password: the password, for ``auth = "password"``.
        token: returns a bearer token, for ``auth = "xoauth2"``.
    """

    def __init__(
        self,
        config: InboundSource,
        *,
        password: str | None = None,
        token: Callable[[], str] | None = None,
    ) -> None:
        self.config = config
        self._password = password
        self._token = token
        self._imap: imaplib.IMAP4 | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.tls = "none"  # what secured the session, for the connected log line

    def __repr__(self) -> str:
        return f"ImapClient({self.config.name!r}, {self._where})"

    @property
    def _where(self) -> str:
        return f"{self.config.server}:{self.config.effective_port}"

    @contextmanager
    def _map_errors(self, step: str, *, auth: bool = False) -> Iterator[None]:
        """Turn imaplib, ssl and socket errors into ImapError naming the step."""
        name, where = self.config.name, self._where
        try:
            yield
        except ImapError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise ImapError(
                f"inbound[{name}]: TLS failed at {where}: certificate not trusted "
                f"({exc.verify_message})",
                source=name,
            ) from exc
        except ssl.SSLError as exc:
            raise ImapError(
                f"inbound[{name}]: TLS failed at {where}: "
                f"{exc.reason or exc.__class__.__name__}{_tls_hint(self.config, exc)}",
                source=name,
            ) from exc
        except imaplib.IMAP4.abort as exc:  # the connection broke (abort is an error)
            raise ImapError(
                f"inbound[{name}]: {where} failed during {step}: {_text(exc.args)}",
                source=name,
            ) from exc
        except imaplib.IMAP4.error as exc:
            what = "login refused" if auth else f"{step} refused"
            raise ImapError(
                f"inbound[{name}]: {what} at {where}: {_text(exc.args)}",
                source=name,
                auth=auth,
            ) from exc
        except TimeoutError as exc:
            raise ImapError(
                f"inbound[{name}]: {where} timed out during {step}", source=name
            ) from exc
        except OSError as exc:
            reason = exc.strerror or exc.__class__.__name__
            what = "cannot connect to" if step == "connect" else f"{step} failed at"
            raise ImapError(
                f"inbound[{name}]: {what} {where}: {reason}", source=name
            ) from exc

    def _check(self, step: str, typ: str, data: object) -> None:
        if typ != "OK":
            raise ImapRefusedError(
                f"inbound[{self.config.name}]: {step} at {self._where}: {typ} {_text(data)}",
                source=self.config.name,
            )

    @property
    def imap(self) -> imaplib.IMAP4:
        """The open imaplib session."""
        assert self._imap is not None, "open() first"
        return self._imap

    def open(self) -> None:
        """Connect, TLS per the security rule, log in, read the post-login capabilities.

        Raises:
            ImapError: connect, TLS or login failed, or STARTTLS is not offered.
        """
        config = self.config
        host, port, timeout = config.server, config.effective_port, config.timeout
        with self._map_errors("connect"):
            if config.security == "tls":
                self._imap = imaplib.IMAP4_SSL(
                    host, port, ssl_context=tls_context(config), timeout=timeout
                )
                self.tls = self._tls_detail("implicit TLS")
            else:
                self._imap = imaplib.IMAP4(host, port, timeout=timeout)
        if config.security == "starttls":
            self._starttls()
        self._login()
        with self._map_errors("capability"):
            typ, data = self.imap.capability()
        self._check("CAPABILITY", typ, data)
        # imaplib keeps the pre-login list; MOVE and UIDPLUS come only after login.
        last = data[-1] if isinstance(data[-1], bytes) else b""
        self.capabilities = frozenset(last.decode("ascii", "replace").upper().split())

    def _tls_detail(self, how: str) -> str:
        sock = self.imap.sock
        version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
        verified = "verified" if self.config.verify_certificates else "NOT verified"
        return f"{how}, {version or 'TLS'}, certificate {verified}"

    def _starttls(self) -> None:
        if "STARTTLS" not in self.imap.capabilities:
            raise ImapError(
                f"inbound[{self.config.name}]: {self._where} does not offer STARTTLS; "
                "nothing is sent in plaintext (security = starttls)",
                source=self.config.name,
            )
        with self._map_errors("starttls"):
            self.imap.starttls(ssl_context=tls_context(self.config))
        self.tls = self._tls_detail("STARTTLS")

    def _login(self) -> None:
        config = self.config
        with self._map_errors("login", auth=True):
            if config.auth == "xoauth2":
                assert self._token is not None, (
                    "auth = 'xoauth2' needs a token provider"
                )
                sasl = f"user={config.username}\x01auth=Bearer {self._token()}\x01\x01"
                answers = iter([sasl.encode()])
                # On an error challenge the second answer must be empty (RFC 7628 3.2.3).
                self.imap.authenticate("XOAUTH2", lambda _: next(answers, b""))
            else:
                self.imap.login(config.username, self._password or "")

    def ensure_folder(self, name: str) -> None:
        """Create ``name`` unless it exists (``ALREADYEXISTS`` is fine).

        Raises:
            ImapError: the session broke. ImapRefusedError: it cannot be created.
        """
        mailbox = mailbox_argument(name)
        with self._map_errors(f"CREATE {name}"):
            typ, data = self.imap.create(mailbox)
            if typ == "OK" or b"ALREADYEXISTS" in b" ".join(
                d for d in data if isinstance(d, bytes)
            ):
                return
            # Some servers refuse CREATE of an existing folder without the code.
            listed, found = self.imap.list('""', mailbox)
        if not (listed == "OK" and any(isinstance(f, bytes) for f in found)):
            self._check(f"CREATE {name}", typ, data)

    def select(self, name: str) -> int:
        """SELECT the folder read-write; returns its UIDVALIDITY (0 when not sent).

        Raises:
            ImapError: the session broke. ImapRefusedError: no such folder.
        """
        with self._map_errors(f"SELECT {name}"):
            typ, data = self.imap.select(mailbox_argument(name))
            self._check(f"SELECT {name}", typ, data)
            _, values = self.imap.response("UIDVALIDITY")
        found = _UIDVALIDITY.search(values[0] or b"") if values else None
        return int(found.group()) if found else 0

    def status(self, name: str) -> tuple[int, int]:
        """STATUS of a folder that is not selected: (messages, UIDVALIDITY).

        One command, the whole of an idle poll.

        Raises:
            ImapError: the session broke. ImapRefusedError: no such folder.
        """
        with self._map_errors(f"STATUS {name}"):
            typ, data = self.imap.status(
                mailbox_argument(name), "(MESSAGES UIDVALIDITY)"
            )
        self._check(f"STATUS {name}", typ, data)
        text = b" ".join(d for d in data if isinstance(d, bytes))
        messages = _STATUS_MESSAGES.search(text)
        uidvalidity = _STATUS_UIDVALIDITY.search(text)
        if messages is None:
            raise ImapRefusedError(
                f"inbound[{self.config.name}]: STATUS {name} at {self._where}: "
                f"no MESSAGES in {_text(data)}",
                source=self.config.name,
            )
        return int(messages.group(1)), int(uidvalidity.group(1)) if uidvalidity else 0

    def unselect(self) -> None:
        """Leave the selected folder without expunging anything (UNSELECT, RFC 3691).

        Raises:
            ImapError: the session broke. ImapRefusedError: the server said no.
        """
        with self._map_errors("UNSELECT"):
            # imaplib knows UNSELECT but has no method for it.
            typ, data = self.imap._simple_command("UNSELECT")
            self.imap.state = "AUTH"
        self._check("UNSELECT", typ, data)

    def pending(self, limit: int) -> list[int]:
        """UIDs in the selected folder, oldest first, at most ``limit``.

        Handled mail is moved out, so everything left is pending. ``\\Deleted`` mail
        (copied, not yet expunged) is not.
        """
        self.imap.untagged_responses.clear()  # old EXPUNGE/COPYUID replies pile up
        with self._map_errors("UID SEARCH"):
            typ, data = self.imap.uid("SEARCH", "UNDELETED")
        self._check("UID SEARCH", typ, data)
        uids = sorted(int(u) for u in b" ".join(d or b"" for d in data).split())
        return uids[:limit]

    def fetch(self, uid: int) -> bytes | None:
        """The whole message, without setting ``\\Seen``; None when it is gone."""
        with self._map_errors(f"UID FETCH {uid}"):
            typ, data = self.imap.uid("FETCH", str(uid), "(BODY.PEEK[])")
        self._check(f"UID FETCH {uid}", typ, data)
        for item in data:
            if isinstance(item, tuple) and _LITERAL_HEAD.search(item[0]):
                return bytes(item[1])
        return None

    def move(self, uid: int, folder: str) -> None:
        """MOVE the message to ``folder``, or copy and delete it where MOVE is missing.

        Raises:
            ImapError: the session broke. ImapRefusedError: the server said no.
        """
        if "MOVE" not in self.capabilities:
            self.copy_and_delete(uid, folder)
            return
        with self._map_errors(f"UID MOVE {uid}"):
            typ, data = self.imap.uid("MOVE", str(uid), mailbox_argument(folder))
        self._check(f"UID MOVE {uid} {folder}", typ, data)

    def copy_and_delete(self, uid: int, folder: str) -> None:
        """COPY, flag ``\\Deleted``, then ``UID EXPUNGE`` of that message alone.

        Without UIDPLUS the message stays flagged: a plain EXPUNGE would also remove
        mail that others flagged, and ``pending`` skips it anyway.
        """
        with self._map_errors(f"UID COPY {uid}"):
            typ, data = self.imap.uid("COPY", str(uid), mailbox_argument(folder))
            self._check(f"UID COPY {uid} {folder}", typ, data)
            typ, data = self.imap.uid("STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)")
            self._check(f"UID STORE {uid}", typ, data)
            if "UIDPLUS" in self.capabilities:
                typ, data = self.imap.uid("EXPUNGE", str(uid))
                self._check(f"UID EXPUNGE {uid}", typ, data)

    def close(self, *, polite: bool = True) -> None:
        """LOGOUT (when ``polite``; not on a broken session), then drop the socket.

        It never raises.
        """
        imap, self._imap = self._imap, None
        if imap is None:
            return
        if polite:
            try:
                imap.logout()  # it shuts the socket down too
                return
            except (imaplib.IMAP4.error, OSError):
                pass
        with suppress(OSError):
            imap.shutdown()
