"""`mailworker dev` serves the HTTP API and prints a curl that puts a message in outbox/."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from email import message_from_bytes, policy
from pathlib import Path

import httpx
import pytest

from tests.support.helpers import wait_for

pytestmark = pytest.mark.slow
MAILWORKER = str(Path(sys.executable).parent / "mailworker")


def test_dev_prints_the_api_url_a_key_and_a_curl_that_works(tmp_path):
    """Given dev, when its printed curl runs, then the message is in outbox/ and sent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    dev = subprocess.Popen(
        [MAILWORKER, "dev"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert dev.stdout is not None
        lines = [dev.stdout.readline().decode().strip() for _ in range(4)]
        assert lines[0].startswith("export MAILWORKER_BROKER_URL=")
        assert lines[2].startswith("# HTTP API: http://127.0.0.1:")
        url = lines[2].split()[3].rstrip("/")
        key = lines[2].rsplit(" ", 1)[1]
        assert key.startswith("mwk_") and lines[3].startswith("curl ")
        assert shlex.split(lines[3])[0] == "curl"
        # The curl line's request, made by httpx (the test needs no curl binary).
        words = shlex.split(lines[3])
        body = words[words.index("-d") + 1]
        created = httpx.post(
            f"{url}/v1/notifications",
            content=body,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
            },
        )
        assert created.status_code == 202
        job_id = created.json()["id"]
        [eml] = wait_for(lambda: list((tmp_path / "outbox").glob("*.eml")), timeout=30)
        auth = {"Authorization": f"Bearer {key}"}
        record = f"{url}/v1/notifications/{job_id}"
        wait_for(lambda: httpx.get(record, headers=auth).json()["state"] == "sent")
    finally:
        dev.send_signal(signal.SIGINT)
        code = dev.wait(timeout=30)
        if dev.stdout is not None:
            dev.stdout.close()
    message = message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert message["Subject"] == "Hello over HTTP"
    assert code == 0
