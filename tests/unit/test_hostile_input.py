"""Hostile clients: huge and slow requests, injection and look-alike user ids. Each gets a
clear 4xx or a closed connection, and nothing is created."""

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.routes import PROTECTED_ROUTES
from tests.unit.conftest import TOKEN

TEN_MB = 10 * 1024 * 1024
HTTP_TIMEOUT = 1.0
CUT_WITHIN = HTTP_TIMEOUT + 2.0  # the bound a dribbling client must be cut within
BODY_CUT_WITHIN = 2 * HTTP_TIMEOUT + 2.0  # waited for the body, then read what follows


async def assert_nothing_created(client, runtime, tmp_path):
    assert runtime.containers == {}
    assert await (await client.get("/sessions")).json() == []
    assert (await (await client.get("/audit")).json())["events"] == []
    workspaces = tmp_path / "workspaces"
    assert not workspaces.exists() or list(workspaces.iterdir()) == []


async def test_ten_megabyte_body_is_413_and_creates_nothing(make_client, runtime, tmp_path):
    client = await make_client()  # the default --max-body-bytes
    body = b'{"user_id": "alice", "image": "' + b"a" * TEN_MB + b'"}'
    resp = await client.post("/sessions", data=body)
    assert resp.status == 413 and (await resp.json())["code"] == "body_too_large"
    resp = await client.patch("/sessions/x", data=body)
    assert resp.status == 413
    await assert_nothing_created(client, runtime, tmp_path)


@pytest.mark.parametrize(("method", "path"), PROTECTED_ROUTES)
async def test_ten_megabytes_without_a_token_is_401(make_client, method, path):
    client = await make_client()
    resp = await client.request(method, path, data=b"x" * TEN_MB, headers={"Authorization": ""})
    assert resp.status == 401 and (await resp.json())["code"] == "unauthorized"


