-- 0006: the outbox keyed by its execution's creation order, as history is (0003).
--
-- Keyed by (execution_id, seq), each callback went to a random leaf of the key's index
-- (execution IDs are random UUIDs): a page of its own in the commit's WAL, 2.4 of the 11
-- pages a noop job wrote. Keyed by `ord`, new rows go at the end, next to each other.
-- `execution_id` stays in the row: the dispatcher publishes by it.

CREATE TABLE outbox_by_ord (
    execution_ord INTEGER NOT NULL REFERENCES executions (ord) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    execution_id  TEXT    NOT NULL,
    subject       TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    body          BLOB    NOT NULL,  -- the exact bytes to publish
    headers       TEXT    NOT NULL,  -- JSON object of strings
    created_us    INTEGER NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    parked        INTEGER NOT NULL DEFAULT 0,
    delivered     INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT    NOT NULL DEFAULT '',
    link          TEXT    NOT NULL DEFAULT '{}',
    PRIMARY KEY (execution_ord, seq)
);

INSERT INTO outbox_by_ord (execution_ord, seq, execution_id, subject, kind, body, headers,
    created_us, attempts, parked, delivered, last_error, link)
SELECT e.ord, o.seq, o.execution_id, o.subject, o.kind, o.body, o.headers, o.created_us,
    o.attempts, o.parked, o.delivered, o.last_error, o.link
FROM outbox AS o JOIN executions AS e ON e.id = o.execution_id;

DROP TABLE outbox;

ALTER TABLE outbox_by_ord RENAME TO outbox;

CREATE INDEX outbox_undelivered ON outbox (created_us, seq, execution_id)
    WHERE delivered = 0;
