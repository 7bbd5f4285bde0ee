"""`mailworker dev` with [email_actions]: a notification with actions lands in outbox/,
a reply to the capture mailbox acts, and the event and the confirmation show it."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import textwrap
from email import policy
from email.parser import BytesParser
from pathlib import Path

import orjson

from tests.support.env import HOST
from tests.support.helpers import wait_for
from tests.support.replies import reply

MAILWORKER = Path(sys.executable).parent / "mailworker"
CONFIG = """
[email_actions]
enabled = true
reply_address = "actions@mailworker.test"
confirm_by_email = true

[[inbound]]
name = "replies"
kind = "smtp"
accept = ["actions@mailworker.test"]
"""


def _eml(path: Path):
    return BytesParser(policy=policy.default).parsebytes(path.read_bytes())


def test_mailworker_dev_shows_an_action_end_to_end(tmp_path):
    """Given dev with actions on, when a notification with actions is sent and its
    recipient replies to the capture mailbox, then `events tail` shows action.accepted
    and the confirmation lands in outbox/."""
    (tmp_path / "mailworker.toml").write_text(textwrap.dedent(CONFIG))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    stderr = (tmp_path / "dev.err").open("wb")
    dev = subprocess.Popen(
        [str(MAILWORKER), "dev"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=stderr,
    )  # fmt: skip
    try:
        assert dev.stdout is not None
        url = dev.stdout.readline().decode().strip().partition("=")[2]
        env = {**env, "MAILWORKER_BROKER_URL": url}
        port = int(
            wait_for(
                lambda: re.search(
                    r"capture mailbox 127\.0\.0\.1:(\d+)",
                    (tmp_path / "dev.err").read_text(),
                )
            ).group(1)
        )

        def run(*args: str) -> str:
            return subprocess.run(
                [str(MAILWORKER), *args], cwd=tmp_path, env=env, check=True,
                timeout=30, capture_output=True, text=True,
            ).stdout  # fmt: skip

        job_id = run(
            "send", "--to", "ann@example.com", "--subject", "Approve invoice 42",
            "--text", "Invoice 42 waits.", "--action", "approve:Approve",
            "--action-context", "task=42",
        ).strip()  # fmt: skip
        outbox = tmp_path / "outbox"
        [sent] = wait_for(lambda: list(outbox.glob("*.eml")), timeout=30)
        reply_to = _eml(sent)["Reply-To"].addresses[0].addr_spec
        key = reply_to.split("+", 1)[1].split("@", 1)[0]
        # Its links point at the API on loopback ([api] listen's port).
        text = _eml(sent).get_body(("plain",)).get_content()
        assert f"<http://127.0.0.1:8025/a/{key}/approve>" in text
        raw = reply(key, sender="ann@example.com", to=reply_to, text="Yes.")
        with smtplib.SMTP(HOST, port, timeout=10) as client:
            client.sendmail("ann@example.com", [reply_to], raw)
        events = [
            orjson.loads(line) for line in run("events", "tail", "--json").splitlines()
        ]
        [accepted] = [e for e in events if e["type"] == "action.accepted"]
        assert accepted["job_id"] == job_id
        assert accepted["data"]["action"] == "approve"
        assert accepted["data"]["context"] == {"task": "42"}
        assert accepted["data"]["comment"] == "Yes."
        wait_for(lambda: len(list(outbox.glob("*.eml"))) == 2, timeout=30)
        [confirmation] = [p for p in outbox.glob("*.eml") if p != sent]
        message = _eml(confirmation)
        assert message["Auto-Submitted"] == "auto-replied"
        assert message["To"] == "ann@example.com"
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(timeout=30)
        finally:
            if dev.stdout is not None:
                dev.stdout.close()
            stderr.close()
    assert dev.returncode == 0
