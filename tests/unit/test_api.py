"""The REST API against fake Docker and no GPU: shapes, codes, auth, CORS and rollback."""

import asyncio

import pytest

from gateway.api import keys
from gateway.sessions import SessionManager
from tests.net import UNIT_PORT_BASE as FIRST_PORT
from tests.routes import PROTECTED_ROUTES
from tests.unit.helpers import create

NO_AUTH = {"Authorization": ""}


async def test_create_get_list_delete(make_client, runtime):
    client = await make_client()
    resp = await create(client, ttl_minutes=30)
    assert resp.status == 201
    body = await resp.json()
    assert body["ssh_user"] == "alice"
    assert body["ssh_host"] == "gpu01.test"
    assert body["ssh_port"] == FIRST_PORT
    assert body["ssh_private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert len(body["ssh_password"]) >= 20
    assert body["gpu_uuid"] is None
    assert body["created_at"].endswith("Z") and body["expires_at"].endswith("Z")
    (container,) = runtime.containers.values()
    env = container.spec.env
    assert env["SANDMAN_USER"] == "alice" and env["SANDMAN_UID"] == "10000"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
    # secrets travel as root-only files, never in the environment
    assert not any("KEY" in name or "HASH" in name for name in env)
    assert container.files["/etc/sandman/password-hash"].startswith(b"$2b$")
    assert body["ssh_password"].encode() not in b"".join(container.files.values())

    view = await (await client.get(f"/sessions/{body['session_id']}")).json()
    assert view["ttl_minutes"] == 30 and view["ssh_port"] == FIRST_PORT
    assert (
        view["metadata"]["ssh_port"] == str(FIRST_PORT)
        and view["metadata"]["image"] == "gpu-workspace"
    )
    assert "ssh_password" not in str(view)
    listed = await (await client.get("/sessions")).json()
    assert [s["id"] for s in listed] == [body["session_id"]]

    resp = await client.delete(f"/sessions/{body['session_id']}")
    assert resp.status == 200
    assert runtime.containers == {}
    resp = await client.get(f"/sessions/{body['session_id']}")
    assert resp.status == 404 and (await resp.json())["code"] == "session_not_found"
    resp = await client.delete(f"/sessions/{body['session_id']}")
    assert resp.status == 404


async def test_ports_are_sticky_per_user(make_client):
    client = await make_client()
    a = await (await create(client, user_id="a")).json()
    b = await (await create(client, user_id="b")).json()
    assert (a["ssh_port"], b["ssh_port"]) == (FIRST_PORT, FIRST_PORT + 1)
    await client.delete(f"/sessions/{a['session_id']}")
    c = await (await create(client, user_id="c")).json()
    assert c["ssh_port"] == FIRST_PORT + 2  # a's port stays a's while others are free
    again = await (await create(client, user_id="a")).json()
    assert again["ssh_port"] == FIRST_PORT


async def test_a_users_port_goes_to_another_only_when_the_pool_forces_it(make_client, clock):
    from gateway.core.ports import PortRange

    client = await make_client(ssh_ports=PortRange(FIRST_PORT, FIRST_PORT + 1))
    for user in ("a", "b"):
        session = await (await create(client, user_id=user)).json()
        await client.delete(f"/sessions/{session['session_id']}")
        clock.advance(60)
    clock.advance(60)
    c = await (await create(client, user_id="c")).json()
    assert c["ssh_port"] == FIRST_PORT  # every port is someone's: the longest unused is taken
    await client.delete(f"/sessions/{c['session_id']}")
    clock.advance(60)
    a = await (await create(client, user_id="a")).json()
    assert a["ssh_port"] == FIRST_PORT + 1  # a lost FIRST_PORT to c; b's is now the longest unused
    b = await (await create(client, user_id="b")).json()
    assert b["ssh_port"] == FIRST_PORT  # b lost FIRST_PORT + 1 to a; c's is the only one free


async def test_port_held_by_another_process_is_skipped(make_client):
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", FIRST_PORT)
    try:
        client = await make_client()
        body = await (await create(client)).json()
        assert body["ssh_port"] == FIRST_PORT + 1
    finally:
        blocker.close()


async def test_a_users_port_stays_theirs_when_a_lower_one_frees_up(make_client):
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", FIRST_PORT)
    client = await make_client()
    try:
        first = await (await create(client)).json()
        assert first["ssh_port"] == FIRST_PORT + 1
    finally:
        blocker.close()
        await blocker.wait_closed()
    await client.delete(f"/sessions/{first['session_id']}")
    again = await (await create(client)).json()
    assert again["ssh_port"] == FIRST_PORT + 1  # their own, not the lowest free


async def test_no_port_left_is_503(make_client):
    from gateway.core.ports import PortRange

    client = await make_client(ssh_ports=PortRange(FIRST_PORT, FIRST_PORT))
    assert (await create(client, user_id="a")).status == 201
    resp = await create(client, user_id="b")
    assert resp.status == 503 and (await resp.json())["code"] == "no_port_available"


async def test_concurrent_creates_for_one_user(make_client, runtime):
    client = await make_client()
    results = await asyncio.gather(*(create(client) for _ in range(5)))
    statuses = sorted(r.status for r in results)
    assert statuses == [201, 409, 409, 409, 409]
    codes = {(await r.json())["code"] for r in results if r.status == 409}
    assert codes == {"session_exists"}
    assert len(runtime.containers) == 1


async def test_stable_uid_across_sessions(make_client, runtime):
    client = await make_client()
    first = await (await create(client, user_id="alice")).json()
    await create(client, user_id="bob")
    await client.delete(f"/sessions/{first['session_id']}")
    await create(client, user_id="alice")
    uids = {
        c.spec.env["SANDMAN_USER"]: c.spec.env["SANDMAN_UID"] for c in runtime.containers.values()
    }
    assert uids == {"alice": "10000", "bob": "10001"}


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("never_ready", "did not answer SSH within 1 s"),
        ("crash", "exited before its SSH server started"),
        ("fail_create", "Docker refused to create the container"),
    ],
)
async def test_failed_start_rolls_everything_back(make_client, runtime, mode, why):
    runtime.mode = mode
    client = await make_client(start_timeout=1)
    resp = await create(client)
    body = await resp.json()
    assert (resp.status, body["code"]) == (502, "container_start_failed")
    assert why in body["error"]
    assert "Traceback" not in body["error"]
    assert runtime.containers == {}
    assert await (await client.get("/sessions")).json() == []
    runtime.mode = "ok"
    resp = await create(client)  # port and user are free again
    assert resp.status == 201 and (await resp.json())["ssh_port"] == FIRST_PORT


