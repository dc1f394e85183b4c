"""A node's GPU slices as Swarm node generic resources (``gateway.core.node_slices``) and
``sandman node``, which prints or writes them into a daemon.json."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.core.gpu_types import GpuInfo, MigDevice
from gateway.core.node_slices import node_generic_resources, slice_kind, with_node_resources

EXAMPLES = Path(__file__).parents[2] / "examples"


def mig(uuid: str, profile: str, gi: int, *, split: bool = False) -> MigDevice:
    return MigDevice(uuid, "GPU-m", profile, gi, 0, 10 << 30, split=split)


@pytest.mark.parametrize(
    ("inventory", "offered"),
    [
        ([], []),
        ([GpuInfo("GPU-a", 0, "A100")], ["NVIDIA-GPU=GPU-a"]),
        (
            [
                GpuInfo(
                    "GPU-m",
                    1,
                    "H100",
                    mig_enabled=True,
                    mig_devices=(mig("MIG-2", "3g.40gb", 2), mig("MIG-1", "1g.10gb", 1)),
                )
            ],
            ["MIG-1g.10gb=MIG-1", "MIG-3g.40gb=MIG-2"],
        ),
        ([GpuInfo("GPU-m", 0, "H100", mig_enabled=True)], []),  # MIG on, no instance yet
        (
            [
                GpuInfo(
                    "GPU-m",
                    0,
                    "H100",
                    mig_enabled=True,
                    mig_devices=(mig("MIG-s", "1c.3g.40gb", 1, split=True),),
                )
            ],
            [],
        ),
        ([GpuInfo("GPU-x", 0, "A100", error="GPU is lost")], []),
        (
            [GpuInfo("GPU-b", 1, "A100"), GpuInfo("GPU-a", 0, "A100")],
            ["NVIDIA-GPU=GPU-a", "NVIDIA-GPU=GPU-b"],
        ),
    ],
)
def test_a_nodes_slices_as_generic_resources(inventory, offered):
    assert node_generic_resources(inventory) == offered


@pytest.mark.parametrize(("profile", "kind"), [("1g.10gb", "MIG-1g.10gb"), ("full", "NVIDIA-GPU")])
def test_slice_kinds(profile, kind):
    assert slice_kind(profile) == kind


@pytest.mark.parametrize(
    ("daemon", "offered", "merged"),
    [
        ({}, ["NVIDIA-GPU=GPU-a"], {"node-generic-resources": ["NVIDIA-GPU=GPU-a"]}),
        ({"node-generic-resources": ["MIG-1g.10gb=MIG-old", "SSD=1"], "debug": True},
         ["MIG-1g.10gb=MIG-new"],
         {"node-generic-resources": ["SSD=1", "MIG-1g.10gb=MIG-new"], "debug": True}),
        ({"node-generic-resources": ["NVIDIA-GPU=GPU-gone"], "debug": True}, [], {"debug": True}),
    ],
)  # fmt: skip
def test_writing_slices_keeps_the_daemons_other_settings(daemon, offered, merged):
    assert with_node_resources(daemon, offered) == merged


def test_sandman_node_prints_and_writes_the_slices_of_a_simulated_host(tmp_path):
    config = tmp_path / "daemon.json"
    config.write_text(json.dumps({"default-runtime": "nvidia"}))
    out = io.StringIO()
    argv = ["node", "--gpus", f"sim:{EXAMPLES / 'topology-mixed.json'}", "--write", str(config)]
    assert main(argv, env={}, out=out, err=io.StringIO()) == 0
    printed = json.loads(out.getvalue())["node-generic-resources"]
    kinds = sorted({r.split("=")[0] for r in printed})
    assert kinds == ["MIG-1g.10gb", "MIG-2g.20gb", "MIG-3g.40gb", "NVIDIA-GPU"]
    written = json.loads(config.read_text())
    assert written == {"default-runtime": "nvidia", "node-generic-resources": printed}


def test_sandman_node_without_gpus_says_why(tmp_path):
    err = io.StringIO()
    argv = ["node", "--gpus", f"sim:{tmp_path / 'missing.json'}"]
    assert main(argv, env={}, out=io.StringIO(), err=err) == 1
    assert err.getvalue().startswith("sandman node: ")
