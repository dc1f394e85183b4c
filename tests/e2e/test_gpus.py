"""MIG allocation end to end on a simulated GPU host, with real containers (issue: GPUs)."""

from __future__ import annotations

import concurrent.futures
import json
import secrets
import signal
import subprocess

import pytest

from tests.e2e.conftest import IMAGE, docker, wait_for

ONE_A100 = {"host": "e2e", "gpus": [{"model": "A100-80GB", "mig": True}]}


def container_env(container_id: str) -> dict[str, str]:
    env = json.loads(docker("inspect", "-f", "{{json .Config.Env}}", container_id))
    return dict(item.split("=", 1) for item in env)


def available(gateway) -> list[str]:
    return sorted(
        i["uuid"] for i in gateway.request("GET", "/gpus/available").body["available_instances"]
    )


def test_sessions_get_their_slice_and_it_comes_back(gateway_factory, topology):
    gpus = topology(
        {
            "host": "e2e",
            "gpus": [
                {"model": "A100-80GB", "mig": True, "instances": ["3g.40gb", "3g.40gb"]},
                {"model": "H100-80GB", "mig": False},
            ],
        }
    )
    gateway = gateway_factory(
        "--gpus", gpus, "--default-mig-profile", "3g.40gb", "--reap-interval", "0.5"
    )
    before = available(gateway)
    assert len(before) == 3  # two 3g.40gb slices and one whole GPU

    listed = gateway.request("GET", "/gpus").body
    assert listed["count"] == 2
    assert [(g["mig_enabled"], len(g["mig_instances"])) for g in listed["gpus"]] == [
        (True, 2),
        (False, 0),
    ]
    assert all(g["memory_total"] > 80 * 10**9 and g["power_limit"] < 1000 for g in listed["gpus"])
    assert all(g["healthy"] for g in listed["gpus"])
    assert [g["utilization"] for g in listed["gpus"]] == [None, 0]  # as NVML: none under MIG

    first = gateway.create(user_id="ann", ttl_minutes=5)
    assert first.status == 201, first.body
    uuid = first.body["gpu_uuid"]
    assert uuid in before and uuid.startswith("MIG-")
    env = container_env(first.body["container_id"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == uuid
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert uuid not in available(gateway)
    view = gateway.request("GET", f"/sessions/{first.body['session_id']}").body
    assert (view["gpu_uuid"], view["mig_profile"]) == (uuid, "3g.40gb")

    short = gateway.create(user_id="ben", ttl_seconds=15).body  # outlives the checks below
    assert short["gpu_uuid"] in before and short["gpu_uuid"] != uuid
    whole = gateway.create(user_id="cat").body
    assert whole["gpu_uuid"].startswith("GPU-")  # default profile exhausted: whole GPU
    assert available(gateway) == []
    busy = gateway.create(user_id="dan")
    assert (busy.status, busy.body["code"]) == (503, "no_gpu_available")

    wait_for(lambda: short["gpu_uuid"] in available(gateway), timeout=45, what="TTL release")
    gateway.request("DELETE", f"/sessions/{first.body['session_id']}")
    gateway.request("DELETE", f"/sessions/{whole['session_id']}")
    assert available(gateway) == before


def test_ten_concurrent_dynamic_creates_fill_one_a100(gateway_factory, topology):
    gateway = gateway_factory(
        "--gpus", topology(ONE_A100), "--mig-dynamic", "--default-mig-profile", "3g.40gb"
    )
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(
            pool.map(lambda i: gateway.create(user_id=f"u{i}", mig_profile="1g.10gb"), range(10))
        )
    statuses = sorted(r.status for r in results)
    assert statuses == [201] * 7 + [503] * 3, [r.body for r in results]
    assert {r.body["code"] for r in results if r.status == 503} == {"no_gpu_available"}
    uuids = [r.body["gpu_uuid"] for r in results if r.status == 201]
    assert len(set(uuids)) == 7
    instances = gateway.request("GET", "/gpus").body["gpus"][0]["mig_instances"]
    assert sorted(i["uuid"] for i in instances) == sorted(uuids)
    assert all(i["allocated"] for i in instances)

    # a restart keeps every allocation
    gateway.stop(signal.SIGKILL)
    gateway.start()
    sessions = gateway.request("GET", "/sessions").body
    assert sorted(s["gpu_uuid"] for s in sessions) == sorted(uuids)
    assert gateway.create(user_id="late", mig_profile="1g.10gb").status == 503

    # ending a session destroys the instance made for it; a new one can be made
    gone = sessions[0]
    gateway.request("DELETE", f"/sessions/{gone['id']}")
    instances = gateway.request("GET", "/gpus").body["gpus"][0]["mig_instances"]
    assert gone["gpu_uuid"] not in {i["uuid"] for i in instances} and len(instances) == 6
    again = gateway.create(user_id="late", mig_profile="1g.10gb")
    assert again.status == 201 and again.body["gpu_uuid"] not in uuids


def test_explicit_instance_and_errors(gateway_factory, topology):
    gateway = gateway_factory(
        "--gpus",
        topology(
            {"host": "e2e", "gpus": [{"model": "A100-80GB", "mig": True, "instances": ["1g.10gb"]}]}
        ),
        "--default-mig-profile",
        "any",
    )
    (free,) = gateway.request("GET", "/gpus/available").body["available_instances"]
    got = gateway.create(user_id="eve", mig_instance_uuid=free["uuid"])
    assert got.status == 201 and got.body["gpu_uuid"] == free["uuid"]
    taken = gateway.create(user_id="fay", mig_instance_uuid=free["uuid"])
    assert (taken.status, taken.body["code"]) == (409, "gpu_instance_busy")
    missing = gateway.create(
        user_id="fay", mig_instance_uuid="MIG-00000000-0000-0000-0000-000000000000"
    )
    assert (missing.status, missing.body["code"]) == (404, "gpu_instance_not_found")
    unknown = gateway.create(user_id="fay", mig_profile="9g.999gb")
    assert (unknown.status, unknown.body["code"]) == (400, "unknown_mig_profile")
    assert [s["user_id"] for s in gateway.request("GET", "/sessions").body] == ["eve"]
    profiles = {p["name"] for p in gateway.request("GET", "/gpus/profiles").body["profiles"]}
    assert {"1g.10gb", "3g.40gb", "7g.80gb"} <= profiles


def test_image_saying_all_gpus_still_gets_only_its_uuid(gateway_factory, topology):
    tag = f"sandman-test-allgpus:{secrets.token_hex(3)}"
    subprocess.run(
        ["docker", "build", "--network", "none", "-t", tag, "-"],
        input=f"FROM {IMAGE}\nENV NVIDIA_VISIBLE_DEVICES=all\n",
        text=True,
        check=True,
        capture_output=True,
    )
    try:
        gateway = gateway_factory(
            "--gpus", topology(ONE_A100), "--mig-dynamic", "--allowed-image", tag,
            "--default-mig-profile", "any",
        )  # fmt: skip
        created = gateway.create(user_id="gus", mig_profile="1g.10gb", image=tag)
        assert created.status == 201, created.body
        env = container_env(created.body["container_id"])
        assert env["NVIDIA_VISIBLE_DEVICES"] == created.body["gpu_uuid"]
        inside = docker("exec", created.body["container_id"], "printenv", "NVIDIA_VISIBLE_DEVICES")
        assert inside == created.body["gpu_uuid"]
    finally:
        gateway.cleanup()
        docker("rmi", "-f", tag, check=False)


def test_the_default_slice_follows_the_host(gateway_factory, topology):
    h100 = topology({"host": "e2e", "gpus": [{"model": "H100-80GB", "mig": True}]})
    gateway = gateway_factory("--gpus", h100, "--mig-dynamic")  # no --default-mig-profile
    created = gateway.create(user_id="hal")
    assert created.status == 201, created.body
    assert created.body["mig_profile"] == "3g.40gb"  # the H100's 3-slice profile
    gateway.cleanup()
    gateway = gateway_factory("--gpus", h100, "--default-mig-profile", "3g.20gb", start=False)
    with pytest.raises(AssertionError, match="exited early") as caught:
        gateway.start()
    assert "sandman: --default-mig-profile 3g.20gb is not offered" in str(caught.value)
    assert "3g.40gb" in str(caught.value) and "Traceback" not in str(caught.value)
