"""SSH identity and login: the host CA and per-user host keys, users' login credentials, and
the readiness check that proves a session's own sshd answers."""
