"""The waiting list and GPU-hour budgets end to end: a real gateway on a simulated A100 with
dynamic MIG (seven 1g slices), real containers, real ssh through the session ports."""

from __future__ import annotations

import concurrent.futures
import signal
from functools import partial
from typing import Any

from tests.e2e.conftest import holdings, wait_for
from tests.e2e.test_faults import stopped

ONE_A100 = {"host": "e2e-queue", "gpus": [{"model": "A100-80GB", "mig": True}]}


def view(gateway, session_id: str) -> dict[str, Any] | None:
    resp = gateway.request("GET", f"/sessions/{session_id}")
    return resp.body if resp.status == 200 else None


def wait_running(gateway, session_id: str) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        found = view(gateway, session_id)
        return found if found and found["state"] == "running" else None

    wait_for(running, timeout=90, what=f"session {session_id} running")
    found = view(gateway, session_id)
    assert found is not None
    return found


def logs_in(ssh, queued: dict[str, Any], started: dict[str, Any]) -> str:
    """Log in with the 202's key and password at the port the session got."""
    session = {**queued, "ssh_port": started["ssh_port"]}
    by_key = ssh.with_key(session, "echo key-$USER")
    by_password = ssh.with_password(session, "echo password-$USER")
    assert by_key.returncode == 0, by_key.stderr
    assert by_password.returncode == 0, by_password.stderr
    return by_key.stdout.strip() + " " + by_password.stdout.strip()


def test_queue_starts_in_usage_order_survives_a_restart_and_budgets_refuse(
    gateway_factory, topology, ssh
):
    gateway = gateway_factory(
        *("--gpus", topology(ONE_A100), "--mig-dynamic", "--default-mig-profile", "1g.10gb"),
        *("--reap-interval", "1"),
    )
    # carol has used a GPU; dave has not
    used = gateway.create(user_id="carol", ttl_minutes=5)
    assert used.status == 201, used.body
    assert gateway.request("DELETE", f"/sessions/{used.body['session_id']}").status == 200
    holders = []
    for i in range(7):
        created = gateway.create(user_id=f"u{i}", ttl_minutes=30)
        assert created.status == 201, created.body
        holders.append(created.body["session_id"])
    assert gateway.create(user_id="carol").status == 503  # without wait: as before

    carol = gateway.create(user_id="carol", ttl_minutes=30, wait=True)
    assert carol.status == 202, carol.body
    assert (carol.body["state"], carol.body["queue_position"]) == ("queued", 1)
    dave = gateway.create(user_id="dave", ttl_minutes=30, wait=True)
    assert (dave.status, dave.body["queue_position"]) == (202, 1)  # less used: ahead
    assert view(gateway, carol.body["session_id"])["queue_position"] == 2
    erin = gateway.create(user_id="erin", wait=True)
    assert erin.status == 202
    assert gateway.request("DELETE", f"/sessions/{erin.body['session_id']}").status == 200
    assert view(gateway, erin.body["session_id"]) is None  # withdrawn
    assert gateway.request("GET", "/queue").body["count"] == 2

    # a session ends: dave (less used) starts, carol waits at the head
    assert gateway.request("DELETE", f"/sessions/{holders[0]}").status == 200
    started = wait_running(gateway, dave.body["session_id"])
    assert started["gpu_uuid"].startswith("MIG-") and started["mig_profile"] == "1g.10gb"
    assert logs_in(ssh, dave.body, started) == "key-dave password-dave"
    assert view(gateway, carol.body["session_id"])["queue_position"] == 1

    # a restart keeps the queue
    gateway.stop()
    gateway.start()
    assert view(gateway, carol.body["session_id"])["queue_position"] == 1
    assert gateway.request("DELETE", f"/sessions/{holders[1]}").status == 200
    started = wait_running(gateway, carol.body["session_id"])
    assert logs_in(ssh, carol.body, started) == "key-carol password-carol"
    events = gateway.request("GET", "/audit?limit=1000").body["events"]
    names = [e["event"] for e in events]
    assert names.count("session_queued") == 3 and names.count("session_dequeued") == 2
    assert "session_queue_withdrawn" in names

    # a budget caps the TTL, then refuses; others are untouched
    assert gateway.request("DELETE", f"/sessions/{holders[2]}").status == 200
    limits = gateway.request("PUT", "/users/bud/limits", {"gpu_hours_per_week": 0.01})
    assert limits.status == 200, limits.body
    capped = gateway.create(user_id="bud", ttl_minutes=60)
    assert capped.status == 201, capped.body
    # 0.01 GPU-hours on 1/7 of a GPU: 252 seconds
    assert (capped.body["ttl_seconds"], capped.body["ttl_capped"]) == (252, True)
    assert gateway.request("DELETE", f"/sessions/{capped.body['session_id']}").status == 200
    assert gateway.request("GET", "/users/bud/usage").body["gpu_hours_used"] > 0
    # less than a minute of a 1g slice (1/420 GPU-hours) left: spent
    gateway.request("PUT", "/users/bud/limits", {"gpu_hours_per_week": 0.002})
    refused = gateway.create(user_id="bud")
    assert (refused.status, refused.body["code"]) == (403, "quota_exceeded")
    assert refused.body["gpu_hours_budget"] == 0.002
    assert refused.body["next_available_at"].endswith("Z")
    assert gateway.create(user_id="bud", wait=True).status == 403  # never queued
    other = gateway.create(user_id="olga", ttl_minutes=60)
    assert (other.status, other.body["ttl_capped"]) == (201, False)


