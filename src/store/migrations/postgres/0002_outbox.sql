-- The transactional outbox (issue 9): the intent to dispatch a queue message, written in the
-- same transaction as the charge and the pre-flip it belongs to. The enqueue side publishes
-- right after commit and marks the row; the workers' relay publishes what it did not, and
-- the reconciler publishes again a message whose entry Redis lost while its rows are still
-- unsettled. A row is removed once the rows it names have moved on.
CREATE TABLE dispatch_outbox (
    -- `{job_id}:{action}:{idx or -}:{fence}`: one intent per message.
    id           TEXT    NOT NULL PRIMARY KEY,
    job_id       TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    user_id      TEXT    NOT NULL,
    action       TEXT    NOT NULL,
    idx          BIGINT,
    fence        BIGINT  NOT NULL CHECK (fence >= 1),
    -- The (idx, fence) pairs the message is for, as JSON `[[0,1],[1,1]]`: the reconciler's
    -- test of "still unsettled".
    targets      TEXT    NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    published_at TIMESTAMPTZ,
    publishes    BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX dispatch_outbox_due ON dispatch_outbox (published_at, created_at);

-- generate-set's `Idempotency-Key`: a random job id stored against (user, key), written in the
-- job's own transaction, so a repeat finds the first job and the id reveals nothing of the key.
CREATE TABLE submission_keys (
    user_id    TEXT NOT NULL,
    idem_key   TEXT NOT NULL,
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, idem_key)
);