async def _cut_after(server, first: bytes, dribble: bytes) -> float:
    """Send ``first``, then ``dribble`` a line at a time; return how long until the gateway
    closes the connection."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    started = time.monotonic()
    writer.write(first)

    async def dribble_forever() -> None:
        while True:
            await asyncio.sleep(0.2)  # the attacker's pace
            writer.write(dribble)
            await writer.drain()

    dribbler = asyncio.create_task(dribble_forever())
    try:
        async with asyncio.timeout(BODY_CUT_WITHIN + 5):
            answer = await reader.read()
        return time.monotonic() - started, answer
    finally:
        dribbler.cancel()
        await asyncio.gather(dribbler, return_exceptions=True)
        writer.close()


async def test_slow_loris_headers_are_cut(make_server):
    server = await make_server(http_timeout=HTTP_TIMEOUT)
    elapsed, answer = await _cut_after(
        server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n"
    )
    assert answer == b""  # closed without an answer: the head never ended
    assert HTTP_TIMEOUT * 0.9 <= elapsed < CUT_WITHIN


async def test_slow_body_is_408(make_server):
    server = await make_server(http_timeout=HTTP_TIMEOUT)
    head = (
        b"POST /sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-token\r\n"
        b"Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n{"
    )
    elapsed, answer = await _cut_after(server, head, b" ")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "request_timeout"
    assert elapsed < BODY_CUT_WITHIN


HOSTILE_USER_IDS = [
    "../etc",
    "..",
    "a/../../root",
    "/etc/passwd",
    "a;rm -rf /",
    "$(id)",
    "`id`",
    "a|b",
    "a&b",
    "a b",
    "a\x00b",
    "a\nb",
    "alice\n",
    "a'b",
    'a"b',
    "~alice",
    "-oProxyCommand=id",
    "*",
    "\u0430lice",  # Cyrillic a
    "\uff41lice",  # fullwidth a
    "alice\u200b",  # zero-width space
    "al\u0131ce",  # dotless i
    "ALICE",
    "Alice",
    "e\u0301",  # combining accent
    "root",
    "daemon",
    "sshd",
    "nobody",
    "www-data",
    "docker",
    "sudo",
    "",
    "x" * 33,
    "1alice",
]


@pytest.mark.parametrize("user_id", HOSTILE_USER_IDS)
async def test_hostile_user_ids_are_400_and_create_nothing(make_client, runtime, tmp_path, user_id):
    client = await make_client()
    resp = await client.post("/sessions", json={"user_id": user_id})
    assert resp.status == 400
    assert (await resp.json())["code"] == "invalid_user_id"
    await assert_nothing_created(client, runtime, tmp_path)


@pytest.mark.parametrize(
    "path",
    [
        "/sessions/..%2F..%2Fetc%2Fpasswd",
        "/sessions/%2e%2e",
        "/sessions/%00",
        "/sessions/a%0Ab",
        "/sessions/$(id)",
        "/sessions/" + "x" * 4000,
        "/sessions/%D0%B0",
    ],
)
async def test_hostile_session_ids_are_404(make_client, path):
    client = await make_client()
    for method in ("GET", "DELETE"):
        resp = await client.request(method, path)
        assert resp.status == 404, (method, path)
        assert (await resp.json())["code"] in ("session_not_found", "not_found")
    resp = await client.patch(path, json={"extend_minutes": 1})
    assert resp.status == 404


@pytest.mark.parametrize(
    "query",
    [
        "since=2020-W01-1",  # ISO week date: Python's fromisoformat took these
        "since=2020-01-01",
        "since=20200101T000000Z",
        "until=2020-01-01T00:00",
        "until=2020-01-01T00:00:00",  # no offset
        "since=2020-13-01T00:00:00Z",
        "since=%D9%A2020-01-01T00:00:00Z",  # an Arabic-Indic digit
        "limit=%205",
        "limit=5_0",
        "limit=%D9%A5",
        "cursor=%2B5",
        "cursor=99999999999999999999999",
        "limit=1&limit=2",  # one value each: the first is not silently taken
        "user_id=a&user_id=b",
    ],
)
async def test_audit_parameters_are_strict(make_client, query):
    client = await make_client()
    resp = await client.get(f"/audit?{query}")
    assert resp.status == 400 and (await resp.json())["code"] == "invalid_request"


@pytest.mark.parametrize(
    "query",
    ["since=2020-01-01T00:00:00Z", "until=2020-01-01t00:00:00.123456789%2B05:30",
     "since=0001-01-01T00:00:00%2B23:59", "until=9999-12-31T23:59:59-23:59", "limit=1000"],
)  # fmt: skip
async def test_audit_parameters_in_rfc3339_are_taken(make_client, query):
    client = await make_client()
    assert (await client.get(f"/audit?{query}")).status == 200


#: Integers no field takes: zero and below, and above anything a TTL or int64 can be.
ABSURD = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=2**63),
    st.sampled_from([-(10**17), -(10**20), 10**20, 2**64]),
)
CREATE_INTS = ("ttl_minutes", "ttl_seconds", "memory_limit", "cpu_limit")
PATCH_INTS = ("ttl_minutes", "ttl_seconds", "extend_minutes", "extend_seconds")
FUZZ = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def _send(base: str, method: str, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _fuzz_numbers(base: str, session_id: str) -> None:
    @given(field=st.sampled_from(CREATE_INTS), value=ABSURD)
    @FUZZ
    def post(field: str, value: int) -> None:
        status, body = _send(base, "POST", "/sessions", {"user_id": "bob", field: value})
        assert status == 400, (field, value, status, body)

    @given(field=st.sampled_from(PATCH_INTS), value=ABSURD)
    @FUZZ
    def patch(field: str, value: int) -> None:
        status, body = _send(base, "PATCH", f"/sessions/{session_id}", {field: value})
        assert status == 400, (field, value, status, body)

    post()
    patch()


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("POST", {"user_id": "bob", "memory_limit": 10**20}),
        ("POST", {"user_id": "bob", "memory_limit": "100000000000t"}),
        ("PATCH", {"ttl_minutes": -(10**20)}),
        ("PATCH", {"ttl_seconds": -(10**17)}),
    ],
)
async def test_absurd_numbers_are_400_not_500(make_client, runtime, method, body):
    client = await make_client()
    sid = (await (await client.post("/sessions", json={"user_id": "alice"})).json())["session_id"]
    path = "/sessions" if method == "POST" else f"/sessions/{sid}"
    resp = await client.request(method, path, json=body)
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["code"] in ("invalid_limit", "invalid_ttl")
    assert len(runtime.containers) == 1  # nothing made, nothing changed


async def test_huge_and_negative_integers_in_any_field_are_400(make_server, runtime):
    """Hypothesis sends integers beyond every bound (and int64) to each numeric field."""
    server = await make_server()
    base = str(server.make_url("")).rstrip("/")
    status, created = await asyncio.to_thread(_send, base, "POST", "/sessions", {"user_id": "al"})
    assert status == 201
    await asyncio.to_thread(_fuzz_numbers, base, created["session_id"])
    assert len(runtime.containers) == 1