def test_a_crash_mid_start_puts_a_dequeued_request_back_and_it_starts(
    gateway_factory, topology, ssh
):
    """SIGKILL while a request from the list starts (its container made): the restart puts
    it back on the list, starts it, and its user logs in with the 202's credentials."""
    gateway = gateway_factory(
        *("--gpus", topology(ONE_A100), "--mig-dynamic", "--default-mig-profile", "1g.10gb"),
    )
    whole = gateway.create(user_id="hal", mig_profile="7g.80gb", ttl_minutes=30)
    assert whole.status == 201, whole.body  # the whole A100: nothing else fits
    queued = gateway.create(user_id="quinn", ttl_minutes=30, wait=True)
    assert (queued.status, queued.body["queue_position"]) == (202, 1), queued.body
    request_id = queued.body["session_id"]

    gateway.stop()  # from now on the only create is the dequeued start: it stops itself there
    gateway.env["SANDMAN_TEST_STOP_AT"] = "container_created"
    gateway.start()
    assert gateway.proc is not None
    pid = gateway.proc.pid
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # it may stop before answering
        pool.submit(gateway.request, "DELETE", f"/sessions/{whole.body['session_id']}")
        wait_for(partial(stopped, pid), timeout=60, what="the dequeued start stopping")
        gateway.stop(signal.SIGKILL)
    assert gateway.query(f"SELECT state FROM sessions WHERE id = '{request_id}'") == [("starting",)]
    assert gateway.query(f"SELECT starting FROM queue WHERE id = '{request_id}'") == [(1,)]

    del gateway.env["SANDMAN_TEST_STOP_AT"]
    gateway.start()
    started = wait_running(gateway, request_id)
    assert logs_in(ssh, queued.body, started) == "key-quinn password-quinn"
    events = gateway.request("GET", f"/audit?session_id={request_id}").body["events"]
    names = [e["event"] for e in reversed(events) if "queue" in e["event"]]
    assert names == ["session_queued", "session_requeued", "session_dequeued"], names
    (requeued,) = [e for e in events if e["event"] == "session_requeued"]
    assert (requeued["attempt"], requeued["error"]) == (1, "start_interrupted")
    assert gateway.query(f"SELECT COUNT(*) FROM queue WHERE id = '{request_id}'") == [(0,)]
    assert view(gateway, whole.body["session_id"]) is None
    assert holdings(gateway).consistent
