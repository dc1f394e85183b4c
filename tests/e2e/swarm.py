"""Helpers of the Swarm end-to-end tests: this engine as a Swarm manager, what a gateway
left in the Swarm, and nested worker nodes (dockerd in a container)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Gateway, docker, wait_for

NODE_IMAGE = os.environ.get("SANDMAN_SWARM_NODE_IMAGE", "sandman-swarm-node:bookworm")
#: A nested worker's image store, kept between runs (loading the workspace image takes
#: 5-20 s); one worker at a time uses it (a lock file).
WORKER_CACHE = Path("/var/tmp/sandman-swarm-worker")
#: Held by a test that uses this engine's Swarm (see :func:`swarm_manager`).
SWARM_LOCK = Path("/var/tmp/sandman-swarm.lock")
NODE_ENTRY = Path(__file__).with_name("swarm_node_entry.sh")
#: The worker's stand-in for the NVIDIA Container Runtime, its engine's default runtime.
NODE_NVIDIA = Path(__file__).with_name("swarm_node_nvidia.sh")
NODE_RUNTIME = ("--add-runtime", "nvidia=/sandman-node-nvidia", "--default-runtime", "nvidia")
#: What dockerd in a container needs (measured): every capability but SYS_RESOURCE (not in
#: this host's bounding set, so --privileged fails), no seccomp/AppArmor, writable /sys.
NODE_SECURITY = (
    *("--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE"),
    *("--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"),
    *("--security-opt", "systempaths=unconfined"),
)


@contextlib.contextmanager
def swarm_manager() -> Iterator[None]:
    """This engine as a single-node Swarm manager (made one unless it is in a Swarm
    already, advertising its docker0 address: reachable by nested nodes, never the
    outside), its node active, for one test. Tests pause and activate this node, so the
    test holds it: a second run alongside waits rather than undo that mid-test."""
    SWARM_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with SWARM_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if docker("info", "--format", "{{.Swarm.LocalNodeState}}") != "active":
            gateway_ip = docker(
                "network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}"
            )
            docker("swarm", "init", "--advertise-addr", gateway_ip)
        set_availability("active")  # a run killed mid-test may have paused it
        yield


def set_availability(availability: str) -> None:
    """Pause or activate this engine's node."""
    node = docker("info", "--format", "{{.Swarm.NodeID}}")
    docker("node", "update", "--availability", availability, node)


def owned(kind: str, instance: str) -> list[str]:
    """The names of the services, secrets or configs labelled with ``instance``."""
    label = f"label=sandman.instance={instance}"
    return docker(kind, "ls", "--filter", label, "--format", "{{.Name}}").split()


def remove_swarm_leftovers(gw: Gateway, instance: str | None) -> None:
    """Services, secrets, configs and both networks of this gateway (the Swarm removes a
    network a moment after its last task: bounded retries)."""
    if instance is not None:
        for kind in ("service", "secret", "config"):
            ids = owned(kind, instance)
            if ids:
                docker(kind, "rm", *ids, check=False)
    for network in (gw.network, f"{gw.network}-config"):
        for _ in range(20):
            if not docker("network", "ls", "-q", "--filter", f"name=^{network}$"):
                break
            docker("network", "rm", network, check=False)
            time.sleep(0.5)


@dataclass
class Worker:
    """A nested Swarm worker: dockerd in a container on this engine's docker0."""

    name: str
    address: str
    node_id: str = ""

    def docker(self, *args: str) -> str:
        return docker("exec", self.name, "docker", *args)

    def expose_gpus(self, *uuids: str) -> None:
        """Make the node's fake NVIDIA toolkit give containers made from now on ``uuids``
        instead of their assigned slices (as toolkit settings that defeat the pin would);
        none: their own slices again."""
        knob = "/etc/sandman-fake-nvidia/visible"
        script = f"mkdir -p {Path(knob).parent} && printf '%s\\n' \"$@\" >{knob}"
        docker("exec", self.name, "sh", "-c", script if uuids else f"rm -f {knob}", "-", *uuids)


@contextlib.contextmanager
def swarm_worker(shared: Path, image: str, resources: list[str]) -> Iterator[Worker]:
    """A worker joined to this engine's Swarm, with ``image`` loaded, ``shared`` bound at
    the same path (shared storage) and the node generic ``resources`` ("KIND=VALUE");
    killed and removed from the Swarm afterwards. Its engine runs containers through a fake
    NVIDIA toolkit (:data:`NODE_NVIDIA`)."""
    if subprocess.run(["docker", "image", "inspect", NODE_IMAGE], capture_output=True).returncode:
        pytest.fail(f"the multi-node test needs the image {NODE_IMAGE} (run: make images)")
    WORKER_CACHE.mkdir(parents=True, exist_ok=True)
    with (WORKER_CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = WORKER_CACHE / "docker"
        # A former worker's membership and networks: a worker killed while in the Swarm
        # leaves each swarm network's local bridge (a /16 or /20 of the default pools) in
        # the store, and after ~30 such runs no session network can be made on it.
        for state in ("swarm", "network"):
            shutil.rmtree(store / state, ignore_errors=True)
        name = f"sandman-test-worker-{secrets.token_hex(3)}"
        generic = [arg for r in resources for arg in ("--node-generic-resource", r)]
        docker("run", "-d", "--name", name, "--hostname", name, *NODE_SECURITY,
               "-v", f"{store}:/var/lib/docker", "-v", f"{NODE_ENTRY}:/sandman-node-entry:ro",
               "-v", f"{NODE_NVIDIA}:/sandman-node-nvidia:ro",
               "-v", f"{shared}:{shared}", "--entrypoint", "/sandman-node-entry",
               NODE_IMAGE, *NODE_RUNTIME, *generic)  # fmt: skip
        worker = Worker(name, docker("inspect", name, "-f", "{{.NetworkSettings.IPAddress}}"))
        try:
            _start_worker(worker, image)
            yield worker
        finally:
            docker("rm", "-f", name, check=False)
            if worker.node_id:
                docker("node", "rm", "--force", worker.node_id, check=False)


def _start_worker(worker: Worker, image: str) -> None:
    def engine_up() -> bool:
        return subprocess.run(["docker", "exec", worker.name, "docker", "info"],
                              capture_output=True).returncode == 0  # fmt: skip

    wait_for(engine_up, timeout=30, what="the nested dockerd")
    worker.docker("container", "prune", "-f")  # tasks of a former run
    wanted = docker("image", "inspect", image, "-f", "{{.Id}}")
    inspect = ["docker", "exec", worker.name, "docker", "image", "inspect", image, "-f", "{{.Id}}"]
    have = subprocess.run(inspect, capture_output=True, text=True).stdout.strip()
    if have != wanted:  # docker save | docker load keeps the image id
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        subprocess.run(["docker", "exec", "-i", worker.name, "docker", "load", "-q"],
                       stdin=save.stdout, check=True, capture_output=True, timeout=180)  # fmt: skip
        assert save.wait(timeout=30) == 0
    token = docker("swarm", "join-token", "-q", "worker")
    manager = docker("info", "-f", "{{(index .Swarm.RemoteManagers 0).Addr}}")
    worker.docker("swarm", "join", "--token", token, "--advertise-addr", worker.address, manager)
    worker.node_id = worker.docker("info", "-f", "{{.Swarm.NodeID}}")
    wait_for(
        lambda: docker("node", "inspect", worker.node_id, "-f", "{{.Status.State}}") == "ready",
        timeout=30,
        what="the worker node to be ready",
    )
