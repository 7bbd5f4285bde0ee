"""The HTTP API over real HTTP: enqueue, batches, status, auth, limits and bad input."""

from __future__ import annotations

import socket
import ssl

import httpx
import orjson
import pytest
from structlog.testing import capture_logs

from common.keys import status_key

PROBLEM = "application/problem+json"
JOB = {"to": "ann@example.com", "subject": "Task 4711", "text": "Please approve."}


@pytest.fixture
def api(api_server, make_settings):
    """An API with small caps, so the limits are reached with small requests."""
    return api_server(
        make_settings(
            api={"max_batch": 3, "max_body_bytes": 4096, "rate_limit": "1000/s"}
        )
    )


def _problem(response, status, field=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["type"].startswith(
        "urn:mailworker:problem:"
    )
    assert body["title"] and body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body


def test_a_notification_is_enqueued_and_its_record_read(api, redis_client):
    """POST gives 202 and the job id; GET gives the record the worker keeps."""
    key = api.key("send", "read")
    with api.http(key) as http:
        created = http.post("/v1/notifications", json=JOB)
        assert created.status_code == 202
        job_id = created.json()["id"]
        assert created.headers["location"] == f"/v1/notifications/{job_id}"
        record = http.get(f"/v1/notifications/{job_id}")
    assert record.status_code == 200
    assert record.json()["id"] == job_id and record.json()["state"] == "queued"
    assert redis_client.exists(status_key(api.settings.namespace, job_id))


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"to": "ann@example.com", "subject": ', 400, "body"),
        (
            b'{"to": "ann@example.com", "subject": "s", "text": "t", "colour": 1}',
            422,
            "colour",
        ),
        (b'{"to": "ann@example.com", "subject": 5, "text": "t"}', 422, "subject"),
        (b'{"to": "ann@example", "subject": "s", "text": "t"}', 422, "to[0].address"),
        (b'{"to": "ann@example.com", "subject": "s"}', 422, "text"),
        (b"[1, 2]", 422, "job"),
    ],
    ids=[
        "bad-json",
        "wrong-field",
        "wrong-type",
        "bad-address",
        "no-body",
        "not-object",
    ],
)
def test_bad_input_is_a_problem_naming_the_field(api, body, status, field):
    """Every refusal is application/problem+json whose errors name the field."""
    with api.http(api.key("send")) as http:
        response = http.post(
            "/v1/notifications",
            content=body,
            headers={"content-type": "application/json"},
        )
    _problem(response, status, field)


def test_another_media_type_is_refused(api):
    """A body that is not JSON by its Content-Type is 415."""
    with api.http(api.key("send")) as http:
        response = http.post(
            "/v1/notifications", content=b"to=a", headers={"content-type": "text/plain"}
        )
    _problem(response, 415, "Content-Type")


def test_same_idempotency_key_and_body_give_the_same_id_another_body_409(api):
    """Idempotency-Key is the job's key: replayed it answers the first id."""
    with api.http(api.key("send")) as http:
        headers = {"Idempotency-Key": "order-4711"}
        first = http.post("/v1/notifications", json=JOB, headers=headers)
        again = http.post("/v1/notifications", json=JOB, headers=headers)
        other = http.post(
            "/v1/notifications", json={**JOB, "subject": "else"}, headers=headers
        )
        differs = http.post(
            "/v1/notifications",
            json={**JOB, "idempotency_key": "order-4712"},
            headers=headers,
        )
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    _problem(other, 409, "idempotency_key")
    _problem(differs, 422, "idempotency_key")


def test_no_key_or_an_unknown_key_is_401_and_says_nothing_of_keys(api):
    """Neither answer tells whether a key exists."""
    api.key("send", name="engine")
    with api.http() as http:
        none = http.post("/v1/notifications", json=JOB)
        unknown = http.post(
            "/v1/notifications", json=JOB, headers={"Authorization": "Bearer mwk_nope"}
        )
        basic = http.post(
            "/v1/notifications", json=JOB, headers={"Authorization": "Basic ZW5naW5l"}
        )
    bodies = [_problem(r, 401) for r in (none, unknown, basic)]
    assert bodies[0] == bodies[1] == bodies[2]
    assert "engine" not in none.text and none.headers["www-authenticate"].startswith(
        "Bearer"
    )


@pytest.mark.parametrize(
    ("scope", "method", "path"),
    [
        ("read", "POST", "/v1/notifications"),
        ("send", "GET", "/v1/events"),
        ("send", "GET", "/v1/dead-letters"),
        ("read", "DELETE", "/v1/dead-letters/x"),
        ("read", "POST", "/v1/dead-letters/requeue"),
    ],
)
def test_a_key_without_the_routes_scope_is_403(api, scope, method, path):
    """send posts, read reads, ops changes dead letters."""
    with api.http(api.key(scope)) as http:
        response = http.request(method, path, json=JOB)
    _problem(response, 403)