async def test_docker_unreachable_is_503_and_the_sweep_finishes_the_rollback(make_client, runtime):
    from gateway.api import keys

    client = await make_client()
    runtime.reachable = False
    resp = await create(client)
    assert resp.status == 503 and (await resp.json())["code"] == "docker_unavailable"
    # whether Docker made a container is unknown: the row stays "ending", holding its port
    (left,) = await (await client.get("/sessions")).json()
    assert left["state"] == "ending"
    runtime.reachable = True
    assert await client.app[keys.SESSIONS].sweep() == 1
    assert await (await client.get("/sessions")).json() == []
    events = (await (await client.get("/audit")).json())["events"]
    assert events == []  # it never was a session: no end event


async def test_sweep_ends_expired_sessions(make_client, runtime, clock):
    from gateway.api import keys

    client = await make_client()
    short = await (await create(client, user_id="short", ttl_seconds=5)).json()
    await create(client, user_id="long", ttl_minutes=60)
    clock.advance(5)
    assert await client.app[keys.SESSIONS].sweep() == 1
    ids = [s["user_id"] for s in await (await client.get("/sessions")).json()]
    assert ids == ["long"]
    assert short["container_id"] not in runtime.containers


async def test_sweep_ends_sessions_whose_container_vanished(make_client, runtime):
    from gateway.api import keys

    client = await make_client()
    body = await (await create(client)).json()
    runtime.containers.pop(body["container_id"])
    assert await client.app[keys.SESSIONS].sweep() == 1
    assert await (await client.get("/sessions")).json() == []


