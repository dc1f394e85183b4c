"""Secrets at rest: the state folder is 0700 and everything in it 0600, whatever the umask;
files an older version left readable are tightened."""

import os
import stat

SECRETS = {"sessions.db", "audit.log", "api-token", "ssh_host_ca", "ssh_host_key_seed"}


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


async def test_state_files_are_0600_in_a_0700_folder(make_client, tmp_path):
    old = os.umask(0o022)
    try:
        client = await make_client(api_token=None)  # generates the token file
        token = (tmp_path / "state" / "api-token").read_text().strip()
        resp = await client.post(
            "/sessions", json={"user_id": "ann"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert resp.status == 201
    finally:
        os.umask(old)
    state = tmp_path / "state"
    assert mode(state) == 0o700
    assert {p.name for p in state.iterdir()} >= SECRETS
    private = [p for p in state.iterdir() if p.suffix != ".pub"]  # the CA's public half
    assert {p.name: mode(p) for p in private} == {p.name: 0o600 for p in private}


async def test_readable_database_and_log_are_tightened(make_client, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    for name in ("sessions.db", "audit.log"):
        (state / name).touch(mode=0o644)
        (state / name).chmod(0o644)
    client = await make_client()
    assert (await client.get("/healthz")).status == 200
    assert mode(state / "sessions.db") == mode(state / "audit.log") == 0o600
