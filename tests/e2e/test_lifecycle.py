"""The session lifecycle against real Docker: a container removed behind the gateway's back,
and an engine that goes away during a DELETE and comes back (issue 9)."""

from __future__ import annotations

from tests.e2e.conftest import docker, port_refuses, wait_for


def audit_events(gateway, session_id: str) -> list[dict]:
    return gateway.request("GET", f"/audit?session_id={session_id}").body["events"]


def test_a_container_removed_behind_the_gateways_back_is_noticed(gateway, ssh):
    session = gateway.create(user_id="rita", ttl_minutes=10).body
    assert ssh.with_key(session, "true").returncode == 0
    docker("rm", "-f", session["container_id"])
    url = f"/sessions/{session['session_id']}"
    # the sweep runs once a minute here: only Docker's events can make this in time
    wait_for(lambda: gateway.request("GET", url).status == 404, timeout=5, what="the cleanup")
    (ended,) = [e for e in audit_events(gateway, session["session_id"]) if "ended" in e["event"]]
    assert (ended["event"], ended["reason"]) == ("session_ended", "container_gone")
    assert port_refuses(session["ssh_port"])


def test_an_engine_away_during_delete_ends_the_session_when_it_is_back(
    gateway_factory, ssh, docker_proxy
):
    gateway = gateway_factory("--reap-interval", "1", start=False)
    gateway.env["DOCKER_HOST"] = f"unix://{docker_proxy.path}"
    gateway.start()
    session = gateway.create(user_id="sam", ttl_minutes=10).body
    assert ssh.with_key(session, "true").returncode == 0
    url = f"/sessions/{session['session_id']}"

    docker_proxy.stop()
    deleted = gateway.request("DELETE", url)
    assert (deleted.status, deleted.body["code"]) == (503, "docker_unavailable")
    view = gateway.request("GET", url).body  # the database still answers
    assert view["state"] == "ending"
    assert port_refuses(session["ssh_port"])  # connections were cut at once
    assert docker("ps", "-q", "--filter", f"id={session['container_id']}") != ""

    docker_proxy.start()
    wait_for(lambda: gateway.request("GET", url).status == 404, timeout=10, what="the sweep")
    assert docker("ps", "-aq", "--filter", f"id={session['container_id']}") == ""
    ends = [e for e in audit_events(gateway, session["session_id"]) if e["event"] != "connect"]
    assert [e["event"] for e in ends if e["event"].startswith("session_")] == [
        "session_deleted",
        "session_created",
    ]
    again = gateway.create(user_id="sam", ttl_minutes=10)
    assert again.status == 201 and again.body["ssh_port"] == session["ssh_port"]
