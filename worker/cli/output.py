"""Human-readable output for the CLI: status records and the masked configuration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from settings import Settings, public_url
from settings.models import InboundSource

__all__ = ["render_config", "render_status"]

_MASK = "***"


def render_status(record: Mapping[str, Any]) -> list[str]:
    """A status record (the README's "Status") as aligned lines."""
    lines = [f"{'job':<16}{record['id']}", f"{'state':<16}{record['state']}"]
    for key in (
        "reason",
        "service",
        "attempts",
        "message_id",
        "queue",
        "created_at",
        "updated_at",
        "send_at",
        "next_attempt_at",
        "dead_at",
    ):
        if record.get(key) not in (None, ""):
            lines.append(f"{key:<16}{record[key]}")
    if record.get("error"):
        error = record["error"]
        reply = _reply(error.get("code"), error.get("message"))
        lines.append(f"{'error':<16}{error.get('type')}: {reply}")
    if record.get("metadata"):
        lines.append(f"{'metadata':<16}{orjson.dumps(record['metadata']).decode()}")
    if record.get("recipients"):
        lines.append("recipients")
        for r in record["recipients"]:
            reply = _reply(r.get("code"), r.get("message"))
            lines.append(f"  {r['address']:<40} {r['state']} {reply}".rstrip())
    if record.get("actions"):
        lines.append("actions")
        for a in record["actions"]:
            what = f"{a['action']} by {a['actor']} at {a['at']}" if a["action"] else ""
            lines.append(f"  {a['address']:<40} {a['state']} {what}".rstrip())
    for skip in record.get("skipped") or []:
        lines.append(
            f"{'skipped':<16}{skip['service']}: {skip['reason']} ({skip.get('message', '')})"
        )
    for entry in record.get("history") or []:
        attempt = entry.get("attempt")
        words = [
            entry.get("at"),
            f"attempt {attempt}" if attempt is not None else None,
            entry.get("event"),
            entry.get("reason") or entry.get("service"),
        ]
        lines.append(f"{'history':<16}" + " ".join(str(w) for w in words if w))
    return lines


def _reply(code: object, message: object) -> str:
    """A reply's code and text, the code once (an SMTP reply's text starts with it)."""
    text = str(message or "")
    if code in (None, "") or text.startswith(str(code)):
        return text
    return f"{code} {text}".rstrip()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return orjson.dumps(str(value)).decode()


def _table(data: dict[str, Any]) -> list[str]:
    return [
        f"{key} = {_toml(value)}" for key, value in data.items() if value is not None
    ]


def _masked(model: Any) -> dict[str, Any]:
    data: dict[str, Any] = model.model_dump(mode="json")
    for key, value in data.items():
        if value == "**********":
            data[key] = _MASK
    return data


def render_config(
    settings: Settings, *, scopes: Mapping[str, list[str]] | None = None
) -> list[str]:
    """The effective configuration as TOML, secrets masked, services in delivery order.

    Each service is followed by a ``# resolved:`` comment: the TLS mode, port and auth
    the security rule gives an SMTP connection, and the OAuth scopes in ``scopes``. A
    disabled one is followed by ``# disabled``. The last line is the delivery order.
    """
    scopes = scopes or {}
    root = _masked(settings)
    root["broker_url"] = public_url(settings.broker_url.get_secret_value())
    lines = _table({k: v for k, v in root.items() if not isinstance(v, dict | list)})
    for section in ("limits", "retry", "breaker", "status"):
        lines += ["", f"[{section}]", *_table(root[section])]
    for oa in settings.openauth:  # OpenAuth services go first (delivery order)
        lines += ["", "[[openauth]]", *_table(_masked(oa))]
        lines.append(_resolved(oa.enabled, {"scopes": scopes.get(oa.name)}))
    for conn in settings.smtp:
        lines += ["", "[[smtp]]", *_table(_masked(conn))]
        resolved: dict[str, Any] = {
            "security": conn.effective_security,
            "port": conn.effective_port,
            "auth": conn.effective_auth,
            "scopes": scopes.get(conn.name),
        }
        lines.append(_resolved(conn.enabled, resolved))
    for name, svc in settings.integrated_services.items():
        lines += ["", f"[integrated_services.{name}]", *_table(_masked(svc))]
    # Every other section, in the order the model declares them.
    shown = {"limits", "retry", "breaker", "status", "openauth", "smtp"}
    for section in type(settings).model_fields:
        value = getattr(settings, section)
        if section in shown or section == "integrated_services":
            continue
        if isinstance(value, list):
            for item in value:
                data = _masked(item)
                if isinstance(item, InboundSource):  # only the keys of its kind
                    data = {k: v for k, v in data.items() if k in item.keys}
                lines += ["", f"[[{section}]]", *_table(data)]
        elif hasattr(value, "model_dump"):
            lines += ["", f"[{section}]", *_table(_masked(value))]
    kinds = {s.name: "openauth" for s in settings.openauth} | {
        s.name: "smtp" for s in settings.smtp
    }
    order = " -> ".join(f"{name} ({kinds[name]})" for name in settings.delivery_order)
    lines += ["", f"# delivery order: {order or 'no enabled service'}"]
    return lines


def _resolved(enabled: bool, values: dict[str, Any]) -> str:
    if not enabled:
        return "# disabled: not in the delivery order"
    shown = ", ".join(f"{k} = {_toml(v)}" for k, v in values.items() if v is not None)
    return f"# resolved: {shown}"
