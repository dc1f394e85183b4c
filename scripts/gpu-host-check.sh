#!/usr/bin/env bash
# First-run check of a GPU host for Sandman (docs/gpu-hosts.md). Read-only: it only
# queries, and never changes MIG mode, MIG instances or any other GPU setting.
#
#   sudo bash scripts/gpu-host-check.sh
#
# One verdict line per item: OK, WARN (works, with a caveat), FAIL (fix before serving),
# SKIP (not applicable or cannot be checked). Exit status 1 if any item FAILs.
# Environment: SANDMAN (the sandman command, default "sandman"), NVIDIA_CAPS_DIR
# (default /dev/nvidia-caps), SANDMAN_MIG_DYNAMIC=1 (judge for --mig-dynamic).
set -u

SANDMAN=${SANDMAN:-sandman}
CAPS_DIR=${NVIDIA_CAPS_DIR:-/dev/nvidia-caps}
DYNAMIC=${SANDMAN_MIG_DYNAMIC:-0}
failed=0

verdict() {  # verdict LEVEL ITEM DETAIL
    printf '%-4s %-14s %s\n' "$1" "$2:" "$3"
    [ "$1" = FAIL ] && failed=1
    return 0
}
have() { command -v "$1" >/dev/null 2>&1; }

# --- the driver and its GPUs ---------------------------------------------------------
if ! have nvidia-smi; then
    verdict FAIL driver "nvidia-smi not found: install the NVIDIA driver"
    gpus=""
elif ! driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1); then
    verdict FAIL driver "nvidia-smi fails: $(head -n1 <<< "$driver") (driver not loaded, or upgraded without a reboot)"
    gpus=""
else
    verdict OK driver "$(head -n1 <<< "$driver")"
    gpus=$(nvidia-smi --query-gpu=index,name,mig.mode.current,mig.mode.pending --format=csv,noheader 2>/dev/null)
fi

