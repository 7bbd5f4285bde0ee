"""E-mail actions at enqueue (DESIGN §10): the settings, the job's fields, their errors."""

from __future__ import annotations

import pytest

from common.keys import actions_key
from common.sockets import free_port
from producers import (
    BrokerUnavailableError,
    JobValidationError,
    Notification,
    Producer,
)
from settings import ConfigError
from tests.support.config import write_toml
from tests.support.env import REDIS_URL
from tests.test_cli import SEND, mailworker, one_line_cause, queued_jobs

REPLY = "actions@workflow.example.com"
RECEIVER = {"name": "replies", "kind": "smtp", "accept": [REPLY]}
ACTIONS = [{"id": "approve", "label": "Approve"}, {"id": "reject", "label": "Reject"}]


@pytest.fixture
def write_config(tmp_path, namespace):
    """Write mailworker.toml for this test's namespace and return its path."""

    def write(**data):
        data.setdefault("namespace", namespace)
        data.setdefault("broker_url", REDIS_URL)
        return write_toml(tmp_path / "mailworker.toml", data)

    return write


def _job(**fields) -> Notification:
    fields.setdefault("to", ["ann@example.org"])
    fields.setdefault("subject", "Approve the invoice")
    fields.setdefault("text", "Invoice 42 waits for you.")
    fields.setdefault("actions", ACTIONS)
    return Notification(**fields)


def _refused(**fields) -> JobValidationError:
    with pytest.raises(JobValidationError) as info:
        _job(**fields)
    return info.value


def test_actions_settings_load_with_a_source_that_receives_the_reply_address(
    make_settings,
):
    """[email_actions] with an smtp receiver accepting reply_address loads its values."""
    settings = make_settings(
        inbound=[RECEIVER],
        email_actions={
            "enabled": True,
            "reply_address": "Actions@Workflow.example.com",
            "key_ttl": "2d",
            "authentication": "require",
            "trusted_authserv_ids": ["MX.workflow.example.com"],
        },
    )
    actions = settings.email_actions
    assert actions.reply_address == REPLY
    assert actions.key_ttl == 2 * 86400
    assert actions.trusted_authserv_ids == ["mx.workflow.example.com"]
    assert (actions.local_part, actions.domain) == ("actions", "workflow.example.com")


@pytest.mark.parametrize(
    ("inbound", "actions", "field"),
    [
        ([], {"enabled": True, "reply_address": REPLY}, "email_actions.reply_address"),
        (
            [{**RECEIVER, "enabled": False}],
            {"enabled": True, "reply_address": REPLY},
            "email_actions.reply_address",
        ),
        (
            [{**RECEIVER, "accept": ["other@workflow.example.com"]}],
            {"enabled": True, "reply_address": REPLY},
            "email_actions.reply_address",
        ),
        ([RECEIVER], {"enabled": True}, "email_actions"),
        ([RECEIVER], {"reply_address": "actions+x@workflow.example.com"}, "reply_address"),
        ([RECEIVER], {"reply_address": "a" * 38 + "@workflow.example.com"}, "reply_address"),
        ([RECEIVER], {"authentication": "maybe"}, "authentication"),
        ([RECEIVER], {"trusted_authserv_ids": ["not a host"]}, "trusted_authserv_ids"),
        ([RECEIVER], {"links_base_url": "http://x.example"}, "links_base_url"),
        ([RECEIVER], {"key_ttl": "30s"}, "email_actions"),
    ],
    ids=[
        "no-source", "source-disabled", "not-accepted", "no-reply-address", "plus",
        "local-part-too-long", "authentication", "authserv-id", "links-http",
        "key-ttl-too-short",
    ],
)  # fmt: skip
def test_invalid_actions_settings_name_the_field(
    make_settings, inbound, actions, field
):
    """Each broken [email_actions] setting is a ConfigError that names the key."""
    with pytest.raises(ConfigError) as info:
        make_settings(inbound=inbound, email_actions=actions)
    assert field in str(info.value)


def test_a_graph_or_imap_source_can_receive_the_reply_address(make_settings):
    """A graph source's mailbox, or an imap source's login, counts as receiving it."""
    imap = {
        "name": "box",
        "kind": "imap",
        "server": "127.0.0.1",
        "username": REPLY,
        "password": "pw",
    }
    settings = make_settings(
        inbound=[imap], email_actions={"enabled": True, "reply_address": REPLY}
    )
    assert settings.email_actions.enabled


def test_a_job_carries_actions_and_context_on_the_wire():
    """Actions and a flat action_context survive the wire format both ways."""
    job = _job(
        actions=[
            *ACTIONS[:1],
            {"id": "ask-more", "label": "Ask", "comment": "required"},
        ],
        action_context={"task": 42, "flow": "invoices"},
    )
    wire = job.to_wire()
    assert wire["actions"] == [
        {"id": "approve", "label": "Approve"},
        {"id": "ask-more", "label": "Ask", "comment": "required"},
    ]
    assert wire["action_context"] == {"task": 42, "flow": "invoices"}
    assert (
        Notification.model_validate(
            {k: v for k, v in wire.items() if k != "schema_version"}
        )
        == job
    )


