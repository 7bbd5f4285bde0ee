"""The configuration contract of DESIGN section 3: real TOML, secret files, environment."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from pydantic import SecretStr

from settings import ConfigError, Settings, load_settings, public_url, read_secret
from settings.durations import parse_duration

SMTP = """
[[smtp]]
name = "{name}"
from_address = "noreply@example.com"
server = "smtp.example.com"
"""

OPENAUTH = """
[[openauth]]
name = "o365"
client_type = "office365"
service = "graph-mailer"
service_identity = "notifications@contoso.com"
"""

INTEGRATED = """
[integrated_services.{name}]
account_type = "{account_type}"
tenant_id = "tenant"
client_id = "client"
"""


def _smtp(name: str = "primary", extra: str = "") -> str:
    return SMTP.format(name=name) + textwrap.dedent(extra)


def _integrated(name: str = "graph-mailer", account_type: str = "service") -> str:
    return INTEGRATED.format(name=name, account_type=account_type)


def _load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "mailworker.toml"
    path.write_text(textwrap.dedent(text))
    return load_settings(path, environ={} if environ is None else environ)


def _refused(
    tmp_path: Path, text: str, environ: dict[str, str] | None = None
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text, environ)
    return info.value


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove every MAILWORKER_* variable of the surrounding process for this test."""
    for name in list(os.environ):
        if name.startswith("MAILWORKER_"):
            monkeypatch.delenv(name)
    return monkeypatch


# ---------------------------------------------------------------- the security rule


@pytest.mark.parametrize(
    ("keys", "security", "port"),
    [
        # security, when set, decides (whatever the port)
        ('security = "none"', "none", 25),
        ('security = "starttls"', "starttls", 587),
        ('security = "tls"', "tls", 465),
        ('security = "starttls"\nport = 465', "starttls", 465),
        ('security = "none"\nport = 465', "none", 465),
        ('security = "tls"\nport = 2465', "tls", 2465),
        # an explicit ssl that agrees with security is fine
        ('security = "tls"\nssl = true\nport = 465', "tls", 465),
        ('security = "starttls"\nssl = true\nport = 587', "starttls", 587),
        ('security = "none"\nssl = false\nport = 25', "none", 25),
        # otherwise ssl decides: true -> tls on 465, starttls on any other port
        ("ssl = true\nport = 465", "tls", 465),
        ("ssl = true\nport = 587", "starttls", 587),
        ("ssl = true\nport = 25", "starttls", 25),
        ("ssl = true\nport = 2525", "starttls", 2525),
        # false or absent -> none, even on 465
        ("ssl = false\nport = 465", "none", 465),
        ("ssl = false", "none", 25),
        ("port = 465", "none", 465),
        ("", "none", 25),
    ],
)
def test_security_rule_gives_the_tls_mode_and_port(tmp_path, keys, security, port):
    """The TLS mode and port follow DESIGN section 3's security rule exactly."""
    settings = _load(tmp_path, _smtp(extra=keys))
    [conn] = settings.smtp
    assert (conn.effective_security, conn.effective_port) == (security, port)


def test_ssl_true_without_a_port_is_consistent(tmp_path):
    """ssl = true without a port gives implicit TLS on 465 or STARTTLS on another port."""
    [conn] = _load(tmp_path, _smtp(extra="ssl = true")).smtp
    assert conn.effective_security in ("tls", "starttls")
    assert (conn.effective_port == 465) == (conn.effective_security == "tls")


@pytest.mark.parametrize(
    "keys",
    [
        'ssl = false\nsecurity = "starttls"',
        'ssl = false\nsecurity = "tls"',
        'ssl = true\nsecurity = "none"',
    ],
)
def test_ssl_that_disagrees_with_security_is_an_error_naming_both(tmp_path, keys):
    """An explicit ssl that contradicts security is a ConfigError naming both keys."""
    error = _refused(tmp_path, _smtp(extra=keys))
    assert "smtp[primary]" in str(error)
    assert "ssl" in str(error)
    assert "security" in str(error)


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        (
            'ssl = true\nsecurity = "starttls"\nport = 465',
            "ssl = true on port 465 means security = 'tls', which contradicts "
            "security = 'starttls'",
        ),
        (
            'ssl = true\nsecurity = "tls"\nport = 587',
            "ssl = true on port 587 means security = 'starttls', which contradicts "
            "security = 'tls'",
        ),
    ],
)
def test_ssl_that_implies_another_mode_on_its_port_is_refused(tmp_path, keys, words):
    """ssl = true means tls on 465 and starttls elsewhere: a security that says
    otherwise for the port is refused naming both keys and the port."""
    error = _refused(tmp_path, _smtp(extra=keys))
    assert error.field == "smtp[primary]"
    assert words in str(error)


