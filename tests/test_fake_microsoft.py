"""The fake Entra ID + Graph server works with the real msal and requests libraries."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msal
import pytest
import requests

from tests.support.certificates import self_signed
from tests.support.fake_microsoft import FakeMicrosoft

GRAPH_SCOPE = ["https://graph.microsoft.com/.default"]
MAILBOX = "svc@contoso.com"
MESSAGE: dict[str, Any] = {
    "message": {
        "subject": "Hello",
        "body": {"contentType": "Text", "content": "Hi there"},
        "toRecipients": [{"emailAddress": {"address": "someone@example.com"}}],
    },
    "saveToSentItems": False,
}


@pytest.fixture
def http_session(ca_file: Path) -> Iterator[requests.Session]:
    """MSAL's http_client. trust_env=False: REQUESTS_CA_BUNDLE would beat Session.verify."""
    with requests.Session() as session:
        session.trust_env = False
        session.verify = str(ca_file)
        yield session


def make_app(
    fake: FakeMicrosoft, session: requests.Session, credential: object = None
) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        fake.client_id,
        client_credential=fake.client_secret if credential is None else credential,
        authority=f"{fake.url}/{fake.tenant}",
        instance_discovery=False,
        http_client=session,
    )


def send_mail(
    fake: FakeMicrosoft,
    ca_file: Path,
    token: str,
    *,
    mime: bytes | None = None,
    content_type: str = "text/plain",
) -> requests.Response:
    """POST sendMail: the JSON MESSAGE, or ``mime`` as the raw request body."""
    url = f"{fake.url}/v1.0/users/{MAILBOX}/sendMail"
    headers = {"Authorization": f"Bearer {token}"}
    if mime is None:
        return requests.post(
            url, json=MESSAGE, headers=headers, verify=str(ca_file), timeout=10
        )
    headers["Content-Type"] = content_type
    return requests.post(
        url, data=mime, headers=headers, verify=str(ca_file), timeout=10
    )


# ---------------------------------------------------------------- token endpoint


def test_msal_secret_gets_a_token_once_then_from_cache(
    fake_microsoft: FakeMicrosoft, http_session: requests.Session
) -> None:
    app = make_app(fake_microsoft, http_session)
    assert fake_microsoft.discovery_requests == 1  # MSAL's constructor fetched it

    first = app.acquire_token_for_client(scopes=GRAPH_SCOPE)
    second = app.acquire_token_for_client(scopes=GRAPH_SCOPE)

    assert first["token_source"] == "identity_provider"
    assert second["token_source"] == "cache"
    assert first["access_token"] == second["access_token"]
    assert fake_microsoft.tokens_issued == [first["access_token"]]
    assert first["expires_in"] == fake_microsoft.expires_in
    (form,) = fake_microsoft.token_requests
    assert form["grant_type"] == "client_credentials"
    assert form["client_id"] == fake_microsoft.client_id
    assert form["scope"] == "https://graph.microsoft.com/.default"
    assert form["client_secret"] == fake_microsoft.client_secret


def test_wrong_secret_is_invalid_client(
    fake_microsoft: FakeMicrosoft, http_session: requests.Session
) -> None:
    app = make_app(fake_microsoft, http_session, credential="not-the-secret")

    result = app.acquire_token_for_client(scopes=GRAPH_SCOPE)

    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]
    assert result["error_description"].startswith("AADSTS7000215:")
    assert fake_microsoft.tokens_issued == []


def test_scope_is_recorded_per_token(
    fake_microsoft: FakeMicrosoft, http_session: requests.Session
) -> None:
    app = make_app(fake_microsoft, http_session)

    token = app.acquire_token_for_client(scopes=[f"{fake_microsoft.url}/.default"])
    bad = app.acquire_token_for_client(scopes=["https://graph.microsoft.com/Mail.Send"])

    assert fake_microsoft.token_scopes[token["access_token"]] == (
        f"{fake_microsoft.url}/.default"
    )
    assert bad["error"] == "invalid_scope"


def test_certificate_credential_is_accepted_after_accept_certificate(
    fake_microsoft: FakeMicrosoft, http_session: requests.Session
) -> None:
    key_pem, cert_pem = self_signed()
    credential = {"private_key": key_pem, "public_certificate": cert_pem}
    app = make_app(fake_microsoft, http_session, credential=credential)

    refused = app.acquire_token_for_client(scopes=GRAPH_SCOPE)
    fake_microsoft.accept_certificate(cert_pem)
    granted = app.acquire_token_for_client(scopes=GRAPH_SCOPE)

    assert refused["error"] == "invalid_client"
    assert refused["error_codes"] == [700027]
    assert granted["token_source"] == "identity_provider"
    assert fake_microsoft.tokens_issued == [granted["access_token"]]
    form = fake_microsoft.token_requests[-1]
    assert "client_secret" not in form
    assert form["client_assertion_type"] == (
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    )
    (assertion,) = fake_microsoft.client_assertions
    assert assertion["header"]["alg"] == "PS256"
    assert "x5t#S256" in assertion["header"]
    assert assertion["claims"]["aud"] == fake_microsoft.token_endpoint


def test_assertion_signed_by_another_key_is_refused(
    fake_microsoft: FakeMicrosoft, http_session: requests.Session
) -> None:
    _, accepted_cert = self_signed()
    other_key, _ = self_signed()
    fake_microsoft.accept_certificate(accepted_cert)
    # MSAL derives x5t#S256 from public_certificate, so the thumbprint matches but the
    # signature (made with another key) does not.
    app = make_app(
        fake_microsoft,
        http_session,
        credential={"private_key": other_key, "public_certificate": accepted_cert},
    )

    result = app.acquire_token_for_client(scopes=GRAPH_SCOPE)

    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700027]
    assert fake_microsoft.tokens_issued == []


