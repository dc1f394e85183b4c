"""The versioned schema. ``PRAGMA user_version`` says how many steps a database has had.

Migrations only go forward: each entry of :data:`MIGRATIONS` is applied once, in order,
inside one transaction with the version bump. Never edit a released step; append one.
"""

from __future__ import annotations

import sqlite3

from gateway.errors import DatabaseTooNew

MIGRATIONS: tuple[str, ...] = (
    # 1: users with stable uids, sessions, and the gateway's own facts (instance id).
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE users (
        user_id    TEXT PRIMARY KEY,
        uid        INTEGER NOT NULL UNIQUE,
        created_at REAL NOT NULL
    );
    CREATE TABLE sessions (
        id           TEXT PRIMARY KEY,
        user_id      TEXT NOT NULL UNIQUE REFERENCES users(user_id),
        ssh_port     INTEGER NOT NULL UNIQUE,
        image        TEXT NOT NULL,
        workspace    TEXT NOT NULL,
        ttl_seconds  INTEGER NOT NULL,
        created_at   REAL NOT NULL,
        expires_at   REAL NOT NULL,
        state        TEXT NOT NULL,
        container_id TEXT,
        container_ip TEXT
    );
    CREATE INDEX sessions_expires_at ON sessions(expires_at);
    """,
    # 2: GPU allocation lives on the session row, so it commits with it; a UUID is
    # never held twice.
    """
    ALTER TABLE sessions ADD COLUMN gpu_uuid TEXT;
    ALTER TABLE sessions ADD COLUMN mig_profile TEXT;
    ALTER TABLE sessions ADD COLUMN gpu_created INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX sessions_gpu_uuid ON sessions(gpu_uuid) WHERE gpu_uuid IS NOT NULL;
    """,
    # 3: the audit trail. Kept after sessions end (pruned by retention), so no
    # foreign key to sessions.
    """
    CREATE TABLE connections (
        id            TEXT PRIMARY KEY,
        session_id    TEXT NOT NULL,
        user_id       TEXT NOT NULL,
        client_addr   TEXT NOT NULL,
        client_port   INTEGER NOT NULL,
        started_at    REAL NOT NULL,
        ended_at      REAL,
        bytes_up      INTEGER NOT NULL DEFAULT 0,
        bytes_down    INTEGER NOT NULL DEFAULT 0,
        client_banner TEXT,
        server_banner TEXT,
        closed_by     TEXT,
        reason        TEXT
    );
    CREATE INDEX connections_session ON connections(session_id, started_at);
    CREATE INDEX connections_started ON connections(started_at);
    CREATE TABLE audit_events (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        at            REAL NOT NULL,
        event         TEXT NOT NULL,
        session_id    TEXT,
        user_id       TEXT,
        connection_id TEXT,
        data          TEXT NOT NULL
    );
    CREATE INDEX audit_events_user ON audit_events(user_id, id);
    CREATE INDEX audit_events_session ON audit_events(session_id, id);
    CREATE INDEX audit_events_at ON audit_events(at);
    """,
    # 4: SSH identity. A user's sticky port (given again whenever it is free; when the pool
    # forces it, the longest-unused one goes first), and the public keys a session accepts
    # (rewritten into the container when its expiry moves).
    """
    ALTER TABLE users ADD COLUMN ssh_port INTEGER;
    ALTER TABLE users ADD COLUMN ssh_port_used_at REAL;
    ALTER TABLE sessions ADD COLUMN authorized_keys TEXT NOT NULL DEFAULT '[]';
    """,
    # 5: the lifecycle's third state, ending(reason): written before cleanup starts, so a
    # cleanup that fails half way is finished by the sweep or the next start.
    """
    ALTER TABLE sessions ADD COLUMN end_reason TEXT;
    """,
    # 6: optional CPU (in CPUs) and memory (bytes) limits of the session's container.
    """
    ALTER TABLE sessions ADD COLUMN cpu_limit REAL;
    ALTER TABLE sessions ADD COLUMN memory_limit INTEGER;
    """,
    # 7: idle reclaim. Each session's idle clocks (NULL while a connection is open or
    # compute is busy), its last utilisation reading, its hold and whether it is exempt;
    # stored so a restart keeps the countdown. Goes with its session.
    """
    CREATE TABLE session_idle (
        session_id          TEXT PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
        exempt              INTEGER NOT NULL DEFAULT 0,
        last_connection_at  REAL,
        no_connection_since REAL,
        compute_idle_since  REAL,
        utilization         REAL,
        hold_until          REAL,
        hold_set_at         REAL
    );
    """,
    # 8: fair sharing. The waiting list (a queued request keeps its credentials' public
    # parts, so the 202's key and password work when it starts), each session's hold on
    # GPU capacity (charged against budgets and decayed for the queue's order), per-user
    # GPU-hour budgets (NULL: the gateway's default), and the deadline by which a session
    # started from the queue must see a connection.
    """
    CREATE TABLE queue (
        id              TEXT PRIMARY KEY,
        user_id         TEXT NOT NULL REFERENCES users(user_id),
        submitted_at    REAL NOT NULL,
        expires_at      REAL NOT NULL,
        request         TEXT NOT NULL,
        authorized_keys TEXT NOT NULL,
        password_hash   TEXT NOT NULL
    );
    CREATE INDEX queue_user ON queue(user_id);
    CREATE TABLE gpu_usage (
        session_id TEXT PRIMARY KEY,
        user_id    TEXT NOT NULL,
        fraction   REAL NOT NULL,
        started_at REAL NOT NULL,
        ended_at   REAL
    );
    CREATE INDEX gpu_usage_user ON gpu_usage(user_id, started_at);
    CREATE INDEX gpu_usage_ended ON gpu_usage(ended_at);
    ALTER TABLE users ADD COLUMN gpu_hours_per_week REAL;
    ALTER TABLE sessions ADD COLUMN claim_by REAL;
    """,
    # 9: a queued request stays on the list until the session it started runs. While that
    # session's row exists the request is ``starting`` (off the ordered list, still the
    # user's); a start that fails puts it back, and ``attempts`` counts those failures.
    """
    ALTER TABLE queue ADD COLUMN starting INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE queue ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring ``conn`` to :data:`SCHEMA_VERSION`; return the version it started at.

    Raises:
        DatabaseTooNew: the database is newer than this gateway knows (nothing is changed).
    """
    (start,) = conn.execute("PRAGMA user_version").fetchone()
    if start > SCHEMA_VERSION:
        raise DatabaseTooNew(
            f"database schema version {start} is newer than this gateway's {SCHEMA_VERSION}:"
            " run the newer gateway, or restore a backup made for this one"
        )
    for version in range(start, SCHEMA_VERSION):
        statements = [s for s in MIGRATIONS[version].split(";") if s.strip()]
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return start
