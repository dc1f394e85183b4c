"""The compose GPU overrides, as Compose merges them: what the gateway container gets.

No GPU is needed to check them: they are read as Compose reads them (``devices`` lists are
merged across files), and each MIG capability node matches the minor number the driver
gives it (``/proc/driver/nvidia/capabilities/mig/{config,monitor}``: 1 and 2).
"""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CAP_NODES = {"config": "/dev/nvidia-caps/nvidia-cap1", "monitor": "/dev/nvidia-caps/nvidia-cap2"}


def gateway(*files: str) -> dict:
    merged: dict = {"environment": {}, "devices": [], "cap_add": []}
    for name in files:
        service = yaml.safe_load((ROOT / name).read_text())["services"]["gateway"]
        merged["environment"].update(service.get("environment", {}))
        merged["devices"] += service.get("devices", [])
        merged["cap_add"] += service.get("cap_add", [])
        merged["deploy"] = service.get("deploy") or merged.get("deploy")
    return merged


def host_paths(service: dict) -> set[str]:
    return {entry.split(":")[0] for entry in service["devices"]}


def test_the_gpu_override_reads_mig_state_on_either_path():
    service = gateway("docker-compose.yml", "docker-compose.gpu.yml")
    assert service["environment"]["NVIDIA_MIG_MONITOR_DEVICES"] == "all"  # the hook path
    assert host_paths(service) == {CAP_NODES["monitor"]}  # the CDI path
    assert "SYS_ADMIN" in service["cap_add"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "utility" in device["capabilities"]


def test_mig_dynamic_adds_the_config_node():
    service = gateway(
        "docker-compose.yml", "docker-compose.gpu.yml", "docker-compose.mig-dynamic.yml"
    )
    assert service["environment"]["NVIDIA_MIG_CONFIG_DEVICES"] == "all"
    assert host_paths(service) == set(CAP_NODES.values())
    assert all(entry.split(":")[0] == entry.split(":")[1] for entry in service["devices"])