@pytest.mark.parametrize(
    ("text", "field", "hint"),
    [
        (
            '[smtp]\nname = "a"\nfrom_address = "a@example.com"\nserver = "s"\n',
            "smtp",
            "write [[smtp]] (two brackets) above each connection, not [smtp]",
        ),
        (
            '[openauth]\nname = "a"\n',
            "openauth",
            "write [[openauth]] (two brackets) above each service, not [openauth]",
        ),
        (
            "[[integrated_services]]\naccount_type = 'service'\n",
            "integrated_services",
            "write [integrated_services.NAME] above each, not [[integrated_services]]",
        ),
        ("[[retry]]\nmax_attempts = 3\n", "retry", "write [retry], not [[retry]]"),
    ],
)
def test_wrong_table_brackets_get_a_hint(tmp_path, text, field, hint):
    """[smtp] for [[smtp]] (and the like) is refused with the brackets to write."""
    error = _refused(tmp_path, text)
    assert error.field == field
    assert hint in str(error)


@pytest.mark.parametrize(
    ("text", "field", "guess"),
    [
        ('nmespace = "x"\n', "nmespace", "namespace"),
        ("[retyr]\nmax_attempts = 3\n", "retyr", "retry"),
        ("[retry]\nmax_atempts = 3\n", "retry.max_atempts", "max_attempts"),
        (_smtp(extra='pasword = "x"'), "smtp[primary].pasword", "password"),
        (
            OPENAUTH + _integrated() + 'client_secrt = "x"\n',
            "integrated_services.graph-mailer.client_secrt",
            "client_secret",
        ),
    ],
)
def test_unknown_key_gets_a_did_you_mean(tmp_path, text, field, guess):
    """An unknown key close to a known one is refused with that one suggested."""
    error = _refused(tmp_path, text)
    assert field in [f for f, _ in error.problems]
    assert f"unknown key (did you mean {guess!r}?)" in str(error)


def test_every_error_is_reported_one_line_each(tmp_path):
    """Several mistakes are all reported, one line each, each naming its field."""
    text = (
        'nmespace = "x"\n'
        + _smtp(extra="port = 0")
        + _smtp("backup").replace("noreply@example.com", "not an address")
    )
    error = _refused(tmp_path, text, {"MAILWORKER_BROKERURL": "x"})
    fields = [field for field, _ in error.problems]
    assert fields == [
        "MAILWORKER_BROKERURL",  # the environment first, then the file's keys
        "smtp[primary].port",
        "smtp[backup].from_address",
        "nmespace",  # unknown keys come last
    ]
    lines = str(error).splitlines()
    assert len(lines) == 4
    assert all(
        line.startswith(f"{field}: ") for line, field in zip(lines, fields, strict=True)
    )


def test_unknown_security_value_is_refused(tmp_path):
    """A security mode other than none, starttls or tls is a ConfigError naming the key."""
    error = _refused(tmp_path, _smtp(extra='security = "ssl"'))
    assert error.field == "smtp[primary].security"


def test_certificates_are_verified_by_default(tmp_path):
    """verify_certificates is on unless one connection opts out."""
    text = _smtp("first") + _smtp("second", "verify_certificates = false")
    first, second = _load(tmp_path, text).smtp
    assert first.verify_certificates is True
    assert second.verify_certificates is False


# ---------------------------------------------------------------- unknown keys and names


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("colour = 'blue'\n" + _smtp(), "colour"),
        (_smtp() + "\n[limits]\nmax_size = 10\n", "limits.max_size"),
        (_smtp(extra="hostname = 'x'"), "smtp[primary].hostname"),
        (_smtp() + "\n[retry]\nattempts = 3\n", "retry.attempts"),
    ],
)
def test_unknown_key_is_an_error_naming_the_key(tmp_path, text, field):
    """An unknown key at the top level, in a section or in an [[smtp]] entry is refused."""
    error = _refused(tmp_path, text)
    assert error.field == field
    assert field in str(error)
    assert "unknown key" in str(error)


