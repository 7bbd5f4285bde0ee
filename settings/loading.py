"""Load the configuration: the TOML file, the environment rules, secret files."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr, ValidationError

from settings.errors import ConfigError
from settings.models import Settings

__all__ = ["config_path", "load_settings", "public_url", "read_secret"]

PREFIX = "MAILWORKER_"
_NAMED_SECTIONS = {
    "SMTP": "smtp",
    "OPENAUTH": "openauth",
    "INTEGRATED_SERVICES": "integrated_services",
}


def config_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """Return the configuration file in force: ``MAILWORKER_CONFIG``, else ``./mailworker.toml``.

    Args:
        environ: the environment to read (default: ``os.environ``).

    Returns:
        The path, or None when no file is named and none is in the working directory.
    """
    env = os.environ if environ is None else environ
    if env.get("MAILWORKER_CONFIG"):
        return Path(env["MAILWORKER_CONFIG"])
    default = Path("mailworker.toml")
    return default if default.is_file() else None


def load_settings(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read and validate the configuration once per process.

    Args:
        path: the TOML file; default ``config_path(environ)``.
        environ: the environment (default: ``os.environ``).

    Returns:
        The validated settings. Secret files are not read here: see ``read_secret``.

    Raises:
        ConfigError: the file is unreadable, or a key or variable is wrong; names it.
    """
    env = dict(os.environ if environ is None else environ)
    path = path if path is not None else config_path(env)
    data: dict[str, Any] = _read_toml(path) if path is not None else {}
    _apply_environment(data, env)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise _config_error(exc, data, path) from None


def read_secret(
    inline: SecretStr | None, file: Path | None, field: str
) -> SecretStr | None:
    """Return a secret given inline or as a ``*_file`` path (read now, whitespace trimmed).

    Args:
        inline: the inline value, if any.
        file: the file holding the value, if any.
        field: the key, for the error message (e.g. ``smtp[primary].password_file``).

    Returns:
        The secret, or None when neither is given.

    Raises:
        ConfigError: the file cannot be read or is empty.
    """
    if inline is not None:
        return inline
    if file is None:
        return None
    try:
        value = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            field, f"cannot read {file}: {exc.__class__.__name__}"
        ) from None
    if not value:
        raise ConfigError(field, f"{file} is empty")
    return SecretStr(value)


def public_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe to print or log)."""
    parts = urlsplit(url)
    if parts.query:
        query = "&".join(
            f"{k}=***" if k.lower() == "password" else f"{k}{sep}{v}"
            for k, sep, v in (item.partition("=") for item in parts.query.split("&"))
        )
        parts = parts._replace(query=query)
        url = urlunsplit(parts)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("MAILWORKER_CONFIG", f"{path} does not exist") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None


def _apply_environment(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for var, value in sorted(env.items()):
        if not var.startswith(PREFIX) or var == "MAILWORKER_CONFIG":
            continue
        if var == "MAILWORKER_BROKER_URL":
            data["broker_url"] = value
            continue
        parts = var[len(PREFIX) :].split("__")
        if (
            len(parts) != 3
            or parts[0] not in _NAMED_SECTIONS
            or not parts[1]
            or not parts[2]
        ):
            raise ConfigError(
                var,
                "unknown variable: use MAILWORKER_BROKER_URL, MAILWORKER_CONFIG or "
                "MAILWORKER_<SMTP|OPENAUTH|INTEGRATED_SERVICES>__<NAME>__<KEY>",
            )
        section = _NAMED_SECTIONS[parts[0]]
        entry = _named_entry(data, section, parts[1], var)
        entry[parts[2].lower()] = _env_value(value)


def _named_entry(
    data: dict[str, Any], section: str, env_name: str, var: str
) -> dict[str, Any]:
    def matches(name: object) -> bool:
        return isinstance(name, str) and name.upper().replace("-", "_") == env_name

    if section == "integrated_services":
        services = data.setdefault(section, {})
        if isinstance(services, dict):
            for name, entry in services.items():
                if matches(name) and isinstance(entry, dict):
                    return entry
    else:
        entries = data.setdefault(section, [])
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict) and matches(entry.get("name")):
                    return entry
    raise ConfigError(
        var, f"no {section} service named {env_name.lower()!r} in the config file"
    )


def _env_value(value: str) -> Any:
    # Lists (scopes) are written as JSON; everything else pydantic coerces from text.
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _config_error(
    exc: ValidationError, data: dict[str, Any], path: Path | None
) -> ConfigError:
    error = exc.errors()[0]
    field = _field_name(error["loc"], data)
    where = f"{path}: " if path is not None else ""
    if error["type"] == "extra_forbidden":
        return ConfigError(field, f"{where}unknown key")
    message = str(error["msg"]).removeprefix("Value error, ")
    return ConfigError(field, f"{where}{message}")


def _field_name(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            node = node[item]
            name = node.get("name") if isinstance(node, dict) else None
            parts[-1] += f"[{name if isinstance(name, str) else item}]"
            continue
        if isinstance(node, dict) and item in node:
            node = node[item]
        elif isinstance(item, str) and item in {"function-after", "function-before"}:
            continue
        parts.append(str(item))
    return ".".join(parts) or "config"
