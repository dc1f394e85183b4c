# Sandman: with the gateway's --tmux-attach (it copies /etc/sandman/tmux-attach in), an
# interactive SSH login lands in the user's persistent tmux session "main", made or
# re-attached, so work survives a dropped connection. Only interactive login shells with a
# terminal read this file: `ssh host cmd`, scp, sftp, rsync and VS Code's `ssh -T` never do.
# `touch ~/.sandman-no-tmux` opts out; detaching (Ctrl-b d) ends the connection.
if [ -e /etc/sandman/tmux-attach ] && [ -n "${SSH_TTY:-}" ] && [ -z "${TMUX:-}" ] \
   && [ ! -e "$HOME/.sandman-no-tmux" ] && command -v tmux >/dev/null 2>&1; then
  case $- in
    *i*) exec tmux new-session -A -s main ;;
  esac
fi