@pytest.mark.parametrize("name", ["Primary", "bad name", "bad.name", "", "relais-été"])
def test_invalid_smtp_service_name_is_refused(tmp_path, name):
    """An [[smtp]] name outside [a-z0-9_-]+ is a ConfigError naming the name key."""
    error = _refused(tmp_path, _smtp(name))
    assert error.field == f"smtp[{name}].name"


def test_invalid_openauth_service_name_is_refused(tmp_path):
    """An [[openauth]] name outside [a-z0-9_-]+ is a ConfigError naming the entry."""
    text = (
        OPENAUTH.replace('"o365"', '"O365"') + _integrated() + 'client_secret = "x"\n'
    )
    error = _refused(tmp_path, text)
    assert error.field == "openauth[O365].name"


def test_invalid_integrated_service_name_is_refused(tmp_path):
    """An [integrated_services.NAME] whose NAME breaks the rule is refused, naming it."""
    error = _refused(tmp_path, _integrated('"Graph Mailer"') + 'client_secret = "x"\n')
    assert "integrated_services" in str(error)
    assert "Graph Mailer" in str(error)


@pytest.mark.parametrize(
    "text",
    [
        _smtp("relay") + _smtp("relay"),
        OPENAUTH.replace('"o365"', '"relay"')
        + _integrated()
        + 'client_secret = "x"\n'
        + _smtp("relay"),
    ],
    ids=["smtp-twice", "openauth-and-smtp"],
)
def test_duplicate_service_name_is_refused(tmp_path, text):
    """Two services with the same name, in one section or across sections, are refused."""
    error = _refused(tmp_path, text)
    assert "'relay'" in str(error)
    assert "twice" in str(error)


def test_valid_names_are_kept_in_delivery_order(tmp_path):
    """Valid names load; OpenAuth services come before SMTP connections, disabled ones out."""
    text = (
        _smtp("eu-relay_2")
        + _smtp("off", "enabled = false")
        + OPENAUTH
        + _integrated()
        + 'client_secret = "x"\n'
    )
    settings = _load(tmp_path, text)
    assert settings.service_names == ["o365", "eu-relay_2", "off"]
    assert settings.delivery_order == ["o365", "eu-relay_2"]


# ---------------------------------------------------------------- secrets


def test_secret_file_is_read_and_trimmed(tmp_path):
    """read_secret returns the content of a *_file path without surrounding whitespace."""
    secret = tmp_path / "smtp-password"
    secret.write_text("  s3cret-from-file\n")
    value = read_secret(None, secret, "smtp[primary].password_file")
    assert isinstance(value, SecretStr)
    assert value.get_secret_value() == "s3cret-from-file"


def test_password_file_from_the_config_is_read(tmp_path):
    """A password_file named in the TOML file yields the password through read_secret."""
    secret = tmp_path / "smtp-password"
    secret.write_text("pw-in-a-file\n")
    text = _smtp(extra=f'username = "mailer"\npassword_file = "{secret}"')
    [conn] = _load(tmp_path, text).smtp
    value = read_secret(
        conn.password, conn.password_file, "smtp[primary].password_file"
    )
    assert value is not None
    assert value.get_secret_value() == "pw-in-a-file"


def test_inline_secret_is_returned_as_given(tmp_path):
    """An inline secret is returned unchanged and no file is needed."""
    value = read_secret(SecretStr("inline"), None, "smtp[primary].password")
    assert value is not None
    assert value.get_secret_value() == "inline"
    assert read_secret(None, None, "smtp[primary].password") is None


def test_missing_secret_file_is_an_error_naming_the_field(tmp_path):
    """A *_file path that does not exist is a ConfigError naming the field."""
    with pytest.raises(ConfigError) as info:
        read_secret(None, tmp_path / "absent", "smtp[primary].password_file")
    assert info.value.field == "smtp[primary].password_file"
    assert "smtp[primary].password_file" in str(info.value)


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_empty_secret_file_is_an_error_naming_the_field(tmp_path, content):
    """An empty (or whitespace-only) secret file is a ConfigError naming the field."""
    secret = tmp_path / "graph-secret"
    secret.write_text(content)
    with pytest.raises(ConfigError) as info:
        read_secret(None, secret, "integrated_services.graph-mailer.client_secret_file")
    assert info.value.field == "integrated_services.graph-mailer.client_secret_file"