def test_a_flood_past_the_rate_limit_is_429_with_retry_after(api_server, make_settings):
    """5 per hour: the sixth request on is refused until a token is back."""
    api = api_server(make_settings(api={"rate_limit": "5/h"}))
    with api.http(api.key("read")) as http:
        answers = [http.get("/v1/events") for _ in range(12)]
    assert [a.status_code for a in answers[:5]] == [200] * 5
    for answer in answers[5:]:
        _problem(answer, 429)
        assert 1 <= int(answer.headers["retry-after"]) <= 720
    with api.http(api.key("read")) as http:
        assert http.get("/v1/events").status_code == 200  # another key, its own bucket


def test_a_batch_gives_each_item_its_id_or_its_error(api):
    """One bad item never refuses the others."""
    items = [JOB, {**JOB, "to": "bad"}, {**JOB, "subject": "second"}]
    with api.http(api.key("send", "read")) as http:
        response = http.post("/v1/notifications/batch", json=items)
        assert response.status_code == 200
        result = response.json()
        assert result["accepted"] == 2 and result["rejected"] == 1
        first, bad, third = result["items"]
        assert bad == {
            "error": {"field": "to[0].address", "message": bad["error"]["message"]}
        }
        for item in (first, third):
            assert (
                http.get(f"/v1/notifications/{item['id']}").json()["state"] == "queued"
            )


def test_ndjson_with_a_broken_line_enqueues_the_others(api):
    """A line that is not JSON is that item's error."""
    body = b"\n".join(
        [orjson.dumps(JOB), b"{not json", b"", orjson.dumps({**JOB, "subject": "b"})]
    )
    with api.http(api.key("send")) as http:
        response = http.post(
            "/v1/notifications/batch",
            content=body,
            headers={"content-type": "application/x-ndjson"},
        )
    items = response.json()["items"]
    assert "id" in items[0] and "id" in items[2]
    assert items[1]["error"]["field"] == "body"
    assert "line 2" in items[1]["error"]["message"]


def test_batch_idempotency_conflict_is_that_items_error(api):
    """An item reusing a key with another body is refused; the rest are enqueued once."""
    with api.http(api.key("send")) as http:
        first = http.post("/v1/notifications", json={**JOB, "idempotency_key": "k1"})
        items = [
            {**JOB, "idempotency_key": "k1"},
            {**JOB, "idempotency_key": "k1", "subject": "other"},
            {**JOB, "idempotency_key": "k2"},
        ]
        result = http.post("/v1/notifications/batch", json=items).json()
    same, conflict, fresh = result["items"]
    assert same == {"id": first.json()["id"]}
    assert conflict["error"]["field"] == "idempotency_key"
    assert "id" in fresh and fresh["id"] != same["id"]


def test_an_oversized_batch_is_413(api):
    """More than [api] max_batch items is refused whole."""
    with api.http(api.key("send")) as http:
        response = http.post("/v1/notifications/batch", json=[JOB] * 4)
    _problem(response, 413, "body")


def test_a_body_over_the_cap_by_content_length_is_413(api):
    """The declared length alone refuses it."""
    with api.http(api.key("send")) as http:
        big = {**JOB, "text": "x" * 5000}
        response = http.post("/v1/notifications", json=big)
    _problem(response, 413)


