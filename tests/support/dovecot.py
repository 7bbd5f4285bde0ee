"""A private Dovecot for the tests: its own config, users, ports and temp dir, stopped by pid.

Adapted from ``/work/shared/research/inbound_mail_demo.py`` (``PrivateDovecot``); the why of
each config line is in ``inbound-mail-facts.md`` §2-§4. Dovecot 2.3 syntax: bookworm ships
2.3.19. It never reads ``/etc/dovecot`` (``-c`` is given everywhere) and never touches a system
instance: its own ``base_dir``, ``state_dir`` and free loopback ports.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from common.sockets import free_port
from tests.support.env import CI, HOST

DOMAIN = "example.test"
# Linux routes all of 127.0.0.0/8 to the loopback interface.
NO_MOVE, NO_UIDPLUS, NO_TLS = "127.0.0.2", "127.0.0.3", "127.0.0.4"
PASSWORD = "inbound-secret"  # every test user's, unless the test gives one
_SBIN = ":/usr/sbin:/usr/bin:/sbin"


def program(name: str) -> str | None:
    """Dovecot's programs live in /usr/sbin, often not on PATH."""
    return shutil.which(name, path=os.environ.get("PATH", "") + _SBIN)


def require_dovecot() -> str:
    """The dovecot binary; skip without one, except under CI=true where that fails."""
    binary = program("dovecot")
    message = None
    if binary is None:
        message = (
            "dovecot is not installed: apt-get install dovecot-imapd dovecot-lmtpd"
        )
    elif os.geteuid() != 0:
        message = "a private dovecot needs root (it hands the mail files to nobody)"
    if message is not None:
        if CI:
            raise RuntimeError(f"CI=true but {message} (.ci/run installs it)")
        pytest.skip(message)
    assert binary is not None
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    if not version.startswith("2.3."):
        # 2.4 changed the config syntax (inbound-mail-facts.md §5): fail, never guess.
        raise RuntimeError(
            f"tests/support/dovecot.py writes Dovecot 2.3 config, not {version}"
        )
    return binary


def _banner(port: int, tls: ssl.SSLContext | None) -> bytes:
    """The server's first line, after a TLS handshake when ``tls`` is given."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((HOST, port), timeout=1.0))
        if tls is not None:
            sock = stack.enter_context(tls.wrap_socket(sock, server_hostname=HOST))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
        return data


class Dovecot:
    """One Dovecot (IMAP with STARTTLS, IMAPS) living in a short temp dir.

    It listens on four loopback addresses, one server with four faces: ``HOST`` as
    Dovecot is, ``NO_MOVE`` without MOVE after login, ``NO_UIDPLUS`` without MOVE and
    UIDPLUS, and ``NO_TLS`` where STARTTLS is not offered.

    Args:
        ca: the session's trustme CA; the server certificate is issued by it.
    """

    def __init__(self, ca: trustme.CA) -> None:
        self.binary = require_dovecot()
        # A short path: base_dir holds unix sockets, whose paths may not pass 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="dcv-"))
        self.ca = ca
        self.conf = self.root / "dovecot.conf"
        self.passwd = self.root / "users"  # one passwd-file per user: users/<name>
        self.log = self.root / "dovecot.log"
        self.imap_port = free_port()
        self.imaps_port = free_port()
        # Dovecot refuses uid 0 for mail; nobody works (any uid >= 500 would).
        nobody = pwd.getpwnam("nobody")
        self.mail_uid, self.mail_gid = nobody.pw_uid, nobody.pw_gid
        self.users: dict[str, str] = {}
        self.process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ files

    def prepare(self) -> None:
        """Write the certificate and the config; users come with ``add_user``."""
        # auth runs as "dovecot" and mail processes as nobody: both must enter the root.
        os.chmod(self.root, 0o711)  # noqa: S103 - enter only, no listing: Dovecot's users
        for name in ("run", "state", "home", "users"):
            (self.root / name).mkdir(mode=0o711)
        pem = self.ca.issue_cert("localhost", HOST)
        pem.private_key_and_cert_chain_pem.write_to_path(str(self.root / "tls.pem"))
        os.chmod(
            self.root / "tls.pem", 0o600
        )  # read by Dovecot's config process (root)
        os.chown(self.passwd, 0, grp.getgrnam("dovecot").gr_gid)
        self.conf.write_text(self.render_config())

    def render_config(self) -> str:
        """The whole config file: nothing is included from /etc/dovecot."""
        r = self.root
        return f"""\