def test_password_and_password_file_together_are_refused(tmp_path):
    """Giving both password and password_file is a ConfigError naming both keys."""
    text = _smtp(
        extra='username = "mailer"\npassword = "pw"\npassword_file = "/run/secrets/x"'
    )
    error = _refused(tmp_path, text)
    assert "smtp[primary]" in str(error)
    assert "password_file" in str(error)
    assert "password " in str(error)


@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\x1b", "\x7f", "\u2028"])
def test_control_character_in_from_display_name_is_refused(tmp_path, char):
    """from_display_name goes into the From header: a control character is refused."""
    escaped = f"\\u{ord(char):04x}"  # TOML's escape of the character
    text = _smtp(extra=f'from_display_name = "Notify{escaped}"')
    error = _refused(tmp_path, text)
    assert error.field == "smtp[primary].from_display_name"
    assert "control character" in str(error)


# ---------------------------------------------------------------- environment


def test_broker_url_variable_overrides_the_file(tmp_path):
    """MAILWORKER_BROKER_URL wins over broker_url in the file."""
    text = 'broker_url = "redis://file-host:6379/0"\n' + _smtp()
    env = {"MAILWORKER_BROKER_URL": "redis://env-host:6380/2"}
    settings = _load(tmp_path, text, env)
    assert settings.broker_url.get_secret_value() == "redis://env-host:6380/2"


def test_broker_url_variable_from_the_process_environment(tmp_path, clean_env):
    """MAILWORKER_BROKER_URL set in the real environment is read when environ is not given."""
    clean_env.setenv("MAILWORKER_BROKER_URL", "redis://env-host:6380/3")
    path = tmp_path / "mailworker.toml"
    path.write_text('broker_url = "redis://file-host:6379/0"\n')
    assert (
        load_settings(path).broker_url.get_secret_value() == "redis://env-host:6380/3"
    )


def test_config_variable_names_the_file(tmp_path, clean_env):
    """MAILWORKER_CONFIG names the configuration file to load."""
    path = tmp_path / "elsewhere.toml"
    path.write_text(textwrap.dedent(_smtp("from-config-var")))
    clean_env.setenv("MAILWORKER_CONFIG", str(path))
    assert load_settings().service_names == ["from-config-var"]


def test_mailworker_toml_in_the_working_directory_is_the_default(tmp_path, clean_env):
    """Without MAILWORKER_CONFIG, ./mailworker.toml is loaded when present."""
    (tmp_path / "mailworker.toml").write_text(textwrap.dedent(_smtp("from-cwd")))
    clean_env.chdir(tmp_path)
    assert load_settings().service_names == ["from-cwd"]


def test_config_variable_naming_a_missing_file_is_an_error(tmp_path):
    """A MAILWORKER_CONFIG that names no file is a ConfigError naming the variable."""
    env = {"MAILWORKER_CONFIG": str(tmp_path / "absent.toml")}
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert info.value.field == "MAILWORKER_CONFIG"


def test_invalid_toml_is_a_config_error(tmp_path):
    """A file that is not TOML is a ConfigError naming the file."""
    error = _refused(tmp_path, "this is = = not toml\n")
    assert "mailworker.toml" in str(error)


def test_named_service_variable_sets_one_key(tmp_path, clean_env):
    """MAILWORKER_SMTP__PRIMARY__PASSWORD sets the password of [[smtp]] "primary" only."""
    clean_env.setenv("MAILWORKER_SMTP__PRIMARY__PASSWORD", "pw-from-env")
    clean_env.setenv("MAILWORKER_SMTP__PRIMARY__PORT", "2525")
    path = tmp_path / "mailworker.toml"
    text = _smtp(extra='username = "mailer"') + _smtp("backup")
    path.write_text(textwrap.dedent(text))
    primary, backup = load_settings(path).smtp
    assert primary.password is not None
    assert primary.password.get_secret_value() == "pw-from-env"
    assert primary.port == 2525
    assert backup.password is None
    assert backup.port is None


