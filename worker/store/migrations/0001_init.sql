-- 0001: executions, their history, the callback outbox and tombstones.
--
-- Times are integer microseconds since the Unix epoch (UTC): they order and compare
-- exactly. `executions.doc` holds the whole Execution as msgspec JSON; the other columns
-- are copies of its fields, kept for the indexes and the queries.

CREATE TABLE executions (
    id          TEXT    NOT NULL PRIMARY KEY,
    ord         INTEGER NOT NULL UNIQUE,  -- creation order (rowids may change on VACUUM)
    job_id      TEXT    NOT NULL,
    requester   TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    create_us   INTEGER NOT NULL,
    update_us   INTEGER NOT NULL,
    deadline_us INTEGER,
    last_cause  TEXT    NOT NULL,
    doc         BLOB    NOT NULL
);

-- find_active: the live execution of (requester, job).
CREATE INDEX executions_requester_job ON executions (requester, job_id);
-- get_executions_for_job, in creation order.
CREATE INDEX executions_job ON executions (job_id, ord);
-- live_executions (start-up restore, timers), in creation order: only the live rows are
-- indexed. Queries repeat this WHERE word for word so the planner can use it.
CREATE INDEX executions_live ON executions (ord)
    WHERE state NOT IN ('Completed', 'Failed', 'Cancelled');
-- list_executions: one requester's, by (update time, id).
CREATE INDEX executions_listing ON executions (requester, update_us, id);
-- purge: terminal executions by age.
CREATE INDEX executions_terminal ON executions (update_us, id)
    WHERE state IN ('Completed', 'Failed', 'Cancelled');

CREATE TABLE history (
    execution_id   TEXT    NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    new_version    INTEGER NOT NULL,
    previous_state TEXT    NOT NULL,
    new_state      TEXT    NOT NULL,
    cause          TEXT    NOT NULL,
    requester      TEXT    NOT NULL,
    comment        TEXT    NOT NULL,
    time_us        INTEGER NOT NULL,
    PRIMARY KEY (execution_id, new_version)
);

CREATE TABLE outbox (
    execution_id TEXT    NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    seq          INTEGER NOT NULL,
    subject      TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    body         BLOB    NOT NULL,  -- the exact bytes to publish
    headers      TEXT    NOT NULL,  -- JSON object of strings
    created_us   INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    parked       INTEGER NOT NULL DEFAULT 0,
    delivered    INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (execution_id, seq)
);

-- pending_outbox / outbox_stats: undelivered rows in sending order.
CREATE INDEX outbox_undelivered ON outbox (created_us, seq, execution_id)
    WHERE delivered = 0;

CREATE TABLE tombstones (
    id         TEXT    NOT NULL PRIMARY KEY,
    job_id     TEXT    NOT NULL,
    requester  TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    cause      TEXT    NOT NULL,
    deleted_us INTEGER NOT NULL
);

CREATE INDEX tombstones_deleted ON tombstones (deleted_us);