mig_gpus=0
if [ -n "$gpus" ]; then
    while IFS=, read -r index name current pending; do
        current=${current# }; pending=${pending# }; name=${name# }
        if [ "$current" != "$pending" ]; then
            verdict WARN "gpu-$index" "$name: MIG $current, $pending pending: stop the gateway and DCGM, reset the GPU (nvidia-smi -r -i $index) or reboot"
        else
            verdict OK "gpu-$index" "$name: MIG $current"
        fi
        [ "$current" = Enabled ] && mig_gpus=$((mig_gpus + 1))
    done <<< "$gpus"
fi

# --- MIG profiles and instances (read-only listings) ----------------------------------
if [ "$mig_gpus" -eq 0 ]; then
    verdict SKIP mig "no GPU has MIG enabled"
else
    if profiles=$(nvidia-smi mig -lgip 2>&1); then
        names=$(grep -o 'MIG [0-9]g\.[0-9]*gb[^ ]*' <<< "$profiles" | sed 's/^MIG //' | sort -u | paste -sd ' ')
        verdict OK profiles "${names:-none listed}"
    else
        verdict FAIL profiles "nvidia-smi mig -lgip: $(head -n1 <<< "$profiles")"
    fi
    if instances=$(nvidia-smi mig -lgi 2>&1); then
        count=$(grep -c 'MIG [0-9]' <<< "$instances")
        verdict OK instances "$count GPU instance(s)"
    elif grep -qi 'no gpu instances found' <<< "$instances"; then
        verdict OK instances "none yet (with --mig-dynamic the gateway makes them)"
    else
        verdict WARN instances "nvidia-smi mig -lgi: $(head -n1 <<< "$instances")"
    fi
fi

# --- the MIG capability nodes NVML needs without CAP_SYS_ADMIN -------------------------
for node in "config:nvidia-cap1" "monitor:nvidia-cap2"; do
    cap=${node%%:*}; file="$CAPS_DIR/${node#*:}"
    if [ -e "$file" ]; then
        verdict OK "cap-$cap" "$file"
    elif [ "$mig_gpus" -eq 0 ]; then
        verdict SKIP "cap-$cap" "$file missing (only MIG needs it)"
    else
        verdict FAIL "cap-$cap" "$file missing: nvidia-modprobe -f /proc/driver/nvidia/capabilities/mig/$cap"
    fi
done

# --- the container toolkit and the daemon's GPU path -----------------------------------
if have nvidia-ctk; then
    verdict OK toolkit "$(nvidia-ctk --version 2>&1 | head -n1)"
else
    verdict FAIL toolkit "nvidia-ctk not found: install the NVIDIA Container Toolkit"
fi

if ! have docker; then
    verdict FAIL docker "docker not found"
elif ! info=$(docker info --format '{{json .}}' 2>&1); then
    verdict FAIL docker "docker info: $(head -n1 <<< "$info")"
else
    path=$(python3 -c '
import json, sys
info = json.loads(sys.stdin.read())
version = info.get("ServerVersion") or "?"
dirs = info.get("CDISpecDirs") or []
runtime = "nvidia" in (info.get("Runtimes") or {})
try:
    major, minor = (int(p) for p in version.lstrip("v").split(".")[:2])
except ValueError:
    major = minor = 0
cdi = (major, minor) >= (29, 2) and bool(dirs)
print(version, "cdi" if cdi else "hook", "runtime" if runtime else "no-runtime", ",".join(dirs) or "-")
' <<< "$info" 2>/dev/null) || path=""
    read -r version route runtime dirs <<< "$path"
    if [ -z "$path" ]; then
        verdict WARN docker "docker info is not JSON; cannot tell the GPU path"
    elif [ "$route" = hook ]; then
        verdict OK docker "$version: GPU requests go through the toolkit's hook"
    elif [ "$runtime" = runtime ]; then
        verdict OK docker "$version: CDI ($dirs); the gateway asks for the nvidia runtime, which finds new MIG instances"
    elif [ "$DYNAMIC" = 1 ]; then
        verdict FAIL docker "$version: CDI ($dirs) without the nvidia runtime: --mig-dynamic sessions cannot start; nvidia-ctk runtime configure --runtime=docker"
    else
        verdict WARN docker "$version: CDI ($dirs) without the nvidia runtime: MIG instances made after the spec fail to start; nvidia-ctk runtime configure --runtime=docker"
    fi
    if [ "${route:-}" = cdi ] && have nvidia-ctk; then
        listed=$(nvidia-ctk cdi list 2>/dev/null | grep -c '^nvidia.com/gpu=')
        missing=""
        for mig in $(nvidia-smi -L 2>/dev/null | grep -o 'MIG-[0-9a-f-]*'); do
            nvidia-ctk cdi list 2>/dev/null | grep -qx "nvidia.com/gpu=$mig" || missing="$missing $mig"
        done
        if [ -n "$missing" ]; then
            verdict WARN cdi-spec "$listed device(s); not listed:$missing (nvidia-ctk cdi generate)"
        else
            verdict OK cdi-spec "$listed device(s), every MIG device listed"
        fi
    fi
fi

# --- what the gateway's NVML sees, as root and without CAP_SYS_ADMIN -------------------
probe_verdict() {  # probe_verdict ITEM OUTPUT
    local summary
    summary=$(python3 -c '
import json, sys
report = json.loads(sys.stdin.read())
if not report.get("nvml"):
    print("FAIL", report.get("errors"))
    raise SystemExit
denied = sorted({e["call"].split("(")[0] for e in report.get("errors", []) if e.get("code") == 4})
gpus = len(report.get("gpus", []))
names = "; NoPermission: " + ", ".join(denied) if denied else ""
print("WARN" if denied else "OK", f"{gpus} GPU(s){names}")
' <<< "$2" 2>/dev/null) || summary="FAIL the probe printed no report"
    verdict "${summary%% *}" "$1" "${summary#* }"
}
if ! have "$SANDMAN"; then
    verdict SKIP probe "$SANDMAN not found (set SANDMAN=/path/to/sandman)"
else
    probe_verdict probe "$("$SANDMAN" gpus --probe 2>/dev/null)"
    if have capsh; then
        probe_verdict probe-no-admin "$(capsh --drop=cap_sys_admin -- -c "$SANDMAN gpus --probe" 2>/dev/null)"
    else
        verdict SKIP probe-no-admin "capsh not found (libcap2-bin)"
    fi
fi

# --- processes that hold GPUs (they block MIG changes, resets and releases) ------------
if have pgrep && pgrep -x nv-hostengine >/dev/null 2>&1; then
    verdict WARN dcgm "nv-hostengine runs: stop it before MIG mode changes or resets; it can hold MIG instances the gateway must destroy"
else
    verdict OK dcgm "no nv-hostengine running"
fi

exit "$failed"