def test_unknown_tenant_fails_discovery_and_token(
    fake_microsoft: FakeMicrosoft, http_session: requests.Session, ca_file: Path
) -> None:
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        msal.ConfidentialClientApplication(
            fake_microsoft.client_id,
            client_credential=fake_microsoft.client_secret,
            authority=f"{fake_microsoft.url}/no-such-tenant",
            instance_discovery=False,
            http_client=http_session,
        )
    reply = requests.post(
        f"{fake_microsoft.url}/no-such-tenant/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "client_id": "x", "scope": "y"},
        verify=str(ca_file),
        timeout=10,
    )
    assert reply.status_code == 400
    assert reply.json()["error"] == "invalid_request"
    assert reply.json()["error_codes"] == [90002]


def test_scripted_token_replies_come_first(
    fake_microsoft: FakeMicrosoft, http_session: requests.Session
) -> None:
    fake_microsoft.token_responses.append(
        (429, {"Retry-After": "1"}, {"error": "temporarily_unavailable"})
    )
    app = make_app(fake_microsoft, http_session)

    throttled = app.acquire_token_for_client(scopes=GRAPH_SCOPE)

    assert throttled["error"] == "temporarily_unavailable"
    assert len(fake_microsoft.token_requests) == 1
    assert not fake_microsoft.token_responses


# ---------------------------------------------------------------- Graph sendMail


def test_send_mail_json_with_an_msal_token(
    fake_microsoft: FakeMicrosoft, http_session: requests.Session, ca_file: Path
) -> None:
    token = make_app(fake_microsoft, http_session).acquire_token_for_client(
        scopes=GRAPH_SCOPE
    )["access_token"]

    reply = send_mail(fake_microsoft, ca_file, token)

    assert reply.status_code == 202
    assert reply.content == b""
    (sent,) = fake_microsoft.sent
    assert sent["mailbox"] == MAILBOX
    assert sent["content_type"].startswith("application/json")
    assert sent["json"] == MESSAGE
    assert sent["mime"] is None
    assert sent["authorization_token"] == token
    assert fake_microsoft.requests_seen == 1


def test_send_mail_mime(fake_microsoft: FakeMicrosoft, ca_file: Path) -> None:
    token = fake_microsoft.issue_token()
    mime = b"From: a@contoso.com\r\nTo: b@example.com\r\nSubject: x\r\n\r\nbody\r\n"

    ok = send_mail(
        fake_microsoft,
        ca_file,
        token,
        mime=base64.b64encode(mime),
    )
    bad = send_mail(
        fake_microsoft,
        ca_file,
        token,
        mime=b"not base64!",
    )
    too_big = send_mail(
        fake_microsoft,
        ca_file,
        token,
        mime=b"A" * (4 * 1024 * 1024 + 4),
    )

    assert ok.status_code == 202
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "ErrorMimeContentInvalidBase64String"
    assert too_big.status_code == 413
    assert [s["mime"] for s in fake_microsoft.sent] == [mime]
    assert fake_microsoft.requests_seen == 3


def test_revoked_and_unknown_tokens_get_401(
    fake_microsoft: FakeMicrosoft, http_session: requests.Session, ca_file: Path
) -> None:
    app = make_app(fake_microsoft, http_session)
    token = app.acquire_token_for_client(scopes=GRAPH_SCOPE)["access_token"]
    fake_microsoft.revoke_all_tokens()

    revoked = send_mail(fake_microsoft, ca_file, token)
    unknown = send_mail(fake_microsoft, ca_file, "made-up")
    app.remove_tokens_for_client()
    fresh = app.acquire_token_for_client(scopes=GRAPH_SCOPE)["access_token"]
    accepted = send_mail(fake_microsoft, ca_file, fresh)

    assert revoked.status_code == 401
    assert revoked.json()["error"]["code"] == "InvalidAuthenticationToken"
    assert unknown.status_code == 401
    assert accepted.status_code == 202
    assert fresh != token
    assert [s["authorization_token"] for s in fake_microsoft.sent] == [fresh]
    assert fake_microsoft.requests_seen == 3


def test_scripted_graph_replies_in_order(
    fake_microsoft: FakeMicrosoft, ca_file: Path
) -> None:
    token = fake_microsoft.issue_token()
    fake_microsoft.graph_responses.extend(
        [
            (429, {"Retry-After": "7"}, {"error": {"code": "TooManyRequests"}}),
            (503, None, {"error": {"code": "serviceNotAvailable"}}),
        ]
    )

    replies = [send_mail(fake_microsoft, ca_file, token) for _ in range(3)]

    assert [r.status_code for r in replies] == [429, 503, 202]
    assert replies[0].headers["Retry-After"] == "7"
    assert replies[1].json()["error"]["code"] == "serviceNotAvailable"
    assert len(fake_microsoft.sent) == 1
    assert fake_microsoft.requests_seen == 3


def test_max_in_flight_counts_concurrent_requests(
    fake_microsoft: FakeMicrosoft, ca_file: Path
) -> None:
    token = fake_microsoft.issue_token()
    fake_microsoft.delay = 0.3

    with ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(
            pool.map(lambda _: send_mail(fake_microsoft, ca_file, token), range(4))
        )

    assert [r.status_code for r in replies] == [202] * 4
    assert fake_microsoft.max_in_flight == 4
    assert fake_microsoft.in_flight == 0


def test_other_paths_are_404(fake_microsoft: FakeMicrosoft, ca_file: Path) -> None:
    reply = requests.get(
        f"{fake_microsoft.url}/v1.0/me", verify=str(ca_file), timeout=10
    )

    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "ResourceNotFound"