def test_service_name_with_dash_is_written_with_underscore(tmp_path):
    """A name with '-' is upper-cased and written with '_' in the variable."""
    text = (
        _smtp("eu-relay", 'username = "mailer"')
        + OPENAUTH
        + _integrated("graph-mailer")
    )
    env = {
        "MAILWORKER_SMTP__EU_RELAY__PASSWORD": "relay-pw",
        "MAILWORKER_INTEGRATED_SERVICES__GRAPH_MAILER__CLIENT_SECRET": "graph-cs",
    }
    settings = _load(tmp_path, text, env)
    [conn] = settings.smtp
    assert conn.password is not None
    assert conn.password.get_secret_value() == "relay-pw"
    secret = settings.integrated_services["graph-mailer"].client_secret
    assert secret is not None
    assert secret.get_secret_value() == "graph-cs"


def test_list_value_is_written_as_json(tmp_path):
    """A list key (scopes) set through a variable is read as a JSON array."""
    text = OPENAUTH + _integrated() + 'client_secret = "x"\n'
    scopes = '["https://graph.microsoft.com/Mail.Send", "offline_access"]'
    settings = _load(tmp_path, text, {"MAILWORKER_OPENAUTH__O365__SCOPES": scopes})
    assert settings.openauth[0].scopes == [
        "https://graph.microsoft.com/Mail.Send",
        "offline_access",
    ]


@pytest.mark.parametrize(
    "variable",
    [
        "MAILWORKER_FOO",
        "MAILWORKER_BROKER",
        "MAILWORKER_LIMITS__MAX_RECIPIENTS",
        "MAILWORKER_SMTP__PRIMARY",
        "MAILWORKER_SMTP____PASSWORD",
        "MAILWORKER_SMTP__PRIMARY__PASSWORD__EXTRA",
    ],
)
def test_other_mailworker_variable_is_an_error_naming_it(tmp_path, variable):
    """Any other MAILWORKER_* variable is a ConfigError naming it, not silently ignored."""
    error = _refused(tmp_path, _smtp(), {variable: "x"})
    assert error.field == variable
    assert variable in str(error)


def test_unknown_variable_in_the_process_environment_is_an_error(tmp_path, clean_env):
    """A stray MAILWORKER_* variable in the real environment is refused by name."""
    clean_env.setenv("MAILWORKER_BROKERURL", "redis://typo:6379/0")
    path = tmp_path / "mailworker.toml"
    path.write_text(textwrap.dedent(_smtp()))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.field == "MAILWORKER_BROKERURL"


def test_variable_naming_an_absent_service_is_an_error(tmp_path):
    """A variable for a service the file does not define is a ConfigError naming it."""
    env = {"MAILWORKER_SMTP__SECONDARY__PASSWORD": "pw"}
    error = _refused(tmp_path, _smtp(), env)
    assert error.field == "MAILWORKER_SMTP__SECONDARY__PASSWORD"


def test_variable_setting_an_unknown_key_is_an_error_naming_the_variable(tmp_path):
    """A variable for a key a service does not have is refused naming the variable
    (not as an unknown key of the file), with the variable it was probably meant to be."""
    env = {"MAILWORKER_SMTP__PRIMARY__PASWORD": "x"}
    error = _refused(tmp_path, _smtp(extra='username = "mailer"'), env)
    assert error.field == "MAILWORKER_SMTP__PRIMARY__PASWORD"
    assert str(error) == (
        "MAILWORKER_SMTP__PRIMARY__PASWORD: smtp[primary].pasword: unknown key "
        "(did you mean MAILWORKER_SMTP__PRIMARY__PASSWORD?)"
    )
    assert "mailworker.toml" not in str(error)


def test_invalid_value_from_a_variable_names_the_variable(tmp_path):
    """A bad value set through a variable is refused naming the variable and the key."""
    env = {"MAILWORKER_SMTP__PRIMARY__PORT": "abc"}
    error = _refused(tmp_path, _smtp(), env)
    assert error.field == "MAILWORKER_SMTP__PRIMARY__PORT"
    assert str(error).startswith("MAILWORKER_SMTP__PRIMARY__PORT: smtp[primary].port: ")


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("MAILWORKER_BROKERURL", "MAILWORKER_BROKER_URL"),
        ("MAILWORKER_SMPT__PRIMARY__PASSWORD", "MAILWORKER_SMTP__PRIMARY__PASSWORD"),
    ],
)
def test_misspelt_variable_gets_a_did_you_mean(tmp_path, variable, meant):
    """A misspelt MAILWORKER_* variable is refused naming it and the one it resembles."""
    error = _refused(tmp_path, _smtp(), {variable: "x"})
    assert error.field == variable
    assert f"(did you mean {meant}?)" in str(error)


