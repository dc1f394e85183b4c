import sqlite3

import pytest

from gateway.errors import DatabaseTooNew
from gateway.store import Store
from gateway.store.migrations import MIGRATIONS, SCHEMA_VERSION, migrate


def _version(conn):
    return conn.execute("PRAGMA user_version").fetchone()[0]


def test_fresh_database_reaches_latest(tmp_path):
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    assert migrate(conn) == 0
    assert _version(conn) == SCHEMA_VERSION
    assert migrate(conn) == SCHEMA_VERSION  # idempotent


def test_version_one_database_keeps_rows_and_gains_gpu_columns(tmp_path):
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO users VALUES ('alice', 10000, 0)")
    conn.execute(
        "INSERT INTO sessions (id, user_id, ssh_port, image, workspace, ttl_seconds, created_at,"
        " expires_at, state) VALUES ('s1', 'alice', 10000, 'img', '/w', 60, 0, 60, 'running')"
    )
    assert migrate(conn) == 1
    row = conn.execute("SELECT user_id, gpu_uuid, gpu_created FROM sessions").fetchone()
    assert row == ("alice", None, 0)
    conn.execute("UPDATE sessions SET gpu_uuid = 'MIG-1'")
    conn.execute("INSERT INTO users (user_id, uid, created_at) VALUES ('bob', 10001, 0)")
    with pytest.raises(sqlite3.IntegrityError):  # the new unique index holds
        conn.execute(
            "INSERT INTO sessions (id, user_id, ssh_port, image, workspace, ttl_seconds,"
            " created_at, expires_at, state, gpu_uuid)"
            " VALUES ('s2', 'bob', 10001, 'img', '/w', 60, 0, 60, 'running', 'MIG-1')"
        )


def test_newer_database_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(DatabaseTooNew, match="newer"):
        migrate(conn)


def test_failed_step_rolls_back(tmp_path, monkeypatch):
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    broken = (*MIGRATIONS[:1], "CREATE TABLE extra (x INTEGER); THIS IS NOT SQL")
    monkeypatch.setattr("gateway.store.migrations.MIGRATIONS", broken)
    monkeypatch.setattr("gateway.store.migrations.SCHEMA_VERSION", 2)
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn)
    assert _version(conn) == 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "extra" not in tables and "sessions" in tables


async def test_store_opens_in_wal_mode_with_stable_uids(tmp_path):
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, tzinfo=UTC)
    async with await Store.open(tmp_path / "s.db") as store:
        assert (await store.ensure_user("alice", now)).uid == 10000
        assert (await store.ensure_user("bob", now)).uid == 10001
        assert (await store.ensure_user("alice", now)).uid == 10000
        first = await store.instance_id()
    async with await Store.open(tmp_path / "s.db") as store:
        assert await store.instance_id() == first
        assert (await store.ensure_user("alice", now)).uid == 10000
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_version_seven_sessions_survive_fair_sharing_with_no_usage_or_claim(tmp_path):
    from datetime import UTC, datetime

    conn = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    for step in MIGRATIONS[:7]:
        conn.executescript(step)
    conn.execute("PRAGMA user_version = 7")
    conn.execute("INSERT INTO users (user_id, uid, created_at) VALUES ('alice', 10000, 0)")
    conn.execute(
        "INSERT INTO sessions (id, user_id, ssh_port, image, workspace, ttl_seconds, created_at,"
        " expires_at, state) VALUES ('s1', 'alice', 10000, 'img', '/w', 60, 0, 60, 'running')"
    )
    conn.close()
    async with await Store.open(tmp_path / "s.db") as store:
        session = await store.get_session("s1")
        assert session is not None and session.claim_by is None
        assert await store.queued() == []
        assert await store.usage(datetime(1970, 1, 1, tzinfo=UTC)) == {}
        assert await store.user_budget("alice") == (False, None)