async def test_delete_all(make_client, runtime):
    client = await make_client()
    for user in ("a", "b", "c"):
        await create(client, user_id=user)
    body = await (await client.delete("/sessions")).json()
    assert body["deleted"] == 3
    assert runtime.containers == {}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_request"),
        (b"[1, 2]", "invalid_request"),
        (b'{"user_id": "alice", "colour": "red"}', "invalid_request"),
        (b'{"ttl_minutes": 5}', "invalid_request"),
        (b'{"user_id": 5}', "invalid_request"),
        (b'{"user_id": "alice", "ttl_minutes": "5"}', "invalid_request"),
        (b'{"user_id": "alice", "ttl_minutes": true}', "invalid_request"),
        (
            b'{"user_id": "alice", "mig_profile": "1g.10gb", "mig_instance_uuid": "MIG-x"}',
            "invalid_request",
        ),
        (b'{"user_id": "../x"}', "invalid_user_id"),
        (b'{"user_id": "root"}', "invalid_user_id"),
        (b'{"user_id": "A"}', "invalid_user_id"),
        (b'{"user_id": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}', "invalid_user_id"),
        (b'{"user_id": "alice", "ttl_minutes": 0}', "invalid_ttl"),
        (b'{"user_id": "alice", "ttl_minutes": 121}', "invalid_ttl"),
        (b'{"user_id": "alice", "ttl_minutes": 1, "ttl_seconds": 5}', "invalid_ttl"),
        (b'{"user_id": "alice", "image": "evil:latest"}', "image_not_allowed"),
        (b"[" * 60000, "invalid_request"),  # deeper than the JSON parser recurses
        (b'{"user_id": "alice", "ttl_seconds": 99999999999999999999999}', "invalid_ttl"),
    ],
)
async def test_bad_requests_are_400_and_create_nothing(make_client, runtime, body, code):
    client = await make_client()
    resp = await client.post("/sessions", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["code"] == code
    assert runtime.containers == {}
    assert await (await client.get("/sessions")).json() == []


async def test_body_too_large(make_client):
    client = await make_client(max_body_bytes=1024)
    resp = await client.post("/sessions", data=b'{"user_id": "' + b"a" * 2000 + b'"}')
    assert resp.status == 413 and (await resp.json())["code"] == "body_too_large"


@pytest.mark.parametrize(("method", "path"), PROTECTED_ROUTES)
async def test_auth_required(make_client, method, path):
    client = await make_client()
    for headers in (
        NO_AUTH,
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic test-token"},
    ):
        resp = await client.request(method, path, headers=headers)
        assert resp.status == 401
        assert (await resp.json())["code"] == "unauthorized"


async def test_healthz_is_public_and_reports_docker(make_client, runtime, caplog):
    """It names the failing dependency; the exception's text stays in the log."""
    client = await make_client()
    resp = await client.get("/healthz", headers=NO_AUTH)
    assert resp.status == 200
    assert await resp.json() == {"status": "healthy", "service": "gpu-ssh-gateway-orchestrator"}
    runtime.reachable = False
    resp = await client.get("/healthz", headers=NO_AUTH)
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "degraded"
    assert body["failing"] == {"docker": "unavailable"}
    assert "the Docker engine is unreachable" in caplog.text


async def test_healthz_reports_a_database_that_is_gone(make_client):
    client = await make_client()
    await client.app[keys.STORE].close()  # as a failed disk or a closed handle leaves it
    resp = await client.get("/healthz", headers=NO_AUTH)
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "degraded"
    assert list(body["failing"]) == ["database"]


async def test_an_unexpected_failure_is_500_internal_logged_with_its_trace_never_sent(
    make_client, monkeypatch, caplog
):
    async def broken(self):
        raise RuntimeError("secret detail at /var/lib/orchestrator/sessions.db")

    monkeypatch.setattr(SessionManager, "list", broken)
    client = await make_client()
    resp = await client.get("/sessions")
    assert resp.status == 500
    assert await resp.json() == {"error": "internal error", "code": "internal"}
    (logged,) = [r for r in caplog.records if r.name == "gateway.api.middleware"]
    assert logged.levelname == "ERROR" and logged.getMessage() == "GET /sessions failed"
    assert isinstance(logged.exc_info[1], RuntimeError)  # the trace goes to the log
    assert (await client.get("/healthz", headers=NO_AUTH)).status == 200  # and it serves on


async def test_cors_echoes_origin_with_credentials(make_client):
    client = await make_client()
    resp = await client.options(
        "/sessions",
        headers={
            "Origin": "https://ui.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
            **NO_AUTH,
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert resp.headers["Access-Control-Max-Age"] == "86400"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    resp = await client.get("/sessions", headers={"Origin": "https://ui.example", **NO_AUTH})
    assert resp.status == 401  # CORS does not replace auth, but the browser may read the error
    assert resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"


async def test_cors_restricted_origins(make_client):
    client = await make_client(cors_origins=("https://ok.example",))
    ok = await client.get("/sessions", headers={"Origin": "https://ok.example"})
    bad = await client.get("/sessions", headers={"Origin": "https://evil.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://ok.example"
    assert "Access-Control-Allow-Origin" not in bad.headers


async def test_unknown_route_is_json_404(make_client):
    client = await make_client()
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json())["code"] == "not_found"
