"""deploy/systemd's unit template: valid for systemd, and what it says works with the worker."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from common.exits import EXIT_USAGE
from settings import load_settings
from tests.support.config import write_toml
from tests.support.env import CI
from tests.support.processes import MAILWORKER
from worker.app import secrets_of
from worker.cli.main import worker

UNIT = (
    Path(__file__).parent.parent / "deploy" / "systemd" / "mailworker-worker@.service"
)
BINARY = "/srv/mailworker/.venv/bin/mailworker"


def _settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, commented-out hints (``#Key=value``) included."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if match := re.fullmatch(r"#?([A-Z][A-Za-z]+)=(.*)", line):
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def test_systemd_unit_is_valid_for_systemd(tmp_path):
    """`systemd-analyze verify` accepts an instance of the template, its hints
    (LoadCredential=) uncommented, without a warning."""
    if shutil.which("systemd-analyze") is None:
        if CI:
            raise RuntimeError(
                "CI=true but systemd-analyze is missing: .ci/run installs it"
            )
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text().replace(BINARY, MAILWORKER)
    text = re.sub(r"^#(LoadCredential|Environment)=", r"\1=", text, flags=re.M)
    instance = tmp_path / "mailworker-worker@bulk.service"
    instance.write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", str(instance)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_systemd_unit_fits_the_worker():
    """Its stop timeout is above the worker's shutdown timeout, a configuration error
    is not restarted, each instance reads its own options, and every option the unit
    and its install steps pass is one `mailworker worker` takes."""
    text = UNIT.read_text()
    unit = _settings(text)
    [command] = unit["ExecStart"]
    args = shlex.split(command)
    assert args[:2] == [BINARY, "worker"]
    assert "$WORKER_OPTIONS" in args
    shutdown = int(args[args.index("--shutdown-timeout") + 1])
    assert int(unit["TimeoutStopSec"][0]) > shutdown
    assert str(EXIT_USAGE) in unit["RestartPreventExitStatus"][0].split()
    assert "-/etc/mailworker/%i.env" in unit["EnvironmentFile"]
    examples = re.findall(r"'WORKER_OPTIONS=([^']+)'", text)
    assert len(examples) >= 2
    for options in [args[2:], *(shlex.split(e) for e in examples)]:
        given = [a for a in options if a != "$WORKER_OPTIONS"]
        worker.make_context("worker", given)  # raises on an unknown or bad option


def test_systemd_unit_credential_hint_reaches_the_connection(
    tmp_path, monkeypatch, redis_url
):
    """The unit's LoadCredential= hint works as written: its variable, with `%d` the
    credentials directory, wins over the `password_file` of the configuration file."""
    unit = _settings(UNIT.read_text())
    [credential] = unit["LoadCredential"]
    name, _, _ = credential.partition(":")
    [hint] = [e for e in unit["Environment"] if "%d" in e]
    variable, _, value = hint.partition("=")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / name).write_text("from-the-credential\n")
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "smtp": [
                {
                    "name": "primary",
                    "from_address": "noreply@example.com",
                    "server": "127.0.0.1",
                    "username": "mailer",
                    "password_file": str(tmp_path / "absent"),
                }
            ],
        },
    )
    monkeypatch.setenv("MAILWORKER_CONFIG", str(config))
    monkeypatch.setenv(variable, value.replace("%d", str(credentials)))
    settings = load_settings()
    assert settings.smtp[0].password_file == credentials / name
    assert "from-the-credential" in secrets_of(settings)


API_UNIT = UNIT.parent / "mailworker-api.service"


def test_api_unit_is_valid_for_systemd(tmp_path):
    """`systemd-analyze verify` accepts the API's unit, its hints uncommented."""
    if shutil.which("systemd-analyze") is None:
        if CI:
            raise RuntimeError(
                "CI=true but systemd-analyze is missing: .ci/run installs it"
            )
        pytest.skip("systemd-analyze is not installed")
    text = API_UNIT.read_text().replace(BINARY, MAILWORKER)
    text = re.sub(r"^#(LoadCredential|Environment)=", r"\1=", text, flags=re.M)
    for name in ("api.crt", "api.key"):  # what the credential hints load
        (tmp_path / name).write_text("x")
    text = text.replace("/etc/mailworker/tls/", f"{tmp_path}/")
    unit = tmp_path / "mailworker-api.service"
    unit.write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_api_unit_fits_the_api_command():
    """Its stop timeout outlasts --graceful-timeout, exit 2 is not restarted, and every
    option it and its hints pass is one `mailworker api` takes."""
    from worker.cli.api import api

    text = API_UNIT.read_text()
    unit = _settings(text)
    [command] = unit["ExecStart"]
    args = shlex.split(command)
    assert args[:2] == [BINARY, "api"] and "$API_OPTIONS" in args
    assert int(unit["TimeoutStopSec"][0]) > float(
        args[args.index("--graceful-timeout") + 1]
    )
    assert str(EXIT_USAGE) in unit["RestartPreventExitStatus"][0].split()
    examples = re.findall(r"'API_OPTIONS=([^']+)'", text)
    assert len(examples) >= 2
    for options in [args[2:], *(shlex.split(e) for e in examples)]:
        api.make_context("api", [a for a in options if a != "$API_OPTIONS"])