@pytest.mark.parametrize(
    ("secret", "file_key", "env_key", "text"),
    [
        (
            "password",
            "password_file",
            "MAILWORKER_SMTP__PRIMARY__PASSWORD",
            _smtp(extra='username = "mailer"\npassword_file = "/run/secrets/smtp"'),
        ),
        (
            "password_file",
            "password",
            "MAILWORKER_SMTP__PRIMARY__PASSWORD_FILE",
            _smtp(extra='username = "mailer"\npassword = "from-the-file"'),
        ),
        (
            "client_secret",
            "client_secret_file",
            "MAILWORKER_INTEGRATED_SERVICES__GRAPH_MAILER__CLIENT_SECRET",
            OPENAUTH + _integrated() + 'client_secret_file = "/run/secrets/graph"\n',
        ),
    ],
    ids=["password-over-file", "file-over-password", "client-secret-over-file"],
)
def test_secret_from_the_environment_replaces_the_files_other_form(
    tmp_path, secret, file_key, env_key, text
):
    """The README's example has password_file; MAILWORKER_SMTP__PRIMARY__PASSWORD still
    overrides it: a secret from the environment replaces the file's other form."""
    settings = _load(
        tmp_path, text, {env_key: "/from/env" if "FILE" in env_key else "env"}
    )
    section = (
        settings.smtp[0]
        if settings.smtp
        else settings.integrated_services["graph-mailer"]
    )
    assert getattr(section, file_key) is None
    assert getattr(section, secret) is not None


def test_both_forms_of_a_secret_from_the_environment_are_refused(tmp_path):
    """Both forms given through the environment are still 'not both'."""
    env = {
        "MAILWORKER_SMTP__PRIMARY__PASSWORD": "a",
        "MAILWORKER_SMTP__PRIMARY__PASSWORD_FILE": "/run/secrets/smtp",
    }
    error = _refused(tmp_path, _smtp(extra='username = "mailer"'), env)
    assert "not both" in str(error)


# ---------------------------------------------------------------- references


def test_openauth_referencing_a_missing_integrated_service_is_refused(tmp_path):
    """An [[openauth]] whose service names no [integrated_services.*] is a ConfigError."""
    error = _refused(tmp_path, OPENAUTH)
    assert "openauth[o365].service" in str(error)
    assert "graph-mailer" in str(error)


def test_xoauth2_smtp_referencing_a_missing_integrated_service_is_refused(tmp_path):
    """An xoauth2 [[smtp]] whose integrated_service does not exist is a ConfigError."""
    keys = 'auth = "xoauth2"\nusername = "box@example.com"\nintegrated_service = "nope"'
    error = _refused(tmp_path, _smtp(extra=keys))
    assert "smtp[primary].integrated_service" in str(error)
    assert "nope" in str(error)


@pytest.mark.parametrize("account_type", ["user", "delegated", "Service"])
def test_integrated_service_must_be_a_service_account(tmp_path, account_type):
    """An integrated service whose account_type is not "service" is refused, naming the key."""
    text = OPENAUTH + _integrated(account_type=account_type) + 'client_secret = "x"\n'
    error = _refused(tmp_path, text)
    assert error.field == "integrated_services.graph-mailer.account_type"


