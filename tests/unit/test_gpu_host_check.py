"""scripts/gpu-host-check.sh against fake ``nvidia-smi``, ``docker``, ``nvidia-ctk``,
``sandman``, ``capsh`` and ``pgrep`` on PATH: one verdict per item, never a change.

The fakes print what the real tools print on an H100 host (``nvidia-smi`` query CSV, the
``-lgip``/``-lgi`` tables, ``docker info`` JSON, ``nvidia-ctk cdi list``), log every call,
and fail on anything they were not written for.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-host-check.sh"
TOOLS = ("bash", "python3", "grep", "head", "sed", "sort", "paste", "cat")
MIG = "MIG-0d1e2f3a-0000-5555-aaaa-0123456789ab"

FAKES = {
    "nvidia-smi": """
case "$*" in
  "--query-gpu=driver_version --format=csv,noheader") cat "$FAKE/driver" ;;
  "--query-gpu=index,name,mig.mode.current,mig.mode.pending --format=csv,noheader")
      cat "$FAKE/gpus" ;;
  "mig -lgip") cat "$FAKE/lgip" ;;
  "mig -lgi") cat "$FAKE/lgi" ;;
  "-L") cat "$FAKE/list" ;;
  *) echo "fake nvidia-smi: unexpected $*" >&2; exit 9 ;;
esac""",
    "docker": """
[ "$*" = "info --format {{json .}}" ] || { echo "unexpected $*" >&2; exit 9; }
cat "$FAKE/docker-info" """,
    "nvidia-ctk": """
case "$*" in
  --version) echo "NVIDIA Container Toolkit CLI version 1.18.1" ;;
  "cdi list") cat "$FAKE/cdi-list" ;;
  *) echo "unexpected $*" >&2; exit 9 ;;
esac""",
    "sandman": """
[ "$*" = "gpus --probe" ] || exit 9
cat "$FAKE/probe" """,
    "capsh": """
