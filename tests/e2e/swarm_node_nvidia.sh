#!/bin/sh
# The nested Swarm worker's stand-in for the NVIDIA Container Runtime (tests/e2e/swarm.py): an
# OCI runtime that wraps runc and, as a container is created, gives it an nvidia-smi that
# lists the GPU slices the engine assigned it (DOCKER_RESOURCE_* in its environment, which the
# toolkit's swarm-resource setting reads), as the toolkit injects the driver's nvidia-smi with
# the utility capability; a container assigned none gets nothing. Besides `-L` it answers the
# idle reading's queries: compute apps (one while the file /tmp/sandman-fake-gpu-app exists in
# the task: a user's job, test-only) and utilisation ([N/A] for a MIG device, as the driver
# says, else 0). Test knob: the UUIDs in $VISIBLE (one a line) are listed instead, as a
# toolkit whose settings defeat the pin would expose other devices.
VISIBLE=/etc/sandman-fake-nvidia/visible

bundle=
create=
previous=
for arg in "$@"; do
  case "$previous" in --bundle | -b) bundle=$arg ;; esac
  [ "$arg" = create ] && create=1
  previous=$arg
done
config="$bundle/config.json"
if [ -n "$create" ] && [ -f "$config" ]; then
  # the spec is one line of JSON: "env":["K=V",...] and "root":{"path":"..."}
  assigned=$(grep -o '"DOCKER_RESOURCE_[^"=]*=[^"]*"' "$config" | sed 's/^"[^=]*=//; s/"$//' | tr ',' '\n')
  if [ -n "$assigned" ]; then
    [ -f "$VISIBLE" ] && assigned=$(cat "$VISIBLE")
    rootfs=$(sed -n 's/.*"root":{"path":"\([^"]*\)".*/\1/p' "$config")
    case "$rootfs" in /*) ;; *) rootfs="$bundle/$rootfs" ;; esac
    mkdir -p "$rootfs/usr/share/sandman-fake-nvidia"
    cat >"$rootfs/usr/bin/nvidia-smi" <<'SMI'
#!/bin/sh
listing=/usr/share/sandman-fake-nvidia/listing
case "$*" in
  -L) cat "$listing" ;;
  "--query-compute-apps=pid,used_memory --format=csv,noheader")
    if [ -e /tmp/sandman-fake-gpu-app ]; then echo '4242, 310 MiB'; fi ;;
  "--query-gpu=utilization.gpu --format=csv,noheader,nounits")
    if grep -q '  MIG ' "$listing"; then echo '[N/A]'; else echo 0; fi ;;
  *) echo "fake nvidia-smi: not faked: $*" >&2; exit 2 ;;
esac
SMI
    {
      index=0
      for uuid in $assigned; do
        case "$uuid" in
          MIG-*) [ $index = 0 ] && echo "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-e2e-parent)"
                 echo "  MIG 1g.10gb     Device  $index: (UUID: $uuid)" ;;
          *) echo "GPU $index: NVIDIA A100-SXM4-80GB (UUID: $uuid)" ;;
        esac
        index=$((index + 1))
      done
    } >"$rootfs/usr/share/sandman-fake-nvidia/listing"
    chmod 0755 "$rootfs/usr/bin/nvidia-smi"
  fi
fi
exec runc "$@"