def _raw(api, head: bytes, chunks: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server refused and closed: what the test wants to see
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_a_streamed_body_is_refused_before_it_is_read_whole(api):
    """Chunked, with no length: 413 as soon as the cap is passed, the rest never sent."""
    key = api.key("send")
    head = (
        "POST /v1/notifications HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
    answer = _raw(api, head, [chunk, chunk])  # 8 KiB of a body never finished
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_a_lying_content_length_never_enqueues(api, redis_client):
    """A short declared length cuts the JSON; a long one over the cap is 413 at once."""
    key = api.key("send")
    body = orjson.dumps(JOB)
    head = (
        "POST /v1/notifications HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
    )
    short = _raw(api, f"{head}Content-Length: 20\r\n\r\n".encode(), [body])
    assert short.startswith(b"HTTP/1.1 400 ")
    long = _raw(api, f"{head}Content-Length: 999999\r\n\r\n".encode(), [body])
    assert long.startswith(b"HTTP/1.1 413 ")
    assert not list(redis_client.scan_iter(f"{api.settings.namespace}:job:*"))


@pytest.mark.parametrize(
    "path",
    [
        "/v1/notifications/..%2F..%2Fsecret",
        "/v1/notifications/%2e%2e",
        "/v1/notifications/a%00b",
        "/v1/notifications/x:history",
        "/v1/notifications/" + "a" * 300,
        "/v1/dead-letters/webhook:..%2Fx:1",
        "/v1/dead-letters/..",
        "/v1/notifications/%C0%AE%C0%AE",
    ],
)
def test_path_tricks_in_ids_are_400_or_404(api, path, redis_client):
    """No id reaches a Redis key outside the job's own."""
    before = set(redis_client.scan_iter(f"{api.settings.namespace}:*"))
    with api.http(api.key("read")) as http:
        response = http.get(path)
    assert response.status_code in (400, 404), response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    after = set(redis_client.scan_iter(f"{api.settings.namespace}:*")) - before
    assert all(k.startswith(f"{api.settings.namespace}:api:".encode()) for k in after)


def test_an_unknown_job_is_404(api):
    """A well-formed id nobody enqueued."""
    with api.http(api.key("read")) as http:
        response = http.get("/v1/notifications/00000000-0000-4000-8000-000000000000")
    _problem(response, 404)


def test_events_page_strictly_after_a_position(api, redis_client):
    """Oldest first; `next` is the last position, and after it nothing is repeated."""
    stream = f"{api.settings.namespace}:events"
    ids = [
        redis_client.xadd(stream, {"type": "delivery.sent", "id": f"e{i}", "job_id": "j",
                                   "at": "2026-12-02T00:00:00Z", "data": f'{{"n": {i}}}'})
        for i in range(3)
    ]  # fmt: skip
    with api.http(api.key("read")) as http:
        first = http.get("/v1/events", params={"limit": 2}).json()
        rest = http.get("/v1/events", params={"after": first["next"]}).json()
        none = http.get("/v1/events", params={"after": rest["next"]}).json()
        bad = http.get("/v1/events", params={"after": "../x"})
    assert [e["id"] for e in first["events"]] == ["e0", "e1"]
    assert first["events"][0]["data"] == {"n": 0}
    assert [e["id"] for e in rest["events"]] == ["e2"]
    assert rest["next"] == ids[2].decode()
    assert none == {"events": [], "next": rest["next"]}
    _problem(bad, 400, "after")


def test_health_and_readiness(api):
    """/healthz needs no broker; /readyz answers once Redis does."""
    with api.http() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json() == {"status": "ready"}


def test_the_access_log_names_the_key_never_its_secret(api):
    """One line per request: method, path, status, the key's name."""
    key = api.key("send", name="engine-a")
    with capture_logs() as logs, api.http(key) as http:
        http.post("/v1/notifications", json=JOB)
    lines = [e for e in logs if e["event"] == "api_request_handled"]
    assert lines and lines[-1]["api_key"] == "engine-a" and lines[-1]["status"] == 202
    assert key not in repr(logs) and "ann@example.com" not in repr(logs)


def test_concurrent_posts_each_get_their_own_job(api, redis_client):
    """Requests that arrive together are enqueued together, each with its own id."""
    from concurrent.futures import ThreadPoolExecutor

    key = api.key("send")

    def post(n):
        with api.http(key) as http:
            return http.post("/v1/notifications", json={**JOB, "subject": f"n{n}"})

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(post, range(40)))
    ids = [a.json()["id"] for a in answers if a.status_code == 202]
    assert len(set(ids)) == 40
    ns = api.settings.namespace
    assert all(redis_client.hget(status_key(ns, i), "state") == b"queued" for i in ids)
    assert redis_client.llen(f"{ns}:mail") == 40


def test_tls_is_served_from_the_certificate_and_key_files(
    api_server, make_settings, ca, ca_file, tmp_path
):
    """[api] tls_certificate_file and tls_key_file: HTTPS, verified by the client's CA."""
    leaf = ca.issue_cert("127.0.0.1")
    cert, key_file = tmp_path / "api.crt", tmp_path / "api.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key_file))
    api = api_server(
        make_settings(
            api={"tls_certificate_file": str(cert), "tls_key_file": str(key_file)}
        )
    )
    assert api.url.startswith("https://")
    trusting = ssl.create_default_context(cafile=str(ca_file))
    with api.http(api.key("send"), verify=trusting) as http:
        assert http.post("/v1/notifications", json=JOB).status_code == 202
    with pytest.raises(httpx.ConnectError), httpx.Client(verify=True) as untrusting:
        untrusting.get(f"{api.url}/healthz")
