#!/bin/bash
# Sandman workspace entrypoint (PID 1, root): create the session user's account
# from the environment, configure sshd for that user only, then exec sshd.
# Safe to run again when the container restarts.
#
# Environment (set by the gateway at container create time):
#   SANDMAN_USER            Linux user name, ^[a-z_][a-z0-9_-]{0,31}$       (required)
#   SANDMAN_UID             user id, 10000..2147483647                      (required)
#   SANDMAN_GID             primary group id, 10000..2147483647             (required)
#   SANDMAN_PASSWORD_AUTH   yes|no (default no); yes needs the password hash file
# Files (copied in by the gateway before start; secrets root-only, never in the env):
#   /etc/ssh/ssh_host_ed25519_key{,.pub,-cert.pub}  the user's host key and this
#                           session's certificate from the gateway's host CA (required)
#   /etc/ssh/authorized_keys/$SANDMAN_USER  keys that may log in, each with an
#                           expiry-time= option (the session's end)          (required)
#   /etc/sandman/password-hash  crypt(3) hash, e.g. bcrypt $2b$...; absent = no password
#   /etc/sandman/session.json   facts about the session (user, expiry, GPU)
#   /etc/ssh/sandman_forwarding.conf  agent / Unix socket forwarding as the gateway's
#                           settings say (sshd_config includes it; absent = its defaults)
#   /etc/sandman/tmux-attach    present with --tmux-attach (/etc/profile.d reads it)
#   /etc/ssh/authorized_keys/root  the gateway's control key, forced to run
#                           sandman-control (--runtime swarm); absent = no root login at all
# The home /home/$SANDMAN_USER is expected to be a bind mount already owned by
# uid:gid; it is never chowned, and /etc/skel files are only added if absent.
set -euo pipefail

die() { echo "sandman-entrypoint: error: $*" >&2; exit 64; }
log() { echo "sandman-entrypoint: $*" >&2; }

user="${SANDMAN_USER:-}"
uid="${SANDMAN_UID:-}"
gid="${SANDMAN_GID:-}"
pwauth="${SANDMAN_PASSWORD_AUTH:-no}"
host_key=/etc/ssh/ssh_host_ed25519_key
hash_file=/etc/sandman/password-hash
hash=""
[[ -f "$hash_file" ]] && hash="$(<"$hash_file")"

# --- validate ---------------------------------------------------------------
[[ -n "$user" ]] || die "SANDMAN_USER is not set"
[[ "$user" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "SANDMAN_USER '$user' is not a valid user name"
[[ "$user" != root ]] || die "SANDMAN_USER must not be root"
for v in uid gid; do
  n="${!v}"
  [[ -n "$n" ]] || die "SANDMAN_${v^^} is not set"
  [[ "$n" =~ ^[1-9][0-9]{0,9}$ ]] && (( n >= 10000 && n <= 2147483647 )) \
    || die "SANDMAN_${v^^} '$n' must be a number from 10000 to 2147483647"
done
for f in "$host_key" "$host_key-cert.pub" "/etc/ssh/authorized_keys/$user"; do
  [[ -s "$f" ]] || die "$f is missing (the gateway copies it in before start)"
done
if [[ -n "$hash" ]]; then
  [[ "$hash" =~ ^\$[a-z0-9]{1,3}\$[A-Za-z0-9./\$=,]+$ ]] \
    || die "$hash_file does not hold a crypt(3) hash"
  # Make sure this libcrypt knows the scheme (else every login would fail);
  # bcrypt is probed at cost 04, not the hash's own (~0.2 s at cost 12).
  probe="$hash"
  [[ "$hash" =~ ^\$2[abxy]\$[0-9]{2}\$ ]] && probe="${hash:0:4}04${hash:6}"
  if command -v perl >/dev/null; then
    H="$probe" perl -e 'my $c = crypt("probe", $ENV{H}); exit(defined $c && $c =~ /^\$/ ? 0 : 1)' \
      || die "$hash_file is not a hash this image's libcrypt can check (unknown scheme or malformed)"
  fi
fi
case "$pwauth" in
  yes) [[ -n "$hash" ]] || die "SANDMAN_PASSWORD_AUTH=yes needs $hash_file" ;;
  no) ;;
  *) die "SANDMAN_PASSWORD_AUTH must be yes or no, not '$pwauth'" ;;
esac
home="/home/$user"

# --- group and user (idempotent) --------------------------------------------
if ! getent group "$gid" >/dev/null; then
  ! getent group "$user" >/dev/null || die "group '$user' exists with another gid"
  groupadd -g "$gid" "$user"
fi
if pw=$(getent passwd "$user"); then
  IFS=: read -r _ _ have_uid have_gid _ <<<"$pw"
  [[ "$have_uid" == "$uid" ]] || die "user '$user' already exists with uid $have_uid"
  [[ "$have_gid" == "$gid" ]] || usermod -g "$gid" "$user"
else
  ! getent passwd "$uid" >/dev/null || die "uid $uid already belongs to another user"
  useradd -l -M -N -u "$uid" -g "$gid" -d "$home" -s /bin/bash "$user"
fi
# '*' = no usable password (key login still works), unlike '!' (locked).
printf '%s:%s\n' "$user" "${hash:-*}" | chpasswd -e

# --- home: the bind-mounted workspace; never chowned -------------------------
if [[ ! -d "$home" ]]; then
  log "warning: $home is not mounted; creating an empty one"
  mkdir -p -m 0750 "$home" && chown "$uid:$gid" "$home"
fi
# Copy skeleton files as the user (root has no CAP_DAC_OVERRIDE here); -n keeps
# user files. Entry by entry, so the home folder's own mode and times stay as they are.
setpriv --reuid="$uid" --regid="$gid" --clear-groups -- \
  find /etc/skel -mindepth 1 -maxdepth 1 -exec cp -an -t "$home/" {} + \
  || log "warning: could not copy /etc/skel into $home (is it owned by $uid:$gid?)"

# --- ssh: keys are the gateway's files (outside the workspace); config -------
install -d -m 0755 -o root -g root /run/sshd

# root may log in only with the gateway's control key, and then only runs sandman-control
# (sshd_config: PermitRootLogin forced-commands-only; the key line says restrict,command=).
allowed="$user"
[[ -s /etc/ssh/authorized_keys/root ]] && allowed="$user root"
cat >/etc/ssh/sandman_runtime.conf <<EOF
# Written by sandman-entrypoint at container start.
AllowUsers $allowed
PasswordAuthentication $pwauth
EOF
chmod 0644 /etc/ssh/sandman_runtime.conf

# utmp lets \`wall\` find the user's terminals.
[[ -e /run/utmp ]] || touch /run/utmp

/usr/sbin/sshd -t || die "sshd configuration test failed"
log "starting sshd for user $user (uid $uid, gid $gid, password auth $pwauth)"
exec /usr/sbin/sshd -D -e
