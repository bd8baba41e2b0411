-- popcon job database, SQLite flavour. Keep in step with ../postgres/0001_init.sql: the same
-- tables, columns and constraints; only the types differ (timestamps are fixed-width RFC 3339
-- text, booleans 0/1). STRICT makes a wrongly typed bind an error instead of silent text.
-- Never edit an applied migration: the migrator refuses a changed checksum. Add a new file.

CREATE TABLE users (
    id         TEXT    NOT NULL PRIMARY KEY,
    token_hash TEXT    NOT NULL UNIQUE,
    is_admin   INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
    created_at TEXT    NOT NULL
) STRICT;

-- No foreign key to users: the bare enqueue path of the daemon issue creates jobs for a user
-- id that need not be registered; the ledger is where a real user is required.
CREATE TABLE jobs (
    id             TEXT    NOT NULL PRIMARY KEY,
    user_id        TEXT    NOT NULL,
    status         TEXT    NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'running', 'done', 'partial', 'failed')),
    subject        TEXT    NOT NULL,
    style          TEXT,
    seed           INTEGER NOT NULL,
    model          TEXT,
    reference_key  TEXT,
    pose_key       TEXT,
    -- Denormalized copy of emoji 0's image, written in the same transaction as emoji 0.
    thumbnail_path TEXT,
    thumbnail_key  TEXT,
    created_at     TEXT    NOT NULL,
    updated_at     TEXT    NOT NULL
) STRICT;

CREATE INDEX jobs_by_user_newest ON jobs (user_id, created_at DESC, id DESC);
CREATE INDEX jobs_newest ON jobs (created_at DESC, id DESC);

CREATE TABLE emoji_results (
    job_id        TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL CHECK (idx >= 0),
    label         TEXT    NOT NULL,
    status        TEXT    NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'running', 'done', 'failed', 'approved')),
    -- Bumped by every pre-flip; worker writes are conditional on it.
    fence         INTEGER NOT NULL DEFAULT 1 CHECK (fence >= 1),
    image_key     TEXT,
    seed          INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    error         TEXT,
    animation_key TEXT,
    updated_at    TEXT    NOT NULL,
    PRIMARY KEY (job_id, idx)
) STRICT;

-- Append-only. balance = SUM(delta); the unique idem_key makes every charge and refund
-- apply at most once.
CREATE TABLE credit_ledger (
    id         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    user_id    TEXT    NOT NULL REFERENCES users (id),
    delta      INTEGER NOT NULL CHECK (delta <> 0),
    reason     TEXT    NOT NULL,
    idem_key   TEXT    NOT NULL UNIQUE,
    created_at TEXT    NOT NULL
) STRICT;

CREATE INDEX credit_ledger_by_user ON credit_ledger (user_id);