def test_a_job_without_actions_travels_as_before():
    """A plain job's wire form has no actions keys (digests of old payloads hold)."""
    wire = _job(actions=[]).to_wire()
    assert "actions" not in wire and "action_context" not in wire


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"actions": [{"id": f"a{i}", "label": "A"} for i in range(7)]}, "actions"),
        ({"actions": [{"id": "Approve", "label": "A"}]}, "actions[0].id"),
        ({"actions": [{"id": "a" * 33, "label": "A"}]}, "actions[0].id"),
        ({"actions": [{"id": "", "label": "A"}]}, "actions[0].id"),
        ({"actions": [{"id": "ok", "label": ""}]}, "actions[0].label"),
        ({"actions": [{"id": "ok", "label": "A\r\nBcc: x@y.z"}]}, "actions[0].label"),
        ({"actions": [{"id": "ok", "label": "A", "comment": "maybe"}]}, "actions[0].comment"),
        ({"actions": [{"id": "ok", "label": "A", "url": "x"}]}, "actions[0].url"),
        ({"actions": [ACTIONS[0], ACTIONS[0]]}, "actions"),
        ({"action_context": {"task": {"nested": 1}}}, "action_context.task"),
        ({"action_context": {"bad key": 1}}, "action_context"),
        ({"actions": [], "action_context": {"task": 1}}, "action_context"),
        ({"reply_to": ["boss@example.org"]}, "reply_to"),
        ({"action_context": {f"k{i}": "x" * 60 for i in range(40)}}, "action_context"),
    ],
    ids=[
        "seven", "uppercase-id", "long-id", "empty-id", "empty-label", "label-crlf",
        "comment-mode", "unknown-key", "twice", "nested-context", "context-key",
        "context-without-actions", "reply-to", "context-too-large",
    ],
)  # fmt: skip
def test_invalid_actions_name_the_field(fields, field):
    """Each broken action or context is refused naming the field at fault."""
    error = _refused(**fields)
    assert error.field == field, error


def test_enqueue_refuses_actions_while_email_actions_are_off(redis_client, namespace):
    """A producer whose workers have no [email_actions] refuses a job with actions."""
    producer = Producer(redis_client, namespace=namespace)
    with pytest.raises(JobValidationError) as info:
        producer.enqueue(_job())
    assert info.value.field == "actions"
    assert "[email_actions]" in info.value.reason
    assert redis_client.llen(f"{namespace}:mail") == 0
    with pytest.raises(JobValidationError) as info:
        producer.enqueue_many([_job(actions=[]), _job()])
    assert info.value.field == "[1].actions"


def test_enqueue_takes_actions_when_the_settings_enable_them(
    redis_client, namespace, make_settings
):
    """Producer.from_settings with [email_actions] enabled enqueues a job with actions."""
    settings = make_settings(
        inbound=[RECEIVER], email_actions={"enabled": True, "reply_address": REPLY}
    )
    producer = Producer.from_settings(settings)
    job_id = producer.enqueue(_job())
    assert queued_jobs(redis_client, namespace)[job_id]["actions"] == ACTIONS


def test_close_actions_of_a_job_without_keys_closes_nothing(redis_client, namespace):
    """close_actions of a job with no keys says it has none."""
    producer = Producer(redis_client, namespace=namespace, email_actions=True)
    assert producer.close_actions("no-such-job") == (0, 0)
    assert not redis_client.exists(actions_key(namespace, "no-such-job"))


def test_send_with_action_flags_enqueues_the_actions(
    redis_client, namespace, write_config
):
    """`send --action approve:Approve --action-context task=42` puts both on the job."""
    config = write_config(
        inbound=[RECEIVER], email_actions={"enabled": True, "reply_address": REPLY}
    )
    result = mailworker(
        *SEND,
        "--action", "approve:Approve",
        "--action", "reject:Reject:required",
        "--action-context", "task=42",
        config=config,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = queued_jobs(redis_client, namespace)[result.stdout.splitlines()[-1]]
    assert job["actions"] == [
        {"id": "approve", "label": "Approve"},
        {"id": "reject", "label": "Reject", "comment": "required"},
    ]
    assert job["action_context"] == {"task": "42"}


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (("--action", "approve"), "--action"),
        (("--action", "Approve:Approve"), "actions[0].id"),
        (("--action", "a:A", "--action-context", "task"), "--action-context"),
    ],
    ids=["no-label", "bad-id", "context-not-key-value"],
)
def test_send_with_bad_action_flags_exits_2_naming_the_field(
    write_config, flags, field
):
    """A malformed --action or --action-context exits 2 with the field on stderr."""
    config = write_config(
        inbound=[RECEIVER], email_actions={"enabled": True, "reply_address": REPLY}
    )
    result = mailworker(*SEND, *flags, config=config)
    assert result.returncode == 2
    assert field in one_line_cause(result)


def test_send_with_actions_while_they_are_off_exits_2(write_config):
    """`send --action` without [email_actions] exits 2 naming `actions`."""
    result = mailworker(*SEND, "--action", "approve:Approve", config=write_config())
    assert result.returncode == 2
    assert "actions" in one_line_cause(result)
    assert "[email_actions]" in one_line_cause(result)


def test_actions_close_of_an_unknown_job_exits_3(write_config):
    """`mailworker actions close` of a job without keys exits 3, one line on stderr."""
    result = mailworker("actions", "close", "nope", config=write_config())
    assert result.returncode == 3
    assert result.stdout == ""
    assert "no action keys" in one_line_cause(result)


def test_close_actions_on_an_unreachable_broker_says_so():
    """close_actions with Redis away raises BrokerUnavailableError naming the broker."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    producer = Producer.from_url(url, email_actions=True)
    with pytest.raises(BrokerUnavailableError) as info:
        producer.close_actions("job-1")
    assert "127.0.0.1" in str(info.value)
