"""Load the configuration: the TOML file, the environment rules, secret files."""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from settings.errors import ConfigError
from settings.models import Settings
from settings.problems import problems_of

__all__ = ["config_path", "load_settings", "public_url", "read_secret"]

PREFIX = "MAILWORKER_"
_NAMED_SECTIONS = {
    "SMTP": "smtp",
    "OPENAUTH": "openauth",
    "INTEGRATED_SERVICES": "integrated_services",
    "INBOUND": "inbound",
    "WEBHOOK": "webhook",
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

    A secret set through the environment replaces the same secret's other form in the
    file (``MAILWORKER_SMTP__PRIMARY__PASSWORD`` drops that connection's
    ``password_file``, and the other way round).

    Args:
        path: the TOML file; default ``config_path(environ)``.
        environ: the environment (default: ``os.environ``).

    Returns:
        The validated settings. Secret files are not read here: see ``read_secret``.

    Raises:
        ConfigError: the file is unreadable, or keys or variables are wrong: every
            problem found, each naming its key (or the variable that set it).
    """
    env = dict(os.environ if environ is None else environ)
    path = path if path is not None else config_path(env)
    data: dict[str, Any] = _read_toml(path) if path is not None else {}
    origins: dict[tuple[str | int, ...], str] = {}
    problems = _apply_environment(data, env, origins)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        problems += problems_of(exc, data, path, origins)
    if problems:
        (field, message), *more = problems
        raise ConfigError(field, message, more=more)
    return settings


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
    """Return ``url`` with any password replaced by ``***`` (safe to print or log).

    The user info's password and every query parameter whose name holds ``password``
    (``sentinel_password``) are masked. The URL is read as text, not parsed: a password
    with an unencoded ``#``, ``/``, ``?`` or ``@`` (which a URL parser would take for
    the end of the user info) is masked all the same, and so, at worst, is a little more.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    if at >= 0 and ":" in rest[:at]:
        user = rest[:at].partition(":")[0]
        rest = f"{user}:***@{rest[at + 1 :]}"
    path, mark, query = rest.partition("?")
    if mark:
        query = "&".join(
            f"{k}=***" if "password" in k.lower() else f"{k}{eq}{v}"
            for k, eq, v in (item.partition("=") for item in query.split("&"))
        )
        rest = f"{path}?{query}"
    return f"{scheme}{sep}{rest}"


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


# A secret and its *_file form: one given through the environment replaces the other.
_SECRET_FORMS = {
    "password": "password_file",
    "client_secret": "client_secret_file",
    "private_key_passphrase": "private_key_passphrase_file",
    "secret": "secret_file",  # [[webhook]]
}
_SECRET_FORMS |= {file: inline for inline, file in _SECRET_FORMS.items()}
_VARIABLE_HELP = (
    "use MAILWORKER_BROKER_URL, MAILWORKER_CONFIG or "
    "MAILWORKER_<SMTP|OPENAUTH|INTEGRATED_SERVICES>__<NAME>__<KEY>"
)


def _apply_environment(
    data: dict[str, Any],
    env: Mapping[str, str],
    origins: dict[tuple[str | int, ...], str],
) -> list[tuple[str, str]]:
    """Merge the MAILWORKER_* variables into ``data``; return what is wrong with them.

    ``origins`` receives the location in ``data`` of each key a variable set.
    """
    problems: list[tuple[str, str]] = []
    for var, value in sorted(env.items()):
        if not var.startswith(PREFIX) or var == "MAILWORKER_CONFIG":
            continue
        if var == "MAILWORKER_BROKER_URL":
            data["broker_url"] = value
            origins[("broker_url",)] = var
            continue
        parts = var[len(PREFIX) :].split("__")
        if (
            len(parts) != 3
            or parts[0] not in _NAMED_SECTIONS
            or not parts[1]
            or not parts[2]
        ):
            problems.append((var, f"unknown variable{_variable_hint(var)}"))
            continue
        section = _NAMED_SECTIONS[parts[0]]
        found = _named_entry(data, section, parts[1])
        if found is None:
            problems.append(
                (
                    var,
                    f"no {section} service named {parts[1].lower()!r} in the config file",
                )
            )
            continue
        where, entry = found
        key = parts[2].lower()
        entry[key] = _env_value(value)
        origins[(section, where, key)] = var
        other = _SECRET_FORMS.get(key)
        if other in entry and (section, where, other) not in origins:
            del entry[other]  # the environment's secret wins over the file's
    return problems


def _variable_hint(var: str) -> str:
    parts = var[len(PREFIX) :].split("__")
    known = ["BROKER_URL", "CONFIG", *_NAMED_SECTIONS]
    match = difflib.get_close_matches(parts[0], known, n=1, cutoff=0.75)
    if match and match[0] != parts[0]:
        fixed = PREFIX + "__".join([match[0], *parts[1:]])
        return f" (did you mean {fixed}?)"
    return f": {_VARIABLE_HELP}"


def _named_entry(
    data: dict[str, Any], section: str, env_name: str
) -> tuple[str | int, dict[str, Any]] | None:
    """The file's entry a variable names, and its place in the section (index or name)."""

    def matches(name: object) -> bool:
        return isinstance(name, str) and name.upper().replace("-", "_") == env_name

    if section == "integrated_services":
        services = data.setdefault(section, {})
        if isinstance(services, dict):
            for name, entry in services.items():
                if matches(name) and isinstance(entry, dict):
                    return name, entry
    else:
        entries = data.setdefault(section, [])
        if isinstance(entries, list):
            for index, entry in enumerate(entries):
                if isinstance(entry, dict) and matches(entry.get("name")):
                    return index, entry
    return None


def _env_value(value: str) -> Any:
    # Lists (scopes) are written as JSON; everything else pydantic coerces from text.
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