def test_openauth_with_its_integrated_service_loads(tmp_path):
    """A complete OpenAuth service with a service-account integrated service loads."""
    text = OPENAUTH + _integrated() + 'client_secret = "x"\n'
    settings = _load(tmp_path, text)
    [service] = settings.openauth
    assert service.service == "graph-mailer"
    assert settings.integrated_services["graph-mailer"].account_type == "service"


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("7d", 604800.0),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("45", 45.0),
        (12, 12.0),
        (0.25, 0.25),
    ],
)
def test_duration_is_parsed_to_seconds(text, seconds):
    """Durations with ms, s, m, h or d (or plain seconds) become seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "value",
    ["", "abc", "5x", "-5s", "5 minutes", "1.5.2s", "s", "1e3s", True, None, [], -1],
)
def test_bad_duration_is_refused(value):
    """Anything that is not a non-negative duration raises ValueError."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_durations_in_the_file_become_seconds(tmp_path):
    """Durations written in every section of the file are loaded as seconds."""
    text = _smtp(extra='timeout = "500ms"') + textwrap.dedent(
        """
        [retry]
        min_backoff = "30s"
        max_backoff = "1h"
        max_age = "7d"
        [breaker]
        cooldown = "5m"
        [status]
        ttl = "7d"
        idempotency_ttl = "24h"
        """
    )
    settings = _load(tmp_path, text)
    assert settings.smtp[0].timeout == 0.5
    assert (settings.retry.min_backoff, settings.retry.max_backoff) == (30.0, 3600.0)
    assert settings.retry.max_age == 604800.0
    assert settings.breaker.cooldown == 300.0
    assert (settings.status.ttl, settings.status.idempotency_ttl) == (604800.0, 86400.0)


def test_bad_duration_in_the_file_names_the_key(tmp_path):
    """A malformed duration in the file is a ConfigError naming its key."""
    error = _refused(tmp_path, _smtp() + '\n[breaker]\ncooldown = "5 minutes"\n')
    assert error.field == "breaker.cooldown"


@pytest.mark.parametrize("literal", ["nan", "inf"])
def test_non_finite_duration_in_the_file_is_refused(tmp_path, literal):
    """TOML's nan and inf are not durations: the key is refused."""
    error = _refused(tmp_path, _smtp() + f"\n[breaker]\ncooldown = {literal}\n")
    assert error.field == "breaker.cooldown"


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "redis://:hunter2@redis.internal:6379/0",
            "redis://:***@redis.internal:6379/0",
        ),
        ("redis://app:hunter2@redis.internal/1", "redis://app:***@redis.internal/1"),
        ("rediss://app:hun%40ter2@[::1]:6380/0", "rediss://app:***@[::1]:6380/0"),
        ("redis://redis.internal:6379/0", "redis://redis.internal:6379/0"),
        ("redis://app@redis.internal:6379/0", "redis://app@redis.internal:6379/0"),
        # unencoded characters a URL parser takes for the end of the user info
        ("redis://:pa#ss@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://u:pa/ss@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://u:p?w@d@h:6379/0", "redis://u:***@h:6379/0"),
        (
            "redis+sentinel://u:p?w@h1:26379,h2/svc?sentinel_password=s3",
            "redis+sentinel://u:***@h1:26379,h2/svc?sentinel_password=***",
        ),
    ],
)
def test_public_url_masks_the_password(url, shown):
    """public_url replaces a password in a redis URL with *** and keeps the rest."""
    assert public_url(url) == shown


def test_public_url_masks_a_password_in_the_query():
    """A password given as ?password= in a redis URL is masked too."""
    assert "hunter2" not in public_url("redis://redis.internal:6379/0?password=hunter2")


def test_repr_and_str_of_settings_show_no_secret(tmp_path):
    """repr() and str() of Settings and its parts never contain a password or secret."""
    text = (
        'broker_url = "redis://:broker-pw-1@redis.internal:6379/0"\n'
        + _smtp(extra='username = "mailer"\npassword = "smtp-pw-2"')
        + _smtp("backup", 'username = "mailer"')
        + OPENAUTH
        + _integrated()
        + 'client_secret = "client-secret-3"\n'
    )
    env = {"MAILWORKER_SMTP__BACKUP__PASSWORD": "env-pw-4"}
    settings = _load(tmp_path, text, env)
    shown = [
        repr(settings),
        str(settings),
        f"{settings}",
        repr(settings.smtp[0]),
        str(settings.smtp[0]),
        repr(settings.smtp[1]),
        repr(settings.integrated_services),
        str(settings.integrated_services["graph-mailer"]),
    ]
    for secret in ("broker-pw-1", "smtp-pw-2", "client-secret-3", "env-pw-4"):
        assert not any(secret in text for text in shown), secret
    assert "mailer" in repr(settings.smtp[0])  # the repr is real, not blank