base_dir = {r}/run
state_dir = {r}/state
instance_name = mailworker-test
log_path = {self.log}
protocols = imap
listen = {HOST}, {NO_MOVE}, {NO_UIDPLUS}, {NO_TLS}
default_login_user = dovenull
default_internal_user = dovecot
default_internal_group = dovecot
disable_plaintext_auth = no
# xoauth2: Dovecot 2.3 checks the bearer token against the passdb like a password.
auth_mechanisms = plain login xoauth2
passdb {{
  driver = passwd-file
  args = {self.passwd}/%u
}}
userdb {{
  driver = passwd-file
  args = {self.passwd}/%u
}}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 100
ssl = yes
ssl_cert = <{r}/tls.pem
ssl_key = <{r}/tls.pem
service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = {self.imaps_port}
    ssl = yes
  }}
}}
local {NO_MOVE} {{
  protocol imap {{
    imap_capability = IMAP4rev1 LITERAL+ UIDPLUS
  }}
}}
local {NO_UIDPLUS} {{
  protocol imap {{
    imap_capability = IMAP4rev1 LITERAL+
  }}
}}
local {NO_TLS} {{
  ssl = no
}}
"""

    def add_user(self, password: str = PASSWORD) -> str:
        """A new mailbox user of this test's own; returns the user name.

        Each user has a passwd-file of its own: Dovecot notices a changed file only by
        its mtime and size, which a quick rewrite of one shared file can keep.
        """
        user = f"u{uuid.uuid4().hex[:10]}@{DOMAIN}"
        home = self.root / "home" / user
        home.mkdir(mode=0o700)
        os.chown(home, self.mail_uid, self.mail_gid)
        # user:password:uid:gid:(gecos):home:(shell):extra_fields; {PLAIN} is the scheme.
        entry = self.passwd / user
        entry.write_text(
            f"{user}:{{PLAIN}}{password}:{self.mail_uid}:{self.mail_gid}::{home}::\n"
        )
        os.chown(entry, 0, grp.getgrnam("dovecot").gr_gid)
        os.chmod(entry, 0o640)
        self.users[user] = password
        return user

    # ------------------------------------------------------------ start and stop

    def start(self, timeout: float = 15.0) -> None:
        """Check the config with doveconf, run ``dovecot -F``, wait for both banners."""
        doveconf = program("doveconf") or "doveconf"
        checked = subprocess.run(
            [doveconf, "-c", str(self.conf), "-n"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if checked.returncode != 0:
            raise RuntimeError(f"doveconf rejected the config:\n{checked.stderr}")
        with (self.root / "dovecot.stderr").open("wb") as err:
            self.process = subprocess.Popen(
                [self.binary, "-F", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        trust = ssl.create_default_context()
        self.ca.configure_trust(trust)
        self._wait_for_banner(self.imap_port, None, deadline)
        self._wait_for_banner(self.imaps_port, trust, deadline)

    def _wait_for_banner(
        self, port: int, tls: ssl.SSLContext | None, deadline: float
    ) -> None:
        """A connect is not enough (the master owns the sockets): wait for ``* OK``."""
        last: object = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                errors = (self.root / "dovecot.stderr").read_text(errors="replace")
                raise RuntimeError(
                    f"dovecot exited {self.process.returncode}: {errors}{self.log_tail()}"
                )
            try:
                last = _banner(port, tls)
                if last.startswith(b"* OK"):
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(
            f"no IMAP banner on {HOST}:{port} ({last!r}){self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM the master (its pid is ours), wait, then remove the temp dir."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 25) -> str:
        """The end of Dovecot's log, for a failing test's message."""
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- dovecot.log (tail) ---\n" + "\n".join(text)

    # ------------------------------------------------------------ the test's own client

    @contextlib.contextmanager
    def client(self, user: str) -> Iterator[imaplib.IMAP4]:
        """A logged-in imaplib session as ``user`` (plain, loopback) for setup and checks."""
        imap = imaplib.IMAP4(HOST, self.imap_port, timeout=10)
        try:
            imap.login(user, self.users[user])
            yield imap
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                imap.logout()


def append(imap: imaplib.IMAP4, folder: str, raw: bytes) -> int:
    """APPEND ``raw`` to ``folder`` (created when missing); returns the new UID."""
    imap.create(folder)  # NO [ALREADYEXISTS] when it exists: fine
    typ, data = imap.append(folder, None, None, raw)
    found = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"")
    assert typ == "OK" and found, data
    return int(found.group(1))


def message_ids(imap: imaplib.IMAP4, folder: str) -> list[str]:
    """The Message-ID of every message in ``folder`` (empty when it does not exist)."""
    typ, _ = imap.select(folder, readonly=True)
    if typ != "OK":
        return []
    typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    found = []
    for item in data:
        if isinstance(item, tuple):
            match = re.search(rb"Message-ID:\s*(\S+)", item[1], re.IGNORECASE)
            if match:
                found.append(match.group(1).decode())
    imap.close()
    return found
