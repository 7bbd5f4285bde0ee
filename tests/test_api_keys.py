"""API keys: created with scopes, shown once, kept hashed, listed and revoked."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis

from settings import ConfigError, load_settings
from tests.support.config import write_toml
from tests.support.env import REDIS_URL
from worker.api.keys import ApiKeyError, ApiKeys

MAILWORKER = Path(sys.executable).parent / "mailworker"


def test_a_key_authenticates_with_its_scopes_until_it_is_revoked(
    redis_client, namespace
):
    keys = ApiKeys(redis_client, namespace)
    key, secret = keys.create("engine", ["send", "read"])
    assert key.scopes == {"send", "read"}
    found = keys.authenticate(secret)
    assert found is not None and found.name == "engine"
    assert found.allows("send") and not found.allows("ops")
    assert keys.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert (
        keys.authenticate("") is None and keys.authenticate("mwk_" + "x" * 500) is None
    )
    assert keys.revoke("engine") and not keys.revoke("engine")
    assert keys.authenticate(secret) is None
    assert keys.list() == []


def test_only_the_hash_of_a_secret_is_stored(redis_client, namespace):
    keys = ApiKeys(redis_client, namespace)
    _, secret = keys.create("ops-team", "ops")
    stored = b"".join(
        field + value
        for name in redis_client.scan_iter(f"{namespace}:api:*")
        for field, value in redis_client.hgetall(name).items()
    )
    assert secret.encode() not in stored
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored
    assert secret not in repr(keys) and secret not in repr(keys.list())


@pytest.mark.parametrize(
    ("name", "scopes", "field"),
    [
        ("engine", ["send", "admin"], "scopes"),
        ("engine", [], "scopes"),
        ("bad name", ["send"], "name"),
        ("", ["send"], "name"),
    ],
)
def test_a_bad_name_or_scope_is_refused_naming_the_field(
    redis_client, namespace, name, scopes, field
):
    with pytest.raises(ApiKeyError, match=f"^{field}:"):
        ApiKeys(redis_client, namespace).create(name, scopes)


def test_a_name_is_taken_once(redis_client: redis.Redis, namespace: str):
    keys = ApiKeys(redis_client, namespace)
    _, first = keys.create("engine", ["send"])
    with pytest.raises(ApiKeyError, match="exists"):
        keys.create("engine", ["read"])
    found = keys.authenticate(first)
    assert found is not None and found.scopes == {"send"}


def _cli(
    tmp_path: Path, namespace: str, *args: str
) -> subprocess.CompletedProcess[str]:
    config = write_toml(
        tmp_path / "mailworker.toml", {"namespace": namespace, "broker_url": REDIS_URL}
    )
    load_settings(config, environ={})
    return subprocess.run(
        [str(MAILWORKER), "api-key", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "MAILWORKER_CONFIG": str(config)},
        check=False,
    )


def test_api_key_create_list_revoke(tmp_path, namespace, redis_client):
    """The operator's commands: the secret alone on stdout's last line, once."""
    made = _cli(tmp_path, namespace, "create", "engine", "--scopes", "send,read")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.splitlines()[-1]
    assert secret.startswith("mwk_") and made.stdout == secret + "\n"
    assert ApiKeys(redis_client, namespace).authenticate(secret) is not None
    listed = _cli(tmp_path, namespace, "list", "--json")
    [entry] = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert entry["name"] == "engine" and entry["scopes"] == ["read", "send"]
    assert secret not in listed.stdout + _cli(tmp_path, namespace, "list").stdout
    bad = _cli(tmp_path, namespace, "create", "other", "--scopes", "send,root")
    assert bad.returncode == 2 and "scopes" in bad.stderr
    taken = _cli(tmp_path, namespace, "create", "engine", "--scopes", "ops")
    assert taken.returncode == 2 and "exists" in taken.stderr
    assert _cli(tmp_path, namespace, "revoke", "engine").returncode == 0
    assert _cli(tmp_path, namespace, "revoke", "engine").returncode == 3
    assert ApiKeys(redis_client, namespace).authenticate(secret) is None


def test_api_settings_name_the_field(tmp_path):
    for section, field in (
        ({"rate_limit": "lots"}, "rate_limit"),
        ({"listen": "8025"}, "listen"),
        ({"tls_certificate_file": str(tmp_path / "c.pem")}, "tls_key_file"),
    ):
        config = write_toml(tmp_path / "mailworker.toml", {"api": section})
        with pytest.raises(ConfigError, match=field):
            load_settings(config, environ={})
