"""The OpenAPI document is honest: property-based runs find no 5xx and no undocumented
answer, every documented status is reached, and docs/openapi.json is current."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from common.sockets import free_port
from worker.api.openapi import write_document

pytestmark = pytest.mark.slow
DOCS = Path(__file__).parent.parent / "docs" / "openapi.json"


def test_docs_openapi_json_is_the_apps_document(tmp_path):
    """Regenerate it with `python -m worker.api.openapi` when this fails."""
    fresh = tmp_path / "openapi.json"
    write_document(str(fresh))
    assert orjson.loads(DOCS.read_bytes()) == orjson.loads(fresh.read_bytes())


def test_the_served_document_is_the_written_one(api_server, make_settings):
    """GET /openapi.json (no key needed) serves the same document."""
    api = api_server(make_settings())
    served = httpx.get(f"{api.url}/openapi.json").json()
    assert served == orjson.loads(DOCS.read_bytes())


def test_generated_requests_get_only_documented_answers(api_server, make_settings):
    """Schemathesis against the app's own document: no 5xx, statuses and bodies as documented.

    Not checked: that every schema-valid job is accepted. JSON Schema cannot say "text or
    html", "at least one recipient" or what an address is; those are 422 naming the field.
    """
    api = api_server(make_settings(api={"rate_limit": "100000/s", "max_batch": 20}))
    key = api.key("send", "read", "ops")
    schema = schemathesis.openapi.from_dict(httpx.get(f"{api.url}/openapi.json").json())
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=15,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case):
            case.call_and_validate(
                base_url=api.url,
                headers={"Authorization": f"Bearer {key}"},
                excluded_checks=[positive_data_acceptance],
            )

        check()


def _documented() -> set[tuple[str, str, int]]:
    doc = orjson.loads(DOCS.read_bytes())
    return {
        (method.upper(), path, int(status))
        for path, operations in doc["paths"].items()
        for method, operation in operations.items()
        for status in operation["responses"]
    }


JOB = {"to": "ann@example.com", "subject": "s", "text": "t"}
LONG = "a" * 320


def _requests(letter: str, poison: str, doomed: str):
    """(method, documented path, url, keyword arguments, scope) per reachable status."""
    json = {"content-type": "application/json"}
    n, b, s = (
        "/v1/notifications",
        "/v1/notifications/batch",
        "/v1/notifications/{job_id}",
    )
    d, dl = "/v1/dead-letters", "/v1/dead-letters/{letter_id}"
    rq, rf = "/v1/dead-letters/{letter_id}/requeue", "/v1/dead-letters/requeue"
    idem = {"Idempotency-Key": "i"}
    big = {"content": b"[" + b" " * 9000 + b"]", "headers": json}
    return {
        ("GET", "/healthz", 200): ("/healthz", {}),
        ("GET", "/readyz", 200): ("/readyz", {}),
        ("POST", n, 202): (n, {"json": JOB}),
        ("POST", n, 400): (n, {"content": b"{", "headers": json}),
        ("POST", n, 409): (n, {"json": {**JOB, "subject": "x"}, "headers": idem}),
        ("POST", n, 413): (n, big),
        ("POST", n, 415): (n, {"content": b"{}", "headers": {"content-type": "text/plain"}}),
        ("POST", n, 422): (n, {"json": {"to": 1}}),
        ("POST", b, 200): (b, {"json": [JOB]}),
        ("POST", b, 400): (b, {"content": b"[", "headers": json}),
        ("POST", b, 413): (b, {"json": [JOB] * 4}),
        ("POST", b, 415): (b, {"content": b"[]", "headers": {"content-type": "text/csv"}}),
        ("POST", b, 422): (b, {"json": {"not": "a list"}}),
        ("GET", s, 200): (None, {}),  # filled in below: a real job
        ("GET", s, 400): (f"{n}/{LONG}", {}),
        ("GET", s, 404): (f"{n}/00000000-0000-4000-8000-000000000000", {}),
        ("GET", d, 200): (d, {}),
        ("GET", d, 400): (d, {"params": {"since": "yesterday-ish"}}),
        ("GET", dl, 200): (f"{d}/{letter}", {}),
        ("GET", dl, 400): (f"{d}/{LONG}", {}),
        ("GET", dl, 404): (f"{d}/no-such-letter", {}),
        ("POST", rq, 202): (f"{d}/{letter}/requeue", {}),
        ("POST", rq, 400): (f"{d}/{LONG}/requeue", {}),
        ("POST", rq, 404): (f"{d}/no-such-letter/requeue", {}),
        ("POST", rq, 409): (f"{d}/{poison}/requeue", {}),
        ("DELETE", dl, 204): (f"{d}/{doomed}", {}),
        ("DELETE", dl, 400): (f"{d}/{LONG}", {}),
        ("DELETE", dl, 404): (f"{d}/{doomed}", {}),
        ("POST", rf, 200): (rf, {"json": {"reason": "expired"}}),
        ("POST", rf, 400): (rf, {"json": {"since": "whenever"}}),
        ("POST", rf, 413): (rf, big),
        ("POST", rf, 415): (rf, {"content": b"{}", "headers": {"content-type": "text/plain"}}),
        ("POST", rf, 422): (rf, {"json": {"colour": "red"}}),
        ("GET", "/v1/events", 200): ("/v1/events", {}),
        ("GET", "/v1/events", 400): ("/v1/events", {"params": {"after": "x"}}),
    }  # fmt: skip


def test_every_documented_status_is_reachable(
    api_server, make_settings, redis_client, redis_url
):
    """Each (route, status) of the document is answered by a request made for it."""
    from worker.deadletter import DeadLetters
    from worker.status import StatusStore

    settings = make_settings(
        api={"max_batch": 3, "max_body_bytes": 4096, "rate_limit": "1/h"}
    )
    api = api_server(settings)
    ns = settings.namespace
    dead = DeadLetters(redis_client, namespace=ns, ttl=3600)
    dead.add_poison("poison-1", b"\xff not json", "not JSON", "mail")
    dead.add_poison("poison-2", b"\xff not json", "not JSON", "mail")
    with api.http(api.key("send", "read", "ops", name="all")) as http:
        job_id = http.post(
            "/v1/notifications", json={**JOB, "idempotency_key": "i"}
        ).json()["id"]
    # A dead letter that can be requeued: the job's record and message, as the worker
    # keeps them when it gives up.
    letter = job_id
    payload = redis_client.hget(f"{ns}:mail.msgs", redis_client.lindex(f"{ns}:mail", 0))
    StatusStore(redis_client, namespace=ns, ttl=3600).write(
        letter, {"state": "dead", "reason": "validation", "dead_at": "2026-12-02T00:00:00Z"},
        dead_payload=payload,
    )  # fmt: skip
    assert payload and DeadLetters(redis_client, namespace=ns, ttl=3600).show(letter)
    table = _requests(letter, "poison-1", "poison-2")
    table[("GET", "/v1/notifications/{job_id}", 200)] = (
        f"/v1/notifications/{job_id}",
        {},
    )
    seen: set[tuple[str, str, int]] = set()
    for (method, path, status), (url, options) in sorted(table.items(), key=_order):
        with api.http(api.key("send", "read", "ops")) as http:
            answer = http.request(method, url, **options)
        assert answer.status_code == status, (method, url, answer.text)
        seen.add((method, path, status))
    seen |= _auth_statuses(api, settings, _documented())
    assert _documented() - seen == set()


def _order(item):
    # DELETE 204 before DELETE 404 (the same letter), the rest in any order.
    (method, path, status), _ = item
    return (path, method, status)


def _auth_statuses(api, settings, documented):
    """401, 403 and 429 on every keyed route; 503 everywhere with the broker gone."""
    import redis as redis_lib

    from tests.support.api import ApiServer

    seen = set()
    keyed = [(m, p) for m, p, s in documented if s == 401]
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead_broker = redis_lib.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    gone = ApiServer(settings, dead_broker, mount=False).start()
    try:
        for method, path in keyed:
            url = path.replace("{job_id}", "x").replace("{letter_id}", "x")
            with api.http() as http:
                assert http.request(method, url).status_code == 401
            scope = "ops" if method == "DELETE" or "requeue" in path else "read"
            scope = (
                "send"
                if path.startswith("/v1/notifications") and method == "POST"
                else scope
            )
            other = next(s for s in ("send", "read", "ops") if s != scope)
            with api.http(api.key(other)) as http:
                assert http.request(method, url).status_code == 403
            with api.http(api.key(scope)) as http:
                http.request(method, url)  # the one request of the hour
                assert http.request(method, url).status_code == 429
            with gone.http("mwk_any") as http:
                assert http.request(method, url).status_code == 503
            seen |= {(method, path, s) for s in (401, 403, 429, 503)}
        with gone.http() as http:
            assert http.get("/readyz").status_code == 503
        seen.add(("GET", "/readyz", 503))
    finally:
        gone.stop()
    return seen
