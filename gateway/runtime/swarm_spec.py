"""What the Swarm runtime asks the engine for: the service of a session, its files as
secrets and configs, and where its task may run. Pure: dicts in the Engine API's shape."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.core.node_slices import slice_kind
from gateway.runtime.base import ContainerFile, ContainerSpec

#: Where a task finds the gateway's files (secrets and configs), mirroring their paths.
FILES_ROOT = "/run/sandman-files"
#: With shared workspaces: the sentinel file in the workspace root, and where tasks see it.
SHARED_SENTINEL = ".sandman-shared"
SHARED_SENTINEL_TARGET = "/run/sandman-shared"
#: The workspace image's entrypoint (workspace-image/Dockerfile).
IMAGE_ENTRYPOINT = "/usr/local/sbin/sandman-entrypoint"
#: Labels the secrets and configs of a service carry, to find and remove them with it.
LABEL_SERVICE = "sandman.service"
#: The service's command: pin ``NVIDIA_VISIBLE_DEVICES`` to the GPU slice Swarm assigned
#: (``DOCKER_RESOURCE_<KIND>``, a name dash drops, so read from the process's environment),
#: for sshd and, through ``/etc/environment`` (pam_env), the user's logins;
#: install the files where the image expects them (root-owned, modes kept), then run the
#: image's entrypoint with no-new-privileges.
INSTALL_AND_RUN = f"""set -eu
assigned=$(tr '\\0' '\\n' < /proc/$$/environ | sed -n 's/^DOCKER_RESOURCE_[^=]*=//p' | head -n 1)
if [ -n "$assigned" ]; then
  export NVIDIA_VISIBLE_DEVICES="$assigned"
  echo "NVIDIA_VISIBLE_DEVICES=$assigned" >> /etc/environment
fi
if [ -n "${{SANDMAN_SHARED_TOKEN:-}}" ] \\
   && [ "$(cat {SHARED_SENTINEL_TARGET} 2>/dev/null)" != "$SANDMAN_SHARED_TOKEN" ]; then
  echo "sandman: this node's workspace root is not the gateway's shared one" >&2
  exit 65
fi
cd {FILES_ROOT}
find . -type f | while IFS= read -r f; do
  install -D -o 0 -g 0 -m "$(stat -Lc %a "$f")" "$f" "/${{f#./}}"
done
exec setpriv --no-new-privs -- "$@"
"""


def network_config_name(network: str) -> str:
    """The config-only network holding ``network``'s options, one on every node."""
    return f"{network}-config"


def file_object_name(service: str, file: ContainerFile) -> str:
    """A secret's or config's name: the service's, plus a hash of path, content and mode
    (objects are immutable, so a retried start finds the same one)."""
    digest = hashlib.sha256(f"{file.path}\0{file.mode}\0".encode() + file.content).hexdigest()
    return f"{service}.{digest[:16]}"


def is_secret(file: ContainerFile) -> bool:
    """Files only root may read travel as secrets (encrypted at rest in the Raft log)."""
    return file.mode & 0o077 == 0


def file_reference(file: ContainerFile, object_id: str, name: str) -> dict[str, Any]:
    """The service's reference to the secret or config holding ``file``."""
    id_key = "SecretID" if is_secret(file) else "ConfigID"
    name_key = "SecretName" if is_secret(file) else "ConfigName"
    target = {"Name": f"{FILES_ROOT}{file.path}", "UID": "0", "GID": "0", "Mode": file.mode}
    return {id_key: object_id, name_key: name, "File": target}


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a session's task may run: pinned to the gateway's node (``node_id``), or, with
    shared workspaces, on any node whose workspace root holds the sentinel ``token``."""

    node_id: str | None = None
    sentinel: str | None = None  # the sentinel file's path (the same on every node)
    token: str | None = None


def service_spec(
    spec: ContainerSpec, references: Sequence[dict[str, Any]], placement: Placement
) -> dict:
    """The ``services/create`` body for ``spec`` (aiodocker turns ``Env`` into a list)."""
    limits: dict[str, Any] = {"Pids": spec.pids_limit}
    if spec.cpu_limit is not None:
        limits["NanoCPUs"] = round(spec.cpu_limit * 1e9)
    if spec.memory_limit is not None:
        limits["MemoryBytes"] = spec.memory_limit
    workspace = {"Type": "bind", "Source": str(spec.workspace), "Target": spec.home}
    container: dict[str, Any] = {
        "Image": spec.image,
        "Hostname": spec.hostname,
        "Env": dict(spec.env),
        "Labels": dict(spec.labels),
        "Command": ["/bin/sh", "-c", INSTALL_AND_RUN, "sandman-install", IMAGE_ENTRYPOINT],
        "Mounts": [workspace],
        "CapabilityDrop": ["ALL"],
        "CapabilityAdd": list(spec.cap_add),
        "Init": False,
        "Secrets": [r for r in references if "SecretID" in r],
        "Configs": [r for r in references if "ConfigID" in r],
    }
    resources: dict[str, Any] = {"Limits": limits}
    if spec.gpu_slice is not None:  # Swarm places the task on a node with one free
        slice_request = {"DiscreteResourceSpec": {"Kind": slice_kind(spec.gpu_slice), "Value": 1}}
        resources["Reservations"] = {"GenericResources": [slice_request]}
    constraints = [] if placement.node_id is None else [f"node.id=={placement.node_id}"]
    if placement.sentinel is not None and placement.token is not None:
        container["Env"]["SANDMAN_SHARED_TOKEN"] = placement.token
        sentinel = {"Source": placement.sentinel, "Target": SHARED_SENTINEL_TARGET}
        container["Mounts"].append({"Type": "bind", **sentinel, "ReadOnly": True})
    return {
        "name": spec.name,
        "labels": dict(spec.labels),
        "task_template": {
            "ContainerSpec": container,
            "Resources": resources,
            # a task that dies is started again (fresh, files again); a task that keeps
            # dying ends the session (no task left wants to run)
            "RestartPolicy": {"Condition": "any", "Delay": 500_000_000, "MaxAttempts": 3},
            "Placement": {"Constraints": constraints},
            "Networks": [{"Target": spec.network}],
        },
        "mode": {"Replicated": {"Replicas": 1}},
        "endpoint_spec": {
            "Mode": "dnsrr",  # no virtual IP: this kernel may lack ip_vs
            "Ports": [{"Protocol": "tcp", "TargetPort": 22, "PublishMode": "host"}],
        },
    }
