"""How Docker hands a GPU to a container (hook or CDI), and the create body per path."""

from pathlib import Path

import pytest

from gateway.core.gpu_delivery import (
    DEVICE_REQUEST,
    NVIDIA_RUNTIME,
    engine_version,
    gpu_host_config,
    gpu_path,
)
from gateway.runtime.base import ContainerSpec
from gateway.runtime.docker import container_config
from tests.fakes import CDI_DOCKER, CDI_DOCKER_NO_RUNTIME

OLD = {"ServerVersion": "28.5.1", "CDISpecDirs": ["/etc/cdi"], "Runtimes": {"nvidia": {}}}
NO_CDI = {**CDI_DOCKER, "CDISpecDirs": []}  # CDI off: 29.2 keeps the toolkit's hook


@pytest.mark.parametrize(
    ("info", "through_cdi", "delivery", "warned"),
    [
        ({}, False, DEVICE_REQUEST, False),  # an engine that says nothing: the hook
        (OLD, False, DEVICE_REQUEST, False),  # before 29.2 the hook resolves, CDI or not
        (NO_CDI, False, DEVICE_REQUEST, False),
        (CDI_DOCKER, True, NVIDIA_RUNTIME, False),  # the runtime resolves late instances
        (CDI_DOCKER_NO_RUNTIME, True, DEVICE_REQUEST, True),  # late instances fail
        ({**CDI_DOCKER, "ServerVersion": "30.0.1"}, True, NVIDIA_RUNTIME, False),
    ],
)
def test_the_daemons_gpu_path(info, through_cdi, delivery, warned):
    path = gpu_path(info)
    assert (path.through_cdi, path.delivery, path.warning is not None) == (
        through_cdi,
        delivery,
        warned,
    )


def test_the_warning_says_what_fails_and_how_to_fix_it():
    path = gpu_path(CDI_DOCKER_NO_RUNTIME)
    assert "--mig-dynamic" in path.warning and "nvidia-ctk runtime configure" in path.warning
    assert "nvidia-ctk cdi generate" in path.warning
    assert path.cdi_gpu_devices[0] == "nvidia.com/gpu=all"
    assert path.view()["cdi_gpu_devices"] == 4


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("29.2.0", (29, 2)), ("29.2.0-rc.1", (29, 2)), ("v28.5.1", (28, 5)), ("dev", None)],
)
def test_engine_version(text, parsed):
    assert engine_version(text) == parsed


def spec(gpu_uuid: str | None, *, device_request: bool = True) -> ContainerSpec:
    return ContainerSpec(
        name="sandman-alice-0001",
        image="gpu-workspace",
        hostname="alice",
        env={"NVIDIA_VISIBLE_DEVICES": gpu_uuid or "void"},
        labels={},
        workspace=Path("/srv/ws/alice"),
        home="/home/alice",
        network="sandman",
        pids_limit=512,
        gpu_uuid=gpu_uuid,
        device_request=device_request,
        cap_add=("CHOWN",),
    )


def test_the_create_body_asks_for_exactly_the_sessions_gpu():
    host = container_config(spec("MIG-abc"))["HostConfig"]
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["MIG-abc"], "Capabilities": [["gpu"]]}
    ]
    assert "Runtime" not in host
    assert (host["CapDrop"], host["CapAdd"], host["PidsLimit"]) == (["ALL"], ["CHOWN"], 512)
    assert host["SecurityOpt"] == ["no-new-privileges:true"]


def test_on_the_runtime_path_the_body_names_the_runtime_and_no_device_request():
    body = container_config(spec("MIG-abc"), NVIDIA_RUNTIME)
    assert body["HostConfig"]["Runtime"] == "nvidia"
    assert "DeviceRequests" not in body["HostConfig"]
    assert "NVIDIA_VISIBLE_DEVICES=MIG-abc" in body["Env"]  # what the runtime resolves


@pytest.mark.parametrize("delivery", [DEVICE_REQUEST, NVIDIA_RUNTIME])
def test_no_gpu_no_device_whatever_the_path(delivery):
    for unpinned in (spec(None), spec("GPU-x", device_request=False)):
        host = container_config(unpinned, delivery)["HostConfig"]
        assert "DeviceRequests" not in host and "Runtime" not in host
    assert gpu_host_config(delivery, "GPU-x") != {}
