"""What ``nvidia-smi`` run inside a session says its GPU is doing (the control channel's
``{"read": "gpu"}`` on a Swarm node), read strictly: anything unexpected is no reading."""

import pytest

from gateway.core.gpu_activity import command_run, compute_processes, reading, utilization
from gateway.core.idle import Reading

NOT_FOUND = (127, "nvidia-smi: not found")
HUNG = (124, "nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader: no answer")
NO_DRIVER = (
    9,
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure "
    "that the latest NVIDIA driver is installed and running.\n",
)
NO_DEVICES = (6, "No devices were found\n")


@pytest.mark.parametrize(
    ("run", "processes"),
    [
        ((0, ""), False),  # none: csv prints nothing
        ((0, "No running processes found\n"), False),  # older drivers say so
        ((0, "1234, 4096 MiB\n"), True),
        ((0, "1234, 4096 MiB\n5678, 120 MiB\n"), True),
        ((0, "40170, [N/A]\n"), True),  # memory not reported (a MIG device, some drivers)
        ((0, "40170, [Insufficient Permissions]\n"), True),
        ((0, "pid, used_gpu_memory [MiB]\n1234, 10 MiB\n"), None),  # a header: not our query
        ((0, "1234, 4096\n"), None),  # units missing: not the format asked for
        ((0, "Failed to initialize NVML: Unknown Error\n"), None),
        (NOT_FOUND, None),
        (HUNG, None),
        (NO_DRIVER, None),
        (NO_DEVICES, None),
        ((0, "No running processes found\n1234, 10 MiB\n"), None),
    ],
)
def test_compute_processes(run, processes):
    assert compute_processes(*run) is processes


@pytest.mark.parametrize(
    ("run", "percent"),
    [
        ((0, "0\n"), 0.0),
        ((0, "37\n"), 37.0),
        ((0, "100\n"), 100.0),
        ((0, "3\n81\n"), 81.0),  # several devices: the busiest
        ((0, "[N/A]\n"), None),  # a MIG device
        ((0, "[Not Supported]\n"), None),
        ((0, "Not Supported\n"), None),
        ((0, "12\n[N/A]\n"), None),  # one unknown: unknown
        ((0, "37 %\n"), None),  # units: not the format asked for
        ((0, "101\n"), None),
        ((0, ""), None),
        (NOT_FOUND, None),
        (NO_DRIVER, None),
    ],
)
def test_utilization(run, percent):
    assert utilization(*run) == percent


@pytest.mark.parametrize(
    ("apps", "usage", "result"),
    [
        ((0, ""), (0, "0\n"), Reading(0.0, processes=False)),  # a whole GPU, idle
        ((0, "1234, 4096 MiB\n"), (0, "92\n"), Reading(92.0, processes=True)),
        ((0, "1234, 4096 MiB\n"), (0, "[N/A]\n"), Reading(None, processes=True)),  # MIG, a job
        ((0, ""), (0, "[N/A]\n"), Reading(None, processes=False)),  # MIG, nothing runs
        ((0, ""), NOT_FOUND, Reading(None, processes=False)),
        (NOT_FOUND, NOT_FOUND, None),  # no nvidia-smi: unknown, so busy
        (HUNG, (0, "0\n"), None),
        ((0, "garbage"), (0, "0\n"), None),
    ],
)
def test_reading(apps, usage, result):
    assert reading(apps, usage) == result


@pytest.mark.parametrize(
    ("found", "run"),
    [
        ({"exit_code": 0, "output": "x"}, (0, "x")),
        ({"exit_code": "0", "output": ""}, None),
        ({"exit_code": True, "output": ""}, None),
        ({"exit_code": 0, "output": None}, None),
        ({"exit_code": 0, "output": "", "more": 1}, None),
        ([0, ""], None),
        (None, None),
    ],
)
def test_command_run_is_read_strictly(found, run):
    assert command_run(found) == run
