"""`mailworker api` as operators run it: /metrics, /ops and /a on its listener, one log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from common.sockets import free_port
from tests.support.env import HOST
from tests.support.helpers import wait_for
from worker.api.keys import ApiKeys

pytestmark = pytest.mark.slow
MAILWORKER = str(Path(sys.executable).parent / "mailworker")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_api_serves_metrics_the_console_and_links_and_logs_no_action_key(
    tmp_path, make_settings, redis_client, namespace
):
    """Given `mailworker api` with its own metrics directory, when a notification is
    POSTed, then /metrics counts it; /ops and /a answer; the log never holds a link's key."""
    port = free_port()
    settings = make_settings(
        log_format="json",
        api={"listen": f"{HOST}:{port}"},
        metrics={"directory": str(tmp_path / "metrics")},
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")},
        "MAILWORKER_CONFIG": str(tmp_path / "mailworker.toml"),
    }
    log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(
        [MAILWORKER, "api"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://{HOST}:{port}"
    try:
        wait_for(lambda: _ready(url), timeout=30)
        _, secret = ApiKeys(redis_client, settings.namespace).create("engine", ["send"])
        created = httpx.post(
            f"{url}/v1/notifications",
            json={"to": "ann@example.com", "subject": "Task", "text": "Approve?"},
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert created.status_code == 202, created.text
        metrics = httpx.get(f"{url}/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert (
            'mailworker_jobs_enqueued_total{priority="normal",source="api"} 1.0'
            in metrics.text
        )
        login = httpx.get(f"{url}/ops/login")
        assert login.status_code == 200 and 'name="key"' in login.text
        key = "Zq8secretlinkkey0000000000"
        link = httpx.get(f"{url}/a/{key}/approve")
        assert link.status_code in (200, 404) and "<html" in link.text.lower()
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)
        log.close()
    written = (tmp_path / "api.log").read_text()
    assert "/a/<key>/approve" in written
    assert key not in written and secret not in written
    assert namespace  # the namespace fixture removes what the test wrote