[ "$*" = "--drop=cap_sys_admin -- -c sandman gpus --probe" ] || exit 9
cat "$FAKE/probe-no-admin" """,
    "pgrep": """[ -e "$FAKE/dcgm" ]""",
}

LGIP = """\
+-----------------------------------------------------------------------------+
| GPU instance profiles:                                                      |
| GPU   Name             ID    Instances   Memory     P2P    SM    DEC   ENC  |
|===========================================================================|
|   0  MIG 1g.10gb       19     7/7        9.75       No     16     1     0   |
|   0  MIG 3g.40gb        9     2/2        39.50      No     60     3     0   |
|   0  MIG 7g.80gb        0     1/1        79.25      No     132    7     0   |
+-----------------------------------------------------------------------------+
"""
LGI = """\
+-------------------------------------------------------+
| GPU instances:                                        |
| GPU   Name             Profile  Instance   Placement  |
|                          ID       ID       Start:Size |
|=======================================================|
|   0  MIG 3g.40gb          9        1          4:4     |
+-------------------------------------------------------+
"""


def probe(denied: bool = False) -> str:
    errors = [{"call": "nvmlDeviceGetGpuInstances(0, profile id 9)", "error": "x", "code": 4}]
    return json.dumps({"nvml": True, "gpus": [{"index": 0}], "errors": errors if denied else []})


def docker_info(version: str, *, cdi: bool, runtime: bool) -> str:
    runtimes = {"runc": {}, **({"nvidia": {}} if runtime else {})}
    dirs = ["/etc/cdi", "/var/run/cdi"] if cdi else []
    return json.dumps({"ServerVersion": version, "CDISpecDirs": dirs, "Runtimes": runtimes})


@pytest.fixture
def host(tmp_path):
    """A healthy H100 host: MIG on, both cap nodes, Docker 29.2 with CDI and the runtime."""
    fake, bin_dir, caps = tmp_path / "fake", tmp_path / "bin", tmp_path / "caps"
    for folder in (fake, bin_dir, caps):
        folder.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").unlink()  # the interpreter itself, not a shim that needs PATH
    (bin_dir / "python3").symlink_to(Path(sys.executable).resolve())
    for name, body in FAKES.items():
        script = bin_dir / name
        script.write_text(f'#!/bin/bash\necho "{name} $*" >> "$FAKE/calls"\n{body}\n')
        script.chmod(0o755)
    files = {
        "driver": "580.95.05\n",
        "gpus": "0, NVIDIA H100 80GB HBM3, Enabled, Enabled\n",
        "lgip": LGIP,
        "lgi": LGI,
        "list": "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-h100)\n"
        f"  MIG 3g.40gb Device 0: (UUID: {MIG})\n",
        "docker-info": docker_info("29.2.0", cdi=True, runtime=True),
        "cdi-list": f"nvidia.com/gpu=0\nnvidia.com/gpu=GPU-h100\nnvidia.com/gpu={MIG}\n",
        "probe": probe(),
        "probe-no-admin": probe(),
    }
    for name, text in files.items():
        (fake / name).write_text(text)
    (caps / "nvidia-cap1").touch()
    (caps / "nvidia-cap2").touch()
    return tmp_path


def run(host: Path, **env: str) -> tuple[int, dict[str, str]]:
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={"PATH": str(host / "bin"), "FAKE": str(host / "fake"),
             "NVIDIA_CAPS_DIR": str(host / "caps"), **env},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    verdicts = {}
    for line in result.stdout.splitlines():
        level, item, detail = line.split(maxsplit=2) if ":" in line else (line, "", "")
        verdicts[item.rstrip(":")] = f"{level} {detail}"
    calls = (host / "fake" / "calls").read_text() if (host / "fake" / "calls").exists() else ""
    assert result.stderr == "" or "unexpected" not in result.stderr, result.stderr
    for changing in ("-mig ", "-r", "-cgi", "-dgi", "-cci", "-dci", "--gpu-reset", "generate"):
        assert f" {changing}" not in calls.replace("mig -lgi", ""), calls  # read-only
    return result.returncode, verdicts


def test_a_ready_host_passes_every_item(host):
    rc, verdicts = run(host)
    assert rc == 0, verdicts
    assert verdicts["driver"] == "OK 580.95.05"
    assert verdicts["gpu-0"] == "OK NVIDIA H100 80GB HBM3: MIG Enabled"
    assert verdicts["profiles"] == "OK 1g.10gb 3g.40gb 7g.80gb"
    assert verdicts["instances"] == "OK 1 GPU instance(s)"
    assert verdicts["cap-config"].startswith("OK") and verdicts["cap-monitor"].startswith("OK")
    assert "CDI" in verdicts["docker"] and verdicts["docker"].startswith("OK")
    assert verdicts["cdi-spec"] == "OK 3 device(s), every MIG device listed"
    assert verdicts["probe"] == "OK 1 GPU(s)" and verdicts["probe-no-admin"] == "OK 1 GPU(s)"
    assert verdicts["dcgm"].startswith("OK")
    assert all(v.split()[0] in ("OK", "WARN", "FAIL", "SKIP") for v in verdicts.values())


def test_the_first_day_traps_are_each_named(host):
    fake = host / "fake"
    (fake / "gpus").write_text("0, NVIDIA H100 80GB HBM3, Enabled, Disabled\n")
    (fake / "docker-info").write_text(docker_info("29.2.0", cdi=True, runtime=False))
    (fake / "cdi-list").write_text("nvidia.com/gpu=0\n")  # written before the MIG instance
    (fake / "probe-no-admin").write_text(probe(denied=True))
    (fake / "dcgm").touch()
    (host / "caps" / "nvidia-cap1").unlink()
    rc, verdicts = run(host, SANDMAN_MIG_DYNAMIC="1")
    assert rc == 1
    assert verdicts["gpu-0"].startswith("WARN") and "stop the gateway and DCGM" in verdicts["gpu-0"]
    assert verdicts["cap-config"].startswith("FAIL") and "nvidia-modprobe" in verdicts["cap-config"]
    assert (
        verdicts["docker"].startswith("FAIL")
        and "nvidia-ctk runtime configure" in verdicts["docker"]
    )
    assert verdicts["cdi-spec"].startswith("WARN") and MIG in verdicts["cdi-spec"]
    assert verdicts["probe-no-admin"] == "WARN 1 GPU(s); NoPermission: nvmlDeviceGetGpuInstances"
    assert verdicts["dcgm"].startswith("WARN")


def test_an_old_docker_uses_the_hook(host):
    (host / "fake" / "docker-info").write_text(docker_info("28.5.1", cdi=True, runtime=False))
    rc, verdicts = run(host, SANDMAN_MIG_DYNAMIC="1")
    assert rc == 0 and "toolkit's hook" in verdicts["docker"] and "cdi-spec" not in verdicts


def test_a_host_without_the_driver_says_so_and_carries_on(host):
    (host / "bin" / "nvidia-smi").unlink()
    (host / "fake" / "probe").write_text(json.dumps({"nvml": False, "errors": ["nvmlInit"]}))
    rc, verdicts = run(host)
    assert rc == 1
    assert verdicts["driver"].startswith("FAIL nvidia-smi not found")
    assert verdicts["mig"] == "SKIP no GPU has MIG enabled"
    assert verdicts["cap-config"].startswith("OK")  # the nodes are still there
    assert verdicts["probe"].startswith("FAIL")


def test_a_driver_upgraded_without_a_reboot(host):
    script = host / "bin" / "nvidia-smi"
    script.write_text(
        "#!/bin/bash\necho 'Failed to initialize NVML: Driver/library version mismatch'; exit 18\n"
    )
    rc, verdicts = run(host)
    assert rc == 1 and "version mismatch" in verdicts["driver"]
